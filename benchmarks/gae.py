"""GAE speed: a per-element Python loop, a NumPy loop over time, and rlhf_jax's two JAX solvers.

    python benchmarks/gae.py                 # all shapes, prints machine info and a markdown table
    python benchmarks/gae.py --repeats 3 --shapes 64x128 8x16384

The rollout is environment-style (rewards, values, episode ends, bootstrap value), so every
implementation computes exactly

    delta_t = r_t + gamma * V_{t+1} * (1 - done_t) - V_t
    A_t     = delta_t + gamma * gae_lambda * (1 - done_t) * A_{t+1}

and the script checks that they agree before timing. Times are medians over `--repeats` runs;
the JAX functions are jitted, compiled before timing (compile time reported on its own), and
timed with `block_until_ready`. The pure-Python loop is skipped where its projected time
exceeds `--python-budget` seconds.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from rlhf_jax.ops.advantages import gae  # noqa: E402

GAMMA, GAE_LAMBDA = 0.99, 0.95
DEFAULT_SHAPES = ("64x128", "64x1024", "16x4096", "8x16384")


def python_loop_gae(rewards, values, dones, bootstrap_value, gamma, gae_lambda):
    """One Python float at a time, the way a textbook `for t in reversed(range(T))` loop runs."""
    advantages = []
    rows = zip(rewards, values, dones, bootstrap_value)
    for row_rewards, row_values, row_dones, last_value in rows:
        row = [0.0] * len(row_rewards)
        next_advantage, next_value = 0.0, last_value
        for t in reversed(range(len(row_rewards))):
            not_done = 1.0 - row_dones[t]
            delta = row_rewards[t] + gamma * next_value * not_done - row_values[t]
            next_advantage = delta + gamma * gae_lambda * not_done * next_advantage
            row[t] = next_advantage
            next_value = row_values[t]
        advantages.append(row)
    return advantages


def numpy_loop_gae(rewards, values, dones, bootstrap_value, gamma, gae_lambda):
    """Reverse loop over time, each step vectorised over the batch."""
    advantages = np.zeros_like(rewards)
    not_done = 1.0 - dones
    next_advantage = np.zeros_like(bootstrap_value)
    next_value = bootstrap_value
    for t in range(rewards.shape[1] - 1, -1, -1):
        delta = rewards[:, t] + gamma * next_value * not_done[:, t] - values[:, t]
        next_advantage = delta + gamma * gae_lambda * not_done[:, t] * next_advantage
        advantages[:, t] = next_advantage
        next_value = values[:, t]
    return advantages


def make_rollout(batch, time_steps, seed=0):
    rng = np.random.default_rng(seed)
    rewards = rng.normal(size=(batch, time_steps)).astype(np.float32)
    values = rng.normal(size=(batch, time_steps)).astype(np.float32)
    dones = (rng.random((batch, time_steps)) < 0.01).astype(np.float32)
    bootstrap_value = rng.normal(size=batch).astype(np.float32)
    return rewards, values, dones, bootstrap_value


def median_seconds(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return common.median(times)


def format_ms(seconds):
    if seconds is None:
        return "skipped"
    milliseconds = seconds * 1e3
    if milliseconds < 1:
        return f"{milliseconds:.3f}"
    return f"{milliseconds:.2f}" if milliseconds < 100 else f"{milliseconds:.0f}"


def benchmark_shape(batch, time_steps, repeats, python_budget, python_seconds_per_element):
    rewards, values, dones, bootstrap_value = make_rollout(batch, time_steps)
    row = {"shape": f"({batch}, {time_steps})"}
    reference = numpy_loop_gae(rewards, values, dones, bootstrap_value, GAMMA, GAE_LAMBDA)

    projected = python_seconds_per_element * batch * time_steps * repeats
    if projected <= python_budget:
        lists = [x.tolist() for x in (rewards, values, dones, bootstrap_value)]
        result = python_loop_gae(*lists, GAMMA, GAE_LAMBDA)
        np.testing.assert_allclose(np.array(result), reference, rtol=1e-4, atol=1e-4)
        row["python"] = median_seconds(lambda: python_loop_gae(*lists, GAMMA, GAE_LAMBDA), repeats)
    else:
        row["python"] = None
        row["python_note"] = f"projected {projected:.0f} s for {repeats} runs"

    row["numpy"] = median_seconds(
        lambda: numpy_loop_gae(rewards, values, dones, bootstrap_value, GAMMA, GAE_LAMBDA), repeats
    )

    device_inputs = [jax.device_put(x) for x in (rewards, values, dones, bootstrap_value)]
    for method in ("scan", "associative"):
        fn = jax.jit(functools.partial(gae, gamma=GAMMA, gae_lambda=GAE_LAMBDA, method=method))

        def run(fn=fn):
            r, v, d, b = device_inputs
            return fn(r, v, dones=d, bootstrap_value=b)[0].block_until_ready()

        start = time.perf_counter()
        result = run()
        row[f"{method}_compile"] = time.perf_counter() - start
        np.testing.assert_allclose(np.asarray(result), reference, rtol=1e-4, atol=1e-4)
        row[method] = median_seconds(run, repeats)
    return row


def markdown_table(rows):
    lines = [
        "| shape [batch, time] | Python loop (ms) | NumPy loop over time (ms) | jax lax.scan (ms) "
        "| jax associative_scan (ms) | scan / associative | NumPy / best jax "
        "| first call incl. compile, scan / assoc (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        best_jax = min(row["scan"], row["associative"])
        lines.append(
            f"| {row['shape']} | {format_ms(row['python'])} | {format_ms(row['numpy'])} | "
            f"{format_ms(row['scan'])} | {format_ms(row['associative'])} | "
            f"{row['scan'] / row['associative']:.2f} | {row['numpy'] / best_jax:.1f} | "
            f"{format_ms(row['scan_compile'])} / {format_ms(row['associative_compile'])} |"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=list(DEFAULT_SHAPES),
                        help="BATCHxTIME, e.g. 64x128")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--python-budget", type=float, default=20.0,
                        help="skip the pure-Python loop where its projected time exceeds this (s)")
    args = parser.parse_args()

    print("# GAE benchmark", datetime.datetime.now().isoformat(timespec="seconds"))
    for line in common.machine_info(packages=("jax",)):
        print("  " + line)
    print(f"  gamma={GAMMA}, gae_lambda={GAE_LAMBDA}, float32, episode ends with probability 0.01, "
          f"median of {args.repeats} runs")

    # Calibrate the pure-Python loop on a small rollout to project its cost per element.
    calibration = [x.tolist() for x in make_rollout(16, 256, seed=1)]
    calibration_seconds = median_seconds(lambda: python_loop_gae(*calibration, GAMMA, GAE_LAMBDA), 3)
    python_seconds_per_element = calibration_seconds / (16 * 256)

    rows = []
    for shape in args.shapes:
        batch, time_steps = (int(part) for part in shape.lower().split("x"))
        row = benchmark_shape(
            batch, time_steps, args.repeats, args.python_budget, python_seconds_per_element
        )
        if row.get("python_note"):
            print(f"  python loop skipped at {row['shape']}: {row['python_note']}")
        rows.append(row)
        print(f"  done {row['shape']}", flush=True)
    print()
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
