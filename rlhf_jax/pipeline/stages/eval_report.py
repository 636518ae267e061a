"""The evaluation report: `report.md` with tables of the evaluation results, the pass@k curves
of every policy on one plot, and the training curves (loss, reward, KL) of each stage run
(`runs: {name: output_dir}`; the curves drawn are those of the stage that wrote the run's
config.yaml, whatever its name, e.g. `runs: {dapo: runs/grpo_dapo}` draws grpo's). Runs of
one stage (e.g. grpo, dapo and gspo variants) are also compared: their curves overlaid in one
plot per metric and a table of each metric's mean over the run's last logged steps.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import yaml

from rlhf_jax.pipeline.metrics_log import METRICS_FILE, read_metrics
from rlhf_jax.pipeline.resume_check import stage_of
from rlhf_jax.plots import finite_series, plot_curves, plot_pass_at_k
from rlhf_jax.pipeline.report import Section, write_report

# The curves drawn for each stage's metrics.jsonl (keys a run lacks show "no data").
CURVE_KEYS = {
    "sft": ("sft/loss", "eval/sft/loss", "sft/accuracy", "eval/sft/accuracy"),
    "reward": ("reward/loss", "reward/accuracy", "eval/reward/accuracy", "reward/margin"),
    "ppo": ("objective/scores", "objective/kl", "objective/rlhf_reward", "ppo/policy_loss",
            "value/loss", "ppo/clipfrac", "ppo/entropy", "rollout/response_length"),
    "dpo": ("dpo/loss", "dpo/accuracy", "dpo/margin", "eval/dpo/accuracy"),
    "grpo": ("objective/scores", "grpo/kl", "grpo/loss", "grpo/clipfrac", "grpo/entropy",
             "grpo/zero_std_fraction", "rollout/response_length", "dynamic_sampling/dropped_fraction"),
}
_FALLBACK_PREFIXES = ("loss", "accuracy", "score", "kl", "reward")


def run_stage(run_dir, name: str) -> str:
    """The stage that wrote the run in `run_dir` (from its config.yaml), else `name`."""
    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return name
    return (stage_of(config) if isinstance(config, dict) else None) or name


def _curve_keys(stage: str, rows: Sequence[Mapping]) -> list[str]:
    present = {key for row in rows for key in row if key != "step"}
    keys = [key for key in CURVE_KEYS.get(stage, ()) if key in present]
    if not keys:  # an unknown stage: its loss/accuracy/score/KL-like metrics
        keys = sorted(key for key in present if any(part in key for part in _FALLBACK_PREFIXES))[:6]
    return keys


def _final_value(rows: Sequence[Mapping], key: str, fraction: float = 0.1):
    """The mean of `key` over the last `fraction` of the steps that log it finite (at least
    one), which smooths the step-to-step noise of a final value; None when no step logs it."""
    _, values = finite_series(rows, key)
    if not values.size:
        return None
    tail = values[-max(1, math.ceil(fraction * len(values))):]
    return float(tail.mean())


def comparison_table(runs: Mapping[str, Sequence[Mapping]], keys: Sequence[str]) -> list[dict]:
    """One row per run: its last logged step and each key's mean over its last 10% of rows."""
    table = []
    for name, rows in runs.items():
        steps = [row["step"] for row in rows if isinstance(row.get("step"), int)]
        row = {"run": name, "last step": max(steps) if steps else None}
        row.update({key: _fmt(_final_value(rows, key), 4) for key in keys})
        table.append(row)
    return table


def _fmt(value, digits: int = 3):
    return None if value is None else round(float(value), digits)


def _scored_by_functions(results: dict) -> bool:
    """Whether reward functions (not the gold scorer) scored the samples."""
    return any("reward" in metrics for metrics in results["policies"].values())


def policy_table(results: dict) -> list[dict]:
    """One row per policy: pass@1, pass@8 (when more samples were drawn) and pass@num_samples,
    the mean score (the gold scorer's graded reward, or the reward functions' weighted sum and
    each function's mean), win rate, KL, reward-model score and the diversity metrics."""
    rows = []
    num_samples = results["num_samples"]
    by_functions = _scored_by_functions(results)
    for name, metrics in results["policies"].items():
        passes = {int(k): v for k, v in metrics["pass@k"].items()}
        row = {"policy": name, "pass@1": _fmt(metrics["pass@1"])}
        if 1 < 8 < num_samples:
            row["pass@8"] = _fmt(passes.get(8))
        if num_samples > 1:
            row[f"pass@{num_samples}"] = _fmt(passes.get(num_samples))
        if by_functions:
            row["reward"] = _fmt(metrics.get("reward"))
            row.update({key[len("reward/"):-len("/mean")]: _fmt(value) for key, value in metrics.items()
                        if key.startswith("reward/") and key.endswith("/mean")})
        else:
            row["gold reward (graded)"] = _fmt(metrics["gold_graded"])
        rows.append({
            **row,
            "win rate vs ref": _fmt(metrics.get("win_rate")),
            "KL to ref (nats)": _fmt(metrics.get("kl_to_reference")),
            "RM score": _fmt(metrics.get("reward_model_score")),
            "length": _fmt(metrics["response_length"], 2),
            "EOS rate": _fmt(metrics["eos_rate"]),
            "distinct-2": _fmt(metrics["distinct_2"]),
            "unique responses": _fmt(metrics.get("unique_responses")),
            "repetition-4": _fmt(metrics["repetition_4"]),
        })
    return rows


def pass_at_k_table(results: dict) -> list[dict]:
    rows = []
    for name, metrics in results["policies"].items():
        row = {"policy": name}
        row.update({f"k={k}": _fmt(v) for k, v in metrics["pass@k"].items()})
        rows.append(row)
    return rows


def write_eval_report(output_dir, results: dict, runs: Mapping[str, str],
                      extra_sections: Sequence[Section] = (), title: str = "rlhf_jax evaluation") -> Path:
    """Write `<output_dir>/report.md` (+ PNGs in `<output_dir>/plots`); returns its path."""
    output_dir = Path(output_dir)
    plots = output_dir / "plots"
    curves = {name: ([int(k) for k in m["pass@k"]], list(m["pass@k"].values()))
              for name, m in results["policies"].items()}
    pass_plot = plot_pass_at_k(curves, plots / "pass_at_k.png",
                               title=f"pass@k on {results['num_prompts']} held-out prompts")
    score = ("reward (the reward functions' weighted sum; a sample passes when it exceeds "
             "`reward.pass_threshold`)" if _scored_by_functions(results) else "graded gold reward")
    text = (f"{results['num_prompts']} held-out prompts, {results['num_samples']} samples each "
            f"(temperature sampling, the same random keys for every policy). pass@k uses the unbiased "
            f"estimator of Chen et al. (2021); the win rate compares each sample's {score} "
            f"with the reference policy's sample for the same prompt and key (ties count half); KL is "
            f"the mean summed log-ratio log pi - log pi_ref of the policy's own samples.")
    sections = list(extra_sections)
    sections.append(Section("Policies", text, tables=[policy_table(results)]))
    if "reward_model_accuracy" in results:
        sections.append(Section("Reward model", tables=[[{
            "held-out pair accuracy": _fmt(results["reward_model_accuracy"])}]]))
    sections.append(Section(
        "pass@k", "A curve that starts low but ends high samples diverse answers; RL usually lifts "
                  "pass@1 more than pass@k at large k.",
        tables=[pass_at_k_table(results)], images=[("pass@k", pass_plot)]))
    by_stage: dict[str, dict[str, list]] = {}
    for name, run_dir in runs.items():
        path = os.path.join(run_dir, METRICS_FILE)
        if not os.path.exists(path):
            continue
        rows = read_metrics(path)
        stage = run_stage(run_dir, name)
        keys = _curve_keys(stage, rows)
        if not rows or not keys:
            continue
        by_stage.setdefault(stage, {})[name] = rows
        image = plot_curves(rows, keys, plots / f"{name}_curves.png", title=f"{name} training")
        sections.append(Section(f"Training curves: {name}", f"`{path}`",
                                images=[(f"{name} training curves", image)]))
    sections.extend(_comparison_sections(by_stage, plots))
    return Path(write_report(output_dir / "report.md", title, sections))


def _comparison_sections(by_stage: Mapping[str, Mapping[str, list]], plots: Path) -> list[Section]:
    """For each stage with two or more runs: their curves overlaid and their final values."""
    sections = []
    for stage, stage_runs in by_stage.items():
        if len(stage_runs) < 2:
            continue
        keys = list(dict.fromkeys(key for rows in stage_runs.values() for key in _curve_keys(stage, rows)))
        image = plot_curves(stage_runs, keys, plots / f"compare_{stage}.png",
                            title=f"{stage} runs: " + ", ".join(stage_runs))
        text = (f"The {stage} runs {', '.join(f'`{name}`' for name in stage_runs)} side by side; the table "
                f"gives each metric's mean over the run's last 10% of logged steps (at least one).")
        sections.append(Section(f"Compared: {stage} runs", text, tables=[comparison_table(stage_runs, keys)],
                                images=[(f"{stage} runs compared", image)]))
    return sections
