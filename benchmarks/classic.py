"""Classic RL benchmark: PPO (and REINFORCE) on CartPole-v1, every seed in one vmapped jit.

Runs `jax.jit(jax.vmap(make_train(config)))(seed_keys)` for the PPO config (3 seeds by
default), timing compilation and training separately (wall clock and process CPU time, since
the machines here are shared), and reports per seed the final mean episode return (episodes
that ended in the last 10% of updates) and the first environment step where the return,
averaged over a sliding window of updates, reached 475. The REINFORCE-with-baseline config
runs the same way and reports its starting and final returns.

    python benchmarks/classic.py --write         # print, and write the "## Classic RL"
                                                 # section of benchmarks/RESULTS.md
    python benchmarks/classic.py learning_rate=0.0005   # print only; overrides apply to the PPO config
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

from rlhf_jax.classic.config import derived_sizes, load_classic_config  # noqa: E402
from rlhf_jax.classic.run import smoothed_returns, windowed_returns  # noqa: E402
from rlhf_jax.classic.train import make_train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Classic RL"
SOLVED = 475.0


def machine_lines() -> list[str]:
    return [f"cpu: {common.cpu_name()}", f"cores: {os.cpu_count()}",
            f"load average (1/5/15 min): {common.load_average()}",
            f"python: {platform.python_version()}, jax: {jax.__version__}, "
            f"backend: {jax.default_backend()}"]


def benchmark(config_path: Path, overrides: list[str]) -> dict:
    """Compile and run one config over its seeds; returns timings and per-seed returns."""
    config = load_classic_config(config_path, overrides)
    sizes = derived_sizes(config)
    rngs = jax.vmap(jax.random.PRNGKey)(jnp.asarray(config.seeds))
    train = jax.jit(jax.vmap(make_train(config)))
    compiled, compile_wall, compile_cpu = common.timed(lambda: train.lower(rngs).compile())
    (_, metrics), run_wall, run_cpu = common.timed(lambda: jax.block_until_ready(compiled(rngs)))
    sums = np.asarray(metrics["episode/return_sum"])
    counts = np.asarray(metrics["episode/count"])
    tenth = max(1, sizes.num_updates // 10)
    twentieth = max(1, sizes.num_updates // 20)
    smoothed = smoothed_returns(sums, counts, twentieth)
    solved_steps = []
    for row in smoothed:
        hits = np.flatnonzero(row >= SOLVED)
        solved_steps.append(None if hits.size == 0 else int((hits[0] + 1) * sizes.batch_size))
    return {
        "config": config, "sizes": sizes, "seeds": list(config.seeds),
        "compile_wall": compile_wall, "compile_cpu": compile_cpu,
        "run_wall": run_wall, "run_cpu": run_cpu,
        "env_steps": sizes.num_updates * sizes.batch_size,
        "start_return": windowed_returns(sums[:, :tenth], counts[:, :tenth]),
        "final_return": windowed_returns(sums[:, -tenth:], counts[:, -tenth:]),
        "smoothing_updates": twentieth, "final_updates": tenth,
        "solved_steps": solved_steps,
    }


def seconds_to_solve(result: dict, steps: int | None) -> str:
    """Compile time plus the training time up to `steps` (each update costs the same)."""
    if steps is None:
        return "never"
    share = steps / result["env_steps"]
    return f"{result['compile_wall'] + share * result['run_wall']:.1f}"


def ppo_table(result: dict) -> str:
    rows = ["| seed | final return | env steps to reach 475 | wall s to reach 475 (compile incl.) |",
            "|---:|---:|---:|---:|"]
    for seed, final, steps in zip(result["seeds"], result["final_return"], result["solved_steps"]):
        rows.append(f"| {seed} | {final:.1f} | {steps if steps is not None else 'never'} | "
                    f"{seconds_to_solve(result, steps)} |")
    return "\n".join(rows)


def timing_line(name: str, result: dict) -> str:
    r = result
    total = r["compile_wall"] + r["run_wall"]
    return (f"{name}: {len(r['seeds'])} seeds x {r['env_steps']} env steps "
            f"({r['sizes'].num_updates} updates of {r['sizes'].batch_size}); compile "
            f"{r['compile_wall']:.1f} s wall ({r['compile_cpu']:.1f} s CPU), training "
            f"{r['run_wall']:.1f} s wall ({r['run_cpu']:.1f} s CPU), total {total:.1f} s; "
            f"{len(r['seeds']) * r['env_steps'] / r['run_wall']:,.0f} env steps/s excl. compile")


def section(ppo: dict, reinforce: dict | None, machine: list[str], command: str,
            stamp: str) -> str:
    c = ppo["config"]
    lines = [
        SECTION, "",
        f"PPO on CartPole-v1 with `configs/classic_ppo.yaml` ({c.num_envs} envs x {c.num_steps} "
        f"steps per rollout, {c.epochs} epochs x {c.num_minibatches} minibatches, lr "
        f"{c.learning_rate} annealed={c.anneal_lr}, gamma {c.gamma}, lambda {c.gae_lambda}), every seed "
        "trained at once by `jax.jit(jax.vmap(make_train(config)))`: rollouts, GAE, epochs and "
        "minibatches are `lax.scan`s inside one compiled function. \"Final return\" is the mean "
        f"return of the episodes that ended in the last {ppo['final_updates']} updates (10%); "
        f"\"reach 475\" is the first update where the mean over the last "
        f"{ppo['smoothing_updates']} updates is >= 475, its wall time = compile + that share "
        "of the training time (every update costs the same).", "",
        f"Command: `{command}` ({stamp})", "", "```", *machine, "```", "",
        ppo_table(ppo), "", "- " + timing_line("PPO", ppo),
    ]
    if reinforce is not None:
        rc = reinforce["config"]
        starts = " / ".join(f"{x:.1f}" for x in reinforce["start_return"])
        finals = " / ".join(f"{x:.1f}" for x in reinforce["final_return"])
        lines += [
            "- " + timing_line("REINFORCE with baseline", reinforce),
            f"- REINFORCE with baseline (`configs/classic_reinforce.yaml`, {rc.num_envs} envs x "
            f"{rc.num_steps} steps, lr {rc.learning_rate}): mean return over the first 10% of updates "
            f"{starts} -> last 10% {finals} (seeds {reinforce['seeds']}).",
        ]
    lines += [
        "", "Reading it:", "",
        "- Wall times depend on how busy the shared 2-core machine was (load averages above); "
        "the process CPU seconds are the steadier figure, and on an idle machine the wall time "
        "is close to them.",
        "- Compilation is a large share of a short run: the whole training (initialisation, "
        "rollout, GAE, epochs, minibatches) is one XLA program, compiled once for all seeds.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "classic_ppo.yaml"))
    parser.add_argument("--reinforce-config", default=str(ROOT / "configs" / "classic_reinforce.yaml"))
    parser.add_argument("--no-reinforce", action="store_true", help="skip the REINFORCE run")
    common.add_write_flags(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides for the PPO config")
    args = parser.parse_args(argv)

    stamp = common.utc_stamp("%Y-%m-%d, %H:%M UTC")
    machine = machine_lines()
    print("# Classic RL benchmark", stamp)
    for line in machine:
        print("  " + line)
    ppo = benchmark(Path(args.config), args.overrides)
    print(timing_line("PPO", ppo))
    print(ppo_table(ppo), flush=True)
    reinforce = None
    if not args.no_reinforce:
        reinforce = benchmark(Path(args.reinforce_config), [])
        print(timing_line("REINFORCE with baseline", reinforce))
        print("REINFORCE start -> final return per seed:",
              [f"{a:.1f} -> {b:.1f}" for a, b in zip(reinforce["start_return"],
                                                       reinforce["final_return"])])
    machine_after = machine_lines()[2].replace("load average", "load average after")
    command = common.command_line("classic.py", argv)
    text = section(ppo, reinforce, machine + [machine_after], command, stamp)
    if args.write:
        common.write_section(SECTION, text, RESULTS)
        print(f"wrote the {SECTION!r} section of {RESULTS}")


if __name__ == "__main__":
    main()
