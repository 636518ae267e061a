"""Training-step throughput: SFT, reward and DPO steps, as a fraction of a matmul peak.

A small random Llama (hidden 256, 4 layers, 4 heads of 64, MLP 704, vocabulary 8192,
untied head) trains on batches of 8 sequences of 256 tokens (DPO and reward: 8 pairs, so 16
sequences per step): prompts of 64..128 tokens, responses of 64..128, right padding. Each
step is jitted once with the state donated; after two warm-up steps (compile excluded) we
time `--repeats` runs of `--steps` steps and report the median time per step. Tokens/s
counts every position of every sequence the step trains on (padding included).

Model FLOPs per step (what the step must compute; backward = 2 x forward):
    training rows:  3 * (2 * N_body * S  +  4 * L * T * D_attn * S  +  2 * D * V * P)
    reference rows: 1 * (the same terms)                       (DPO, in-step reference only)
with N_body the matmul parameters of the blocks (attention and MLP projections; the input
embedding is a gather, no FLOPs), S the tokens through the model (rows x T, padding
included), the attention term QK^T and PV over the full T x T score matrix as computed
(Kaplan et al. 2020 / PaLM count), and P the positions projected to the vocabulary: every
position (T - 1 after the shift), or `W = 128` per row with the response-only logits window. The reward head
(D x 1) is negligible. XLA's own count (`compiled.cost_analysis()["flops"]`) agrees within
1.5% (the difference is elementwise work).

Achieved FLOP/s = model FLOPs / step time, as a fraction of the f32 `jnp.dot` peak (2048^3
products). Every timed run of steps is followed by three timed matmuls, so both sample the
same moments of a shared machine, and the fraction compares the best of each (the least
disturbed samples): best step FLOP/s / best matmul FLOP/s. "Fraction, CPU time" does the same with
process CPU seconds (all threads) instead of wall-clock seconds; when other jobs share the
machine it is the steadier figure, since the step and the matmul are each charged only for
the CPU they got. Tokens / s is from the median step time.

The machine may be shared: compare ratios within one run, not absolute numbers across runs.

    python benchmarks/train_step.py              # prints, updates benchmarks/RESULTS.md
    python benchmarks/train_step.py --repeats 3 --no-write
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
from rlhf_jax.training.dpo_step import PreferenceLossConfig, dpo_step, precompute_reference_logps  # noqa: E402
from rlhf_jax.training.optim import OptimizerConfig, make_optimizer  # noqa: E402
from rlhf_jax.training.reward_step import reward_step  # noqa: E402
from rlhf_jax.training.sft_step import sft_step  # noqa: E402
from rlhf_jax.training.state import create_train_state, reference_params  # noqa: E402
from rlhf_jax.training.step_runner import make_train_step  # noqa: E402

CONFIG = ModelConfig.llama(vocab_size=8192, hidden_size=256, num_layers=4, num_heads=4,
                           intermediate_size=704, max_position_embeddings=256)
BATCH, TIME, WINDOW = 8, 256, 128
SECTION = "## Training steps"
NOTES = """Reading it (analysis of the 2026-11-21 20:39 UTC run; a re-run replaces the table, not this text):

- Measured on a quiet machine (load average ~2 from the benchmark's own two threads). The
  fraction compares each step with the best of three 2048^3 f32 `jnp.dot` products timed
  right after it (285-302 GFLOP/s here); tokens/s differences under ~10% between rows are
  within run-to-run noise.
- The DPO step reaches 0.53 of the matmul peak with the reference forward in the step
  (0.55 in CPU time) and 0.49-0.50 with a precomputed reference (its forward-only share,
  which runs closest to the peak, is gone). The previous run of this benchmark, before the
  change below and on a machine loaded 8-17, gave 0.44-0.48.
- The change that mattered: XLA:CPU differentiates a dense layer applied to `[B, T, D]`
  (a `dot_general` with two batch-like axes) through transposing copies that feed the
  weight-gradient matmuls; about a third of the DPO step's op time was such copies.
  `rlhf_jax.models.layers.Dense` and the LM head now fold the leading axes first
  (`[B*T, D] @ [D, F]`; same parameters, same numbers), so the backward pass is plain 2-D
  matmuls. Measured with `benchmarks/vs_trl.py`'s model in one session: DPO step 494 -> 391
  ms (-21%), reward step 427 -> 311 ms (-27%), PPO iteration 1.53 -> 1.40 s (-9%).
  Grouped-query attention now contracts one axis per product (`[B, K, G*T, Dh]` queries),
  which took the PPO iteration on to 1.34 s (-5%).
- Tried and dropped (no gain, same session): computing SwiGLU's gate and up projections,
  or q/k/v, as one matmul against concatenated kernels (+0-5% time); XLA flags that move
  dots from YNNPACK to Eigen or oneDNN (`--xla_cpu_experimental_ynn_fusion_type=reduce`,
  `--xla_cpu_use_onednn`): equal or slower.
- Response-only logits skip the vocabulary projection (and its backward) for prompt and
  padding positions: 18% fewer FLOPs here (V = 8192 is large next to D = 256); a
  precomputed reference removes one forward pass of 2B rows per step (25% of the FLOPs).
"""


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


def sequences(rng, rows):
    """Right-padded prompt + response rows (ids, attention mask, response loss mask)."""
    prompt = rng.integers(TIME // 4, TIME // 2 + 1, rows)
    response = rng.integers(TIME // 4, WINDOW + 1, rows)
    position = np.arange(TIME)[None, :]
    attention = (position < np.minimum(prompt + response, TIME)[:, None]).astype(np.int32)
    loss = ((position >= prompt[:, None]) & (attention == 1)).astype(np.float32)
    ids = np.where(attention == 1, rng.integers(1, CONFIG.vocab_size, (rows, TIME)), 0).astype(np.int32)
    return ids, attention, loss


def pair_batch(rng):
    chosen, rejected = sequences(rng, BATCH), sequences(rng, BATCH)
    return PreferenceBatch(chosen[0], chosen[1], rejected[0], rejected[1], chosen[2], rejected[2])


def body_params(params) -> int:
    """Matmul parameters of the blocks (everything under decoder/layers_*, norms excluded)."""
    return sum(leaf.size for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
               if "layers_" in jax.tree_util.keystr(path) and leaf.ndim == 2)


def forward_flops(n_body: int, rows: int, projected_per_row: int) -> float:
    tokens = rows * TIME
    attention = 4 * CONFIG.num_layers * TIME * CONFIG.num_heads * CONFIG.dims_per_head * tokens
    head = 2 * CONFIG.hidden_size * CONFIG.vocab_size * rows * projected_per_row
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
    sft = jax.device_put(SFTBatch(*sequences(rng, BATCH)))
    pairs = jax.device_put(pair_batch(rng))
    (pairs_with_ref,) = precompute_reference_logps(policy.apply, ref, [pairs], response_window=WINDOW)
    full, window = TIME - 1, WINDOW
    dpo = PreferenceLossConfig(beta=0.1)
    # name, module, params, step options, batch, reference args, model FLOPs
    cases = [
        ("sft, full logits", policy, policy_params, dict(step=sft_step), sft, (),
         3 * forward_flops(n_body, BATCH, full)),
        ("sft, response-only logits", policy, policy_params, dict(step=sft_step, response_window=WINDOW), sft, (),
         3 * forward_flops(n_body, BATCH, window)),
        ("reward", reward_model, reward_params, dict(step=reward_step), pairs, (),
         3 * forward_flops(n_body, 2 * BATCH, 0)),
        ("dpo, in-step reference, full logits", policy, policy_params, dict(step=dpo_step, config=dpo), pairs,
         (ref,), 4 * forward_flops(n_body, 2 * BATCH, full)),
        ("dpo, precomputed reference, full logits", policy, policy_params, dict(step=dpo_step, config=dpo),
         pairs_with_ref, (), 3 * forward_flops(n_body, 2 * BATCH, full)),
        ("dpo, precomputed reference, response-only logits", policy, policy_params,
         dict(step=dpo_step, config=dpo, response_window=WINDOW), pairs_with_ref, (),
         3 * forward_flops(n_body, 2 * BATCH, window)),
    ]
    rows = []
    peak = MatmulPeak()
    for name, module, params, options, batch, extra, flops in cases:
        state = create_train_state(module, jax.tree.map(jnp.copy, params), optimizer)
        run = make_train_step(options.pop("step"), **options)
        timing = time_steps(run, state, batch, extra, steps, repeats, peak)
        sequences_per_step = batch.input_ids.shape[0] if isinstance(batch, SFTBatch) else 2 * BATCH
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1, help="steps per timed repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    info = common.machine_info(packages=("jax",))
    print("\n".join(info), flush=True)
    started = time.time()
    rows = benchmark(args.steps, args.repeats)
    extra = ppo_rows(args.repeats)
    section = (
        f"{SECTION}\n\n"
        f"Command: `python benchmarks/train_step.py --steps {args.steps} --repeats {args.repeats}` "
        f"({common.utc_stamp('%Y-%m-%d, %H:%M UTC')}, {time.time() - started:.0f} s in all)\n\n"
        "```\n" + "\n".join(info) + "\n```\n\n" + table(rows) + "\n\n" + NOTES
    )
    if extra:
        section += "\nPPO iteration (`benchmarks/ppo_iteration.py`):\n\n" + generic_table(extra) + "\n"
    print(section)
    if not args.no_write:
        common.write_section(SECTION, section)


if __name__ == "__main__":
    main()
