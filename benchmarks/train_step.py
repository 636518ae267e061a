"""Training-step throughput: SFT, reward and DPO steps, as a fraction of a matmul peak.

A small random Llama (hidden 256, 4 layers, 4 heads of 64, MLP 704, vocabulary 8192,
untied head) trains on batches of 8 rows in the LM layout (`LMBatch`): prompts of 64..128
tokens left-padded to P = 128, responses of 64..128 tokens right-padded to R = 128 (SFT: one
response per prompt; DPO and reward: a pair, the prompt run once for both). Each step is
jitted once with the state donated; after two warm-up steps (compile excluded) we time
`--repeats` runs of `--steps` steps and report the median time per step. Tokens/s counts
every position of every prompt + response sequence the step trains on (padding included,
T = P + R per sequence, as if each sequence ran alone).

Model FLOPs per step (what the step must compute; backward = 2 x forward):
    training rows:  3 * (2 * N_body * S  +  4 * L * C * D_attn  +  2 * D * V * H)
    reference rows: 1 * (the same terms)                       (DPO, in-step reference only)
with N_body the matmul parameters of the blocks (attention and MLP projections; the input
embedding is a gather, no FLOPs), S the tokens through the model (B x (P + N R), padding
included), C the query-key pairs of the score matrices as computed (one response: the full
T x T matrix; a pair: P x P for the prompt and R x (P + R) per response; Kaplan et al. 2020
/ PaLM count), and H the positions projected to the vocabulary (B x N x R: response
positions only). The reward head (D x 1) is negligible.

Achieved FLOP/s = model FLOPs / step time, as a fraction of the f32 `jnp.dot` peak (2048^3
products). Every timed run of steps is followed by three timed matmuls, so both sample the
same moments of a shared machine, and the fraction compares the best of each (the least
disturbed samples): best step FLOP/s / best matmul FLOP/s. "Fraction, CPU time" does the same with
process CPU seconds (all threads) instead of wall-clock seconds; when other jobs share the
machine it is the steadier figure, since the step and the matmul are each charged only for
the CPU they got. Tokens / s is from the median step time.

The machine may be shared: compare ratios within one run, not absolute numbers across runs.

    python benchmarks/train_step.py --write      # prints, updates benchmarks/RESULTS.md
    python benchmarks/train_step.py --repeats 3  # prints only
"""
from __future__ import annotations

import argparse
import functools
import importlib.util
import inspect
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from rlhf_jax.models.config import ModelConfig  # noqa: E402
from rlhf_jax.models.heads import RewardModel  # noqa: E402
from rlhf_jax.models.transformer import CausalLM  # noqa: E402
from rlhf_jax.training.batches import PreferenceBatch, SFTBatch  # noqa: E402
from rlhf_jax.training.preference_step import (PreferenceLossConfig, precompute_reference_logps,  # noqa: E402
                                              preference_step)
from rlhf_jax.training.optim import OptimizerConfig, make_optimizer  # noqa: E402
from rlhf_jax.training.reward_step import reward_step  # noqa: E402
from rlhf_jax.training.sft_step import sft_step  # noqa: E402
from rlhf_jax.training.state import create_train_state, reference_params  # noqa: E402
from rlhf_jax.training.step_runner import make_train_step  # noqa: E402

CONFIG = ModelConfig.llama(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4,
                           intermediate_size=704, max_position_embeddings=256)
BATCH, PROMPT, RESPONSE = 8, 128, 128
TIME = PROMPT + RESPONSE
SECTION = "## Training steps"


class MatmulPeak:
    """`jnp.dot` of two `size` x `size` matrices of `dtype` (default: 2048, float32; compiled
    once): FLOP/s over wall-clock and over process CPU time (all threads), the best of
    `repeats` products."""

    def __init__(self, size: int = 2048, dtype=jnp.float32):
        self.size = size
        self.a, self.b = (jax.random.normal(jax.random.key(k), (size, size), dtype) for k in (0, 1))
        self.dot = jax.jit(jnp.dot)
        self.dot(self.a, self.b).block_until_ready()

    def measure(self, repeats: int = 1) -> tuple[float, float]:
        wall, cpu = common.time_calls(lambda: self.dot(self.a, self.b), jax.block_until_ready, repeats)
        flops = 2 * self.size**3
        return flops / min(wall), flops / min(cpu)


def lm_rows(rng, rows, num):
    """`(prompt_ids, prompt_mask, response_ids, response_mask)`: prompts of 64..128 tokens
    left-padded to PROMPT, `num` responses of 64..128 tokens right-padded to RESPONSE."""
    prompt = rng.integers(PROMPT // 2, PROMPT + 1, rows)
    response = rng.integers(RESPONSE // 2, RESPONSE + 1, (rows, num))
    prompt_mask = (np.arange(PROMPT)[None] >= PROMPT - prompt[:, None]).astype(np.int32)
    response_mask = (np.arange(RESPONSE)[None, None] < response[..., None]).astype(np.int32)
    prompt_ids = rng.integers(1, CONFIG.vocab_size, (rows, PROMPT)).astype(np.int32) * prompt_mask
    response_ids = rng.integers(1, CONFIG.vocab_size, (rows, num, RESPONSE)).astype(np.int32) * response_mask
    return prompt_ids, prompt_mask, response_ids, response_mask


def body_params(params) -> int:
    """Matmul parameters of the blocks (everything under decoder/layers_*, norms excluded)."""
    return sum(leaf.size for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
               if "layers_" in jax.tree_util.keystr(path) and leaf.ndim == 2)


def forward_flops(n_body: int, rows: int, num: int, *, lm_head: bool) -> float:
    """Forward FLOPs of `rows` prompts with `num` responses each (module docstring)."""
    tokens = rows * (PROMPT + num * RESPONSE)
    pairs = rows * (TIME * TIME if num == 1 else PROMPT * PROMPT + num * RESPONSE * TIME)
    attention = 4 * CONFIG.num_layers * CONFIG.num_heads * CONFIG.dims_per_head * pairs
    head = 2 * CONFIG.hidden_size * CONFIG.vocab_size * rows * num * RESPONSE if lm_head else 0
    return 2 * n_body * tokens + attention + head


def time_steps(run, state, batch, extra, steps: int, repeats: int, peak: MatmulPeak) -> dict:
    """Wall and CPU seconds per step over `repeats` runs of `steps` steps (after two warm-up
    steps, compile included), each run followed by three timed matmuls so both sample the same
    load. Returns the median and best step times and the best matmul FLOP/s (wall, CPU)."""
    for _ in range(2):
        state, metrics = run(state, batch, *extra)
    jax.block_until_ready(metrics)

    def run_steps(state):
        for _ in range(steps):
            state, metrics = run(state, batch, *extra)
        jax.block_until_ready((state.params, metrics))
        return state

    walls, cpus, peak_walls, peak_cpus = [], [], [], []
    for _ in range(repeats):
        state, wall, cpu = common.timed(functools.partial(run_steps, state))
        walls.append(wall / steps)
        cpus.append(cpu / steps)
        peak_wall, peak_cpu = peak.measure(repeats=3)
        peak_walls.append(peak_wall)
        peak_cpus.append(peak_cpu)
    return dict(wall=common.median(walls), best_wall=min(walls), best_cpu=min(cpus),
                peak_wall=max(peak_walls), peak_cpu=max(peak_cpus))


def benchmark(steps: int, repeats: int) -> list[dict]:
    rng = np.random.default_rng(0)
    optimizer = make_optimizer(OptimizerConfig(learning_rate=1e-4, schedule="constant"))
    dummy = jnp.zeros((1, TIME), jnp.int32)
    policy, reward_model = CausalLM(CONFIG), RewardModel(CONFIG)
    policy_params = policy.init(jax.random.key(0), dummy)["params"]
    reward_params = reward_model.init(jax.random.key(1), dummy)["params"]
    ref = reference_params(policy_params)
    n_body = body_params(policy_params)
    sft = jax.device_put(SFTBatch(*lm_rows(rng, BATCH, 1)))
    pairs = jax.device_put(PreferenceBatch(*lm_rows(rng, BATCH, 2)))
    (pairs_with_ref,) = precompute_reference_logps(policy.apply, ref, [pairs])
    dpo = PreferenceLossConfig(beta=0.1)
    pair_forward = forward_flops(n_body, BATCH, 2, lm_head=True)
    # name, module, params, step options, batch, reference args, model FLOPs
    cases = [
        ("sft", policy, policy_params, dict(step=sft_step), sft, (),
         3 * forward_flops(n_body, BATCH, 1, lm_head=True)),
        ("reward", reward_model, reward_params, dict(step=reward_step), pairs, (),
         3 * forward_flops(n_body, BATCH, 2, lm_head=False)),
        ("dpo, in-step reference", policy, policy_params, dict(step=preference_step, config=dpo), pairs,
         (ref,), 4 * pair_forward),
        ("dpo, precomputed reference", policy, policy_params, dict(step=preference_step, config=dpo),
         pairs_with_ref, (), 3 * pair_forward),
    ]
    rows = []
    peak = MatmulPeak()
    for name, module, params, options, batch, extra, flops in cases:
        state = create_train_state(module, jax.tree.map(jnp.copy, params), optimizer)
        run = make_train_step(options.pop("step"), **options)
        timing = time_steps(run, state, batch, extra, steps, repeats, peak)
        sequences_per_step = BATCH * batch.num_responses
        row = dict(name=name, step_ms=1e3 * timing["wall"], best_step_ms=1e3 * timing["best_wall"],
                   tokens_per_s=sequences_per_step * TIME / timing["wall"],
                   gflop=flops / 1e9, gflops=flops / timing["best_wall"] / 1e9,
                   peak_gflops=timing["peak_wall"] / 1e9,
                   fraction=flops / timing["best_wall"] / timing["peak_wall"],
                   cpu_fraction=flops / timing["best_cpu"] / timing["peak_cpu"])
        rows.append(row)
        print(f"{name:50s} {row['step_ms']:8.0f} ms  {row['tokens_per_s']:7.0f} tok/s  "
              f"{row['fraction']:.2f} of peak (cpu time: {row['cpu_fraction']:.2f})", flush=True)
    return rows


def ppo_rows(repeats: int) -> list[dict]:
    """Rows of benchmarks/ppo_iteration.py's `run()`, when that file exists."""
    path = Path(__file__).with_name("ppo_iteration.py")
    if not path.exists():
        return []
    spec = importlib.util.spec_from_file_location("ppo_iteration", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    accepts_repeats = "repeats" in inspect.signature(module.run).parameters
    return list(module.run(repeats=repeats) if accepts_repeats else module.run())


def table(rows: list[dict]) -> str:
    lines = ["| step | ms / step (median) | ms / step (best) | tokens / s (median) | model GFLOP / step "
             "| GFLOP/s (best run) | matmul GFLOP/s (best) | fraction of peak | fraction, CPU time |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['step_ms']:.0f} | {row['best_step_ms']:.0f} | "
                     f"{row['tokens_per_s']:.0f} | {row['gflop']:.1f} | "
                     f"{row['gflops']:.0f} | {row['peak_gflops']:.0f} | {row['fraction']:.2f} | "
                     f"{row['cpu_fraction']:.2f} |")
    return "\n".join(lines)


def generic_table(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{row[k]:.4g}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def section(rows: list[dict], ppo: list[dict], info: list[str], command: str, seconds: float) -> str:
    """The RESULTS.md section: the command, the machine and the measured tables, nothing else."""
    text = (
        f"{SECTION}\n\n"
        f"Command: `{command}` ({common.utc_stamp('%Y-%m-%d, %H:%M UTC')}, {seconds:.0f} s in all)\n\n"
        "```\n" + "\n".join(info) + "\n```\n\n" + table(rows) + "\n"
    )
    if ppo:
        text += "\nPPO iteration (`benchmarks/ppo_iteration.py`):\n\n" + generic_table(ppo) + "\n"
    return text


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--steps", type=int, default=1, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per case (and PPO phase)")
    common.add_write_flags(parser)
    args = parser.parse_args(argv)
    info = common.machine_info(packages=("jax",))
    print("\n".join(info), flush=True)
    started = time.time()
    rows = benchmark(args.steps, args.repeats)
    ppo = ppo_rows(args.repeats)
    info.insert(3, f"load average (1/5/15 min) at the end: {common.load_average()}")
    text = section(rows, ppo, info, common.command_line("train_step.py", argv), time.time() - started)
    print(text)
    if args.write:
        common.write_section(SECTION, text)


if __name__ == "__main__":
    main()
