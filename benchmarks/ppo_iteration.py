"""PPO iteration throughput, broken into rollout generation / scoring / update.

The model is the small random Llama of `benchmarks/train_step.py` (its `CONFIG` is read from
that file when present, so both benchmarks time the same network). A batch of 16
left-padded prompts of 64 tokens gets 64 sampled tokens each (a random model almost never
emits EOS, so every row runs the full 64 steps). The phases, each jitted once:

    generate   `generate_rollout`: KV-cache sampling           tokens/s = B * N / s
    score      `score_rollout` + `ppo_advantages`: policy, reference, value and reward-model
               forward passes over prompt + response, shaping, GAE, whitening
                                                                tokens/s = B * (P + N) / s
    update     `ppo_update`: 4 epochs x 4 minibatches, policy and value backward passes
                                                                tokens/s = epochs * B * (P + N) / s
    iteration  `ppo_iteration`: all of the above in one compiled call
                                                                tokens/s = B * N / s (generated)

Each phase is compiled and run twice before timing; `seconds` is the median of `repeats`
timed calls. Compare ratios within a run: the machine may be shared.

    python benchmarks/ppo_iteration.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from rlhf_jax.models.config import ModelConfig  # noqa: E402
from rlhf_jax.models.heads import RewardModel, ValueModel  # noqa: E402
from rlhf_jax.models.transformer import CausalLM  # noqa: E402
from rlhf_jax.training.optim import OptimizerConfig, make_optimizer  # noqa: E402
from rlhf_jax.training.ppo import (  # noqa: E402
    PPO_STATIC_ARGNAMES,
    PPOConfig,
    kl_controller,
    ppo_iteration,
    ppo_update,
    value_params_from_reward_model,
)
from rlhf_jax.training.rollout import SamplingConfig, generate_rollout, ppo_advantages, score_rollout  # noqa: E402
from rlhf_jax.training.state import create_train_state, reference_params  # noqa: E402

BATCH, PROMPT, RESPONSE = 16, 64, 64
EOS, PAD = 1, 0


def model_config() -> ModelConfig:
    """`CONFIG` of benchmarks/train_step.py, or the same-sized Llama when it is absent."""
    path = Path(__file__).with_name("train_step.py")
    if path.exists():
        spec = importlib.util.spec_from_file_location("_train_step_benchmark", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.CONFIG
    return ModelConfig.llama(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4,
                             intermediate_size=704, max_position_embeddings=256)


def prompts(vocab_size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(PROMPT // 2, PROMPT + 1, BATCH)
    mask = (np.arange(PROMPT)[None, :] >= PROMPT - lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(2, vocab_size, (BATCH, PROMPT)), PAD).astype(np.int32)
    return jnp.asarray(ids), jnp.asarray(mask)


def median_seconds(call, repeats: int) -> float:
    """Median wall time of `call()` (which blocks on its result) after two warm-up calls."""
    for _ in range(2):
        call()
    wall, _ = common.time_calls(call, lambda _: None, repeats)
    return common.median(wall)


def run(repeats: int = 5) -> list[dict]:
    """Rows `{phase, seconds, tokens, tokens_per_s}` (seconds: median per call)."""
    config = model_config()
    policy, value, reward = CausalLM(config), ValueModel(config), RewardModel(config)
    dummy = jnp.zeros((1, PROMPT), jnp.int32)
    policy_params = policy.init(jax.random.key(0), dummy)["params"]
    reward_params = reward.init(jax.random.key(1), dummy)["params"]
    ref_params = reference_params(policy_params)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-5, schedule="constant"))
    ppo = PPOConfig(sampling=SamplingConfig(max_new_tokens=RESPONSE, eos_token_id=EOS, pad_token_id=PAD))
    prompt_ids, prompt_mask = prompts(config.vocab_size)
    key = jax.random.key(2)

    def states():
        return (create_train_state(policy, jax.tree.map(jnp.copy, policy_params), optimizer),
                create_train_state(value, value_params_from_reward_model(reward_params), optimizer))

    policy_state, value_state = states()
    generate_fn = jax.jit(functools.partial(generate_rollout, sampling=ppo.sampling))

    @functools.partial(jax.jit, static_argnames=("reward_module",))
    def score_fn(data, policy_state, value_state, ref_params, reward_params, reward_module):
        data = score_rollout(data, policy_state, ref_params, sampling=ppo.sampling, value_state=value_state,
                             reward_module=reward_module, reward_params=reward_params)
        return ppo_advantages(data, kl_coef=ppo.kl_coef, gamma=ppo.gamma, gae_lambda=ppo.gae_lambda)

    update_fn = jax.jit(functools.partial(ppo_update, config=ppo), donate_argnames=("policy_state", "value_state"))
    iteration_fn = jax.jit(ppo_iteration, static_argnames=PPO_STATIC_ARGNAMES,
                           donate_argnames=("policy_state", "value_state"))

    generated = generate_fn(policy_state, prompt_ids, prompt_mask, key)
    scored = score_fn(generated, policy_state, value_state, ref_params, reward_params, reward)
    carry = {"states": states(), "kl": kl_controller(ppo).init()}

    def update_call():
        policy_state, value_state, metrics = update_fn(*carry["states"], scored, key)
        carry["states"] = (policy_state, value_state)
        jax.block_until_ready(metrics)

    def iteration_call():
        policy_state, value_state, kl_state, metrics = iteration_fn(
            *carry["states"], carry["kl"], ref_params, prompt_ids, prompt_mask, key, config=ppo,
            reward_module=reward, reward_params=reward_params)
        carry["states"], carry["kl"] = (policy_state, value_state), kl_state
        jax.block_until_ready(metrics)

    sequence_tokens = BATCH * (PROMPT + RESPONSE)
    phases = [
        ("rollout: generate", BATCH * RESPONSE,
         lambda: jax.block_until_ready(generate_fn(policy_state, prompt_ids, prompt_mask, key))),
        ("rollout: score (policy, reference, value, reward fwd + GAE)", sequence_tokens,
         lambda: jax.block_until_ready(score_fn(generated, policy_state, value_state, ref_params,
                                                reward_params, reward))),
        (f"update ({ppo.epochs} epochs x {ppo.num_minibatches} minibatches)", ppo.epochs * sequence_tokens,
         update_call),
        ("iteration (one jit: rollout + update + KL)", BATCH * RESPONSE, iteration_call),
    ]
    rows = []
    for phase, tokens, call in phases:
        seconds = median_seconds(call, repeats)
        rows.append(dict(phase=phase, seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(f"jax {jax.__version__}, backend {jax.default_backend()}; batch {BATCH}, prompt {PROMPT}, "
          f"response {RESPONSE}")
    rows = run(args.repeats)
    print(f"| {'phase':60s} | seconds | tokens | tokens / s |")
    print(f"|{'-' * 62}|--------:|-------:|-----------:|")
    for row in rows:
        print(f"| {row['phase']:60s} | {row['seconds']:7.3f} | {row['tokens']:6d} | {row['tokens_per_s']:10.0f} |")


if __name__ == "__main__":
    main()
