"""GRPO update with each group's prompt run once vs the prompt run per response.

One `grpo_update` (one pass, one minibatch: forward + backward of `grpo_loss` with the k3 KL
term, Adam step) on a rollout of `n` prompts x G = 8 responses, prompts of 256 tokens and
responses of up to 64 (right-padded, lengths 32..64), on the vs_trl model (`benchmarks/vs_trl.py`
`--preset cpu`: random Llama, vocabulary 1024, hidden 256, 4 layers). Two settings of
`GRPOConfig.prompt_once`, same data and starting state:

    shared        each group's prompt runs once and its keys/values serve the G responses
                  (`response_logprobs(..., prompt_once=True)`): n * P + n * G * R tokens
    per response  every response runs with its own copy of its prompt (the layout of one
                  row per response): n * G * (P + R) tokens

The run asserts that both give the same loss (to 1e-5) and the same gradients (to 1e-5),
reports the median seconds of `--repeats` timed calls of each (interleaved, after two
warm-up calls), the speed-up (ratio of the medians, and the spread of the per-round ratios), and the model FLOPs of the update (forward + backward = 3 x the
forward; matmuls, attention and the LM head at the response positions) each setting runs
and the share the shared prompt avoids. Compare ratios within a run: the machine may be
shared.

    python benchmarks/grpo_update.py [--prompts 2] [--repeats 9] [--write]   # --write: update RESULTS.md
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import jax_runners  # noqa: E402

from rlhf_jax.models.config import ModelConfig  # noqa: E402
from rlhf_jax.models.transformer import CausalLM  # noqa: E402
from rlhf_jax.training.grpo import GRPOConfig, grpo_update  # noqa: E402
from rlhf_jax.training.rollout import Rollout, SamplingConfig, rollout_logprobs  # noqa: E402
from rlhf_jax.training.state import create_train_state  # noqa: E402

SECTION = "## GRPO update: each group's prompt once"
GROUP, PROMPT, RESPONSE = 8, 256, 64
EOS, PAD = 1, 0
# The vs_trl `cpu` preset's network (benchmarks/vs_trl.py PRESETS["cpu"]).
MODEL = dict(vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4, intermediate_size=704)


def model_config() -> ModelConfig:
    return ModelConfig.llama(**MODEL, max_position_embeddings=PROMPT + RESPONSE,
                             pad_token_id=PAD, eos_token_id=EOS, bos_token_id=2)


def make_rollout(config: ModelConfig, params, num_prompts: int, sampling: SamplingConfig) -> Rollout:
    """Random prompts (full length) and responses (32..64 tokens, EOS last), with the
    rollout policy's and a reference's log-probs and random group advantages."""
    rng = np.random.default_rng(0)
    vocab = config.vocab_size
    prompt_ids = rng.integers(3, vocab, (num_prompts, PROMPT)).astype(np.int32)
    lengths = rng.integers(RESPONSE // 2, RESPONSE + 1, (num_prompts, GROUP))
    response_mask = (np.arange(RESPONSE) < lengths[..., None]).astype(np.int32)
    response_ids = rng.integers(3, vocab, (num_prompts, GROUP, RESPONSE)).astype(np.int32)
    response_ids[np.arange(num_prompts)[:, None], np.arange(GROUP)[None, :], lengths - 1] = EOS
    response_ids = np.where(response_mask == 1, response_ids, PAD).astype(np.int32)
    data = Rollout(prompt_ids=prompt_ids, prompt_mask=np.ones_like(prompt_ids), response_ids=response_ids,
                   response_mask=response_mask, has_eos=np.ones((num_prompts, GROUP), bool),
                   logp=np.zeros(response_ids.shape, np.float32))
    policy = create_train_state(CausalLM(config), params, optax.sgd(0.0))
    reference = jax.tree.map(lambda x: x * 0.99, params)
    data = jax.jit(lambda d, s, r: rollout_logprobs(d, s, r, sampling=sampling))(data, policy, reference)
    advantages = rng.normal(size=(num_prompts, GROUP)).astype(np.float32)
    return data.replace(advantages=jnp.asarray(advantages), scores=jnp.asarray(advantages))


def update_flops(config: ModelConfig, num_prompts: int, mean_response: float, shared: bool) -> float:
    """Model FLOPs of one update (3 x forward): decoder matmuls and attention over the tokens
    each setting runs, plus the LM head at the response positions."""
    responses = num_prompts * GROUP
    response_tokens = responses * mean_response
    if shared:  # prompts once (context P / 2), responses after their prompt (context P + R / 2)
        decoder = (jax_runners.forward_flops(config, num_prompts * PROMPT, PROMPT / 2, lm_head=False)
                   + jax_runners.forward_flops(config, response_tokens, PROMPT + mean_response / 2, lm_head=False))
    else:
        tokens = responses * (PROMPT + mean_response)
        decoder = jax_runners.forward_flops(config, tokens, (PROMPT + mean_response) / 2, lm_head=False)
    head = 2 * config.hidden_size * config.vocab_size * response_tokens
    return 3 * (decoder + head)


def run(num_prompts: int, repeats: int) -> dict:
    config = model_config()
    params = CausalLM(config).init(jax.random.key(0), jnp.zeros((1, 2), jnp.int32))["params"]
    sampling = SamplingConfig(max_new_tokens=RESPONSE, eos_token_id=EOS, pad_token_id=PAD)
    grpo = GRPOConfig(sampling=sampling, group_size=GROUP, kl_coef=0.04, epochs=1, num_minibatches=1)
    data = make_rollout(config, params, num_prompts, sampling)
    optimizer = optax.adam(1e-4)
    settings = {"shared": grpo, "per_response": dataclasses.replace(grpo, prompt_once=False)}
    updates = {name: jax.jit(lambda state, d, key, c=c: grpo_update(state, d, key, config=c))
               for name, c in settings.items()}
    fresh = lambda tx=optimizer: create_train_state(CausalLM(config), jax.tree.map(jnp.copy, params), tx)
    key = jax.random.key(1)
    # Equality check with SGD at learning rate 1: the parameter change is the gradient.
    results = {name: jax.block_until_ready(update(fresh(optax.sgd(1.0)), data, key))
               for name, update in updates.items()}
    loss = {name: float(metrics["grpo/loss"]) for name, (_, metrics) in results.items()}
    assert abs(loss["shared"] - loss["per_response"]) <= 1e-5 * max(1.0, abs(loss["shared"])), loss
    differences = jax.tree.leaves(jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))),
                                               results["shared"][0].params, results["per_response"][0].params))
    assert max(differences) < 1e-5, max(differences)  # gradients equal to float32 rounding
    states = {name: fresh() for name in updates}
    times = {name: [] for name in updates}
    for name, update in updates.items():  # a second warm-up call
        jax.block_until_ready(update(states[name], data, key))
    for _ in range(repeats):
        for name, update in updates.items():
            wall, _ = common.time_calls(lambda: update(states[name], data, key), jax.block_until_ready, 1)
            times[name].extend(wall)
    seconds = {name: common.median(values) for name, values in times.items()}
    rounds = [slow / fast for slow, fast in zip(times["per_response"], times["shared"])]  # per round
    mean_response = float(np.asarray(data.response_mask).sum(-1).mean())
    flops = {name: update_flops(config, num_prompts, mean_response, name == "shared") for name in updates}
    return dict(num_prompts=num_prompts, repeats=repeats, loss=loss, max_param_difference=max(differences),
                seconds=seconds, flops=flops, speedup=seconds["per_response"] / seconds["shared"],
                round_speedups=(min(rounds), common.median(rounds), max(rounds)),
                flops_avoided=1 - flops["shared"] / flops["per_response"], mean_response=mean_response)


def report(result: dict, command: str) -> str:
    seconds, flops = result["seconds"], result["flops"]
    rows = [[label, f"{seconds[name]:.3f}", f"{flops[name] / 1e9:.1f}", f"{flops[name] / seconds[name] / 1e9:.1f}",
             f"{result['loss'][name]:.6f}"]
            for name, label in (("shared", "each group's prompt once (`prompt_once=True`)"),
                                ("per_response", "prompt per response (`prompt_once=False`)"))]
    n = result["num_prompts"]
    lines = [
        SECTION, "",
        f"`{command}` ({common.utc_stamp()}). One `grpo_update` step (one pass, one minibatch, "
        f"forward + backward + Adam) on {n} prompts x G = {GROUP} responses, prompt {PROMPT} tokens, "
        f"responses 32..{RESPONSE} tokens (mean {result['mean_response']:.1f}); vs_trl `cpu` model "
        "(random Llama, vocabulary 1024, hidden 256, 4 layers, 4 heads, MLP 704); median of "
        f"{result['repeats']} interleaved calls. The machine is shared with other jobs: absolute "
        "times are noisy, the ratio is measured in the same run.", "",
        common.markdown_table(["update", "seconds", "GFLOP", "GFLOP/s", "loss"], rows, align="lrrrr"), "",
        f"Speed-up: **{result['speedup']:.2f}x** (ratio of the medians; per round, min / median / max: "
        f"{' / '.join(f'{r:.2f}x' for r in result['round_speedups'])}); FLOPs avoided by running each prompt once: "
        f"{result['flops_avoided']:.0%} ({(flops['per_response'] - flops['shared']) / 1e9:.1f} GFLOP per "
        f"update). Losses equal to {abs(result['loss']['shared'] - result['loss']['per_response']):.1e} "
        f"(asserted <= 1e-5), gradients to {result['max_param_difference']:.1e} (asserted < 1e-5).", "",
        "```", *common.machine_info(), "```",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=2, help="prompt groups in the rollout")
    parser.add_argument("--repeats", type=int, default=9)
    common.add_write_flags(parser)
    args = parser.parse_args(argv)
    result = run(args.prompts, args.repeats)
    text = report(result, common.command_line("grpo_update.py", argv))
    print(text)
    if args.write:
        common.write_section(SECTION, text)


if __name__ == "__main__":
    main()
