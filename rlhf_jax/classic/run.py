"""Command-line driver for classic RL: train over several seeds at once, report, plot.

    python -m rlhf_jax.classic.run --config configs/classic_ppo.yaml total_timesteps=200000

`run_classic` (behind the `rlhf-jax classic` subcommand) vmaps the training over
`config.seeds` and runs it in jitted chunks of `log_every` updates (one compilation serves
every chunk, the shorter last one included) so it can print a progress line between chunks.
It writes `metrics.json` and `learning_curve.png` to `output_dir`.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.classic.config import ClassicConfig, derived_sizes, load_classic_config
from rlhf_jax.classic.train import make_train_parts
from rlhf_jax.plots import plot_curves
from rlhf_jax.typed_config import ConfigError, to_dict

FINAL_WINDOW_FRACTION = 0.1  # final return = mean over episodes ended in the last 10% of updates


def make_chunk_runner(config: ClassicConfig, chunk_length: int):
    """`(init, run_chunk)` vmapped over seeds: `run_chunk(runners, count)` applies `count`
    (<= chunk_length, unbatched) updates inside a scan of fixed length, so a shorter final
    chunk reuses the same compiled function."""
    init, update = make_train_parts(config)

    def run_chunk(runner, count):
        metrics_shape = jax.eval_shape(lambda r: update(r)[1], runner)
        skipped = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), metrics_shape)

        def step(runner, index):
            return jax.lax.cond(index < count, update, lambda r, _: (r, skipped), runner, None)

        return jax.lax.scan(step, runner, jnp.arange(chunk_length))

    return jax.vmap(init), jax.vmap(run_chunk, in_axes=(0, None))


def windowed_returns(return_sums, counts):
    """Mean episode return over a window: sum of returns / number of episodes (NaN if none)."""
    counts = np.sum(counts, axis=-1)
    return np.where(counts > 0, np.sum(return_sums, axis=-1) / np.maximum(counts, 1), np.nan)


def _json_safe(value):
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (float, np.floating)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


CURVE_KEYS = ("episode/return", "episode/length", "loss/policy", "loss/value", "entropy/mean")


def smoothed_returns(return_sums, counts, window: int):
    """Per update u: mean return of the episodes that ended in updates (u - window, u]."""
    num_updates = return_sums.shape[-1]
    return np.stack([windowed_returns(return_sums[..., max(0, u - window + 1):u + 1],
                                      counts[..., max(0, u - window + 1):u + 1])
                     for u in range(num_updates)], axis=-1)


def save_learning_curve(path: Path, env_steps, metrics: dict, seeds, *, title: str,
                        smoothing: int) -> str:
    """Per-seed curves (episode return smoothed over `smoothing` updates, losses) vs env steps."""
    returns = smoothed_returns(metrics["episode/return_sum"], metrics["episode/count"], smoothing)
    runs = {}
    for row, seed in enumerate(seeds):
        runs[f"seed {seed}"] = [
            {"env_steps": int(steps), "episode/return": float(returns[row, u]),
             **{key: float(metrics[key][row, u]) for key in CURVE_KEYS[1:] if key in metrics}}
            for u, steps in enumerate(env_steps)]
    keys = [key for key in CURVE_KEYS if key == "episode/return" or key in metrics]
    return plot_curves(runs, keys, path, title, x_key="env_steps")


def run_classic(config_path: str | Path | None = None, overrides: Sequence[str] = (), *,
                resume: bool = False, verbose: bool = True) -> dict:
    """Train `config.algorithm` on `config.env_name` for every seed in `config.seeds`.

    Returns a dict with the config, timings (`compile_seconds`, `train_seconds`),
    `env_steps` per update, `episode_return` per seed and update, every training metric
    (`metrics[key]` is `[seed, update]`), `final_return` per seed (mean over the episodes
    that ended in the last 10% of updates), the paths written, and `runner_state` (the
    final vmapped training state; not written to JSON). A classic run is one jitted function and keeps no checkpoints,
    so `resume=True` is refused.
    """
    if resume:
        raise ConfigError("classic runs keep no checkpoints; --resume is not supported")
    config = load_classic_config(config_path, overrides)
    sizes = derived_sizes(config)
    chunk_length = min(config.log_every, sizes.num_updates)
    say = print if verbose else (lambda *args, **kwargs: None)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    init, run_chunk = make_chunk_runner(config, chunk_length)
    rngs = jax.vmap(jax.random.PRNGKey)(jnp.asarray(config.seeds))
    say(f"classic {config.algorithm} on {config.env_name}: seeds {config.seeds}, "
        f"{sizes.num_updates} updates x {sizes.batch_size} steps per seed")
    start = time.perf_counter()
    runner = jax.jit(init)(rngs)
    compiled_chunk = jax.jit(run_chunk, donate_argnums=0).lower(runner, 0).compile()
    compile_seconds = time.perf_counter() - start
    say(f"compiled in {compile_seconds:.1f}s")

    chunks = []
    train_start = time.perf_counter()
    done = 0
    while done < sizes.num_updates:
        count = min(chunk_length, sizes.num_updates - done)
        runner, metrics = compiled_chunk(runner, count)
        metrics = jax.tree.map(lambda x: np.asarray(x)[:, :count], jax.device_get(metrics))
        chunks.append(metrics)
        done += count
        chunk_returns = windowed_returns(metrics["episode/return_sum"], metrics["episode/count"])
        returns_text = " ".join("   n/a" if np.isnan(r) else f"{r:6.1f}" for r in chunk_returns)
        say(f"update {done:5d}/{sizes.num_updates} | env steps {done * sizes.batch_size:9d} | "
            f"return per seed [{returns_text}] | elapsed {time.perf_counter() - start:6.1f}s",
            flush=True)
    train_seconds = time.perf_counter() - train_start

    metrics = {key: np.concatenate([chunk[key] for chunk in chunks], axis=1) for key in chunks[0]}
    window = max(1, int(round(sizes.num_updates * FINAL_WINDOW_FRACTION)))
    final_return = windowed_returns(metrics["episode/return_sum"][:, -window:],
                                    metrics["episode/count"][:, -window:])
    env_steps = (np.arange(sizes.num_updates) + 1) * sizes.batch_size
    curve_path = output_dir / "learning_curve.png"
    save_learning_curve(curve_path, env_steps, metrics, config.seeds,
                        title=f"{config.algorithm} on {config.env_name}",
                        smoothing=max(1, sizes.num_updates // 50))
    results = {
        "config": to_dict(config),
        "compile_seconds": compile_seconds,
        "train_seconds": train_seconds,
        "total_seconds": compile_seconds + train_seconds,
        "env_steps": env_steps,
        "final_window_updates": window,
        "final_return": final_return,
        "episode_return": metrics["episode/return"],
        "episode_count": metrics["episode/count"],
        "metrics": {key: value for key, value in metrics.items() if key != "env_steps"},
        "learning_curve": str(curve_path),
        "metrics_json": str(output_dir / "metrics.json"),
    }
    Path(results["metrics_json"]).write_text(json.dumps(_json_safe(results)))
    say(f"final return per seed (last {window} updates): "
        f"{' '.join(f'{r:.1f}' for r in final_return)} | total {results['total_seconds']:.1f}s")
    say(f"wrote {curve_path} and {results['metrics_json']}")
    results["runner_state"] = runner
    return results


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description="Classic RL (PPO / REINFORCE) on gymnax environments.")
    parser.add_argument("--config", default=None, help="YAML config (defaults when omitted)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. learning_rate=0.001")
    args = parser.parse_args(argv)
    return run_classic(args.config, args.overrides)


if __name__ == "__main__":
    main()
