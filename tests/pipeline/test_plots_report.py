"""Plots write real PNGs; reports hold the tables and relative image links."""
import os

import matplotlib
import numpy as np
import pytest

from rlhf_jax.plots import plot_curves, plot_pass_at_k
from rlhf_jax.pipeline.report import Section, markdown_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rows(scale):
    return [{"step": s, "loss": scale / s, "reward": scale * np.log(s), "kl": 0.01 * s}
            for s in range(1, 21)]


def _assert_png(path, min_width=200):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_SIGNATURE and len(data) > 2000
    width = int.from_bytes(data[16:20], "big")
    assert width >= min_width
    image = matplotlib.image.imread(path)
    assert image.std() > 0  # not a blank canvas


def test_plot_curves_single_and_overlaid_runs(tmp_path):
    backend = matplotlib.get_backend()
    path = plot_curves(_rows(1.0), ["loss", "reward", "kl"], tmp_path / "sub" / "curves.png", "SFT")
    _assert_png(path)
    assert matplotlib.get_backend() == backend  # no global backend switch
    runs = {"ppo": _rows(1.0), "dpo": _rows(2.0)[::2]}
    rows_with_gaps = [{"step": 1, "loss": float("nan")}, {"step": 2, "other": 1.0}]
    path = plot_curves({**runs, "partial": rows_with_gaps}, ["loss", "kl", "missing", "reward"],
                       tmp_path / "overlay.png", columns=2)
    _assert_png(path)
    with pytest.raises(ValueError, match="keys"):
        plot_curves(_rows(1.0), [], tmp_path / "x.png")


def test_plot_pass_at_k(tmp_path):
    ks = np.array([1, 2, 4, 8, 16, 32, 64])
    curves = {"sft": (ks, 1 - 0.9 ** ks), "ppo": (ks, 1 - 0.7 ** np.minimum(ks, 4))}
    _assert_png(plot_pass_at_k(curves, tmp_path / "pass_at_k.png"))
    with pytest.raises(ValueError, match="equal"):
        plot_pass_at_k({"bad": ([1, 2], [0.1])}, tmp_path / "bad.png")
    with pytest.raises(ValueError, match="empty"):
        plot_pass_at_k({}, tmp_path / "bad.png")


def test_markdown_table():
    rows = [{"model": "sft", "pass@1": 0.123456, "n": 64},
            {"model": "ppo|v2", "pass@1": 0.5, "kl": float("nan")}]
    text = markdown_table(rows)
    assert text.splitlines() == [
        "| model | pass@1 | n | kl |",
        "|---|---|---|---|",
        "| sft | 0.1235 | 64 |  |",
        "| ppo\\|v2 | 0.5 |  | nan |",
    ]
    assert markdown_table(rows, ["n", "model"]).splitlines()[2] == "| 64 | sft |"
    with pytest.raises(ValueError, match="no columns"):
        markdown_table([])


def test_write_report(tmp_path):
    out = tmp_path / "run"
    plots = out / "plots"
    curve = plot_curves(_rows(1.0), ["loss"], plots / "loss.png")
    pass_k = plot_pass_at_k({"sft": ([1, 2, 4], [0.2, 0.3, 0.4])}, plots / "pass_at_k.png")
    path = write_report(out / "report.md", "Quickstart report", [
        Section("Summary", text="PPO beats SFT.",
                tables=[[{"model": "sft", "pass@1": 0.25}, {"model": "ppo", "pass@1": 0.5}]]),
        {"heading": "Curves", "images": [curve, ("pass@k of SFT", pass_k)]},
    ])
    text = open(path).read()
    assert text.startswith("# Quickstart report\n")
    assert "## Summary\n\nPPO beats SFT.\n\n| model | pass@1 |\n|---|---|\n| sft | 0.25 |\n| ppo | 0.5 |" in text
    assert "![loss](plots/loss.png)" in text
    assert "![pass@k of SFT](plots/pass_at_k.png)" in text
    for link in ("plots/loss.png", "plots/pass_at_k.png"):
        assert os.path.exists(os.path.join(out, link))
    assert not os.path.exists(str(path) + ".tmp")

    with pytest.raises(FileNotFoundError, match="nope.png"):
        write_report(out / "r2.md", "x", [Section("s", images=[plots / "nope.png"])])
    with pytest.raises(ValueError, match="list of tables"):
        write_report(out / "r3.md", "x", [Section("s", tables=[{"a": 1}])])


def _policy(reward=None, **extra):
    metrics = {"pass@1": 0.5, "pass@k": {1: 0.5, 2: 0.75, 4: 0.9}, "gold_reward": 0.5, "gold_graded": 0.6,
               "response_length": 3.0, "eos_rate": 1.0, "distinct_2": 0.5, "repetition_4": 0.0, **extra}
    return metrics if reward is None else {**metrics, "reward": reward}


def test_eval_policy_table_shows_what_scored_the_samples():
    """The gold scorer: its graded reward; reward functions: their weighted sum and each mean
    (no gold column); pass@8 only when more than 8 samples were drawn."""
    from rlhf_jax.pipeline.stages.eval_report import policy_table

    gold = policy_table({"num_samples": 4, "policies": {"sft": _policy()}})[0]
    assert gold["gold reward (graded)"] == 0.6 and "pass@8" not in gold and gold["pass@4"] == 0.9
    assert "reward" not in gold
    functions = policy_table({"num_samples": 4, "policies": {"sft": _policy(
        reward=0.25, **{"reward/correct/mean": 0.2, "reward/correct/std": 0.4, "reward/format/mean": 0.3})}})[0]
    assert (functions["reward"], functions["correct"], functions["format"]) == (0.25, 0.2, 0.3)
    assert "gold reward (graded)" not in functions and "correct/std" not in functions
    many = policy_table({"num_samples": 16, "policies": {"a": _policy(**{"pass@k": {1: 0.1, 8: 0.6, 16: 0.7}})}})[0]
    assert (many["pass@8"], many["pass@16"]) == (0.6, 0.7)


def test_a_run_named_freely_gets_its_stages_curves(tmp_path):
    """`runs: {dapo: folder}`: the curves are chosen by the stage that wrote the folder's
    config.yaml (grpo here), not by the name; a folder without one falls back to the name."""
    from rlhf_jax.pipeline.stages.eval_report import _curve_keys, run_stage
    run = tmp_path / "grpo_dapo"
    run.mkdir()
    (run / "config.yaml").write_text("output_dir: x\ngrpo:\n  group_size: 4\n")
    assert run_stage(run, "dapo") == "grpo" and run_stage(tmp_path / "elsewhere", "dapo") == "dapo"
    rows = [{"step": 1, "grpo/clipfrac": 0.1, "grpo/loss": 0.2, "dynamic_sampling/dropped_fraction": 0.5,
             "reward/correct/mean": 0.3}]
    assert _curve_keys("grpo", rows) == ["grpo/loss", "grpo/clipfrac", "dynamic_sampling/dropped_fraction"]


def _write_run(folder, stage_yaml, rows):
    import json
    folder.mkdir()
    (folder / "config.yaml").write_text(stage_yaml)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(folder)


def test_runs_of_one_stage_are_compared(tmp_path):
    """Two grpo runs (named freely) get one overlay plot and a table of each curve's mean over
    its last 10% of logged rows; a stage with one run (sft) gets no comparison."""
    from rlhf_jax.pipeline.stages.eval_report import write_eval_report
    grpo = "output_dir: x\ngrpo:\n  group_size: 4\n"
    rows_a = [{"step": s, "grpo/loss": float(s), "objective/scores": 0.1 * s} for s in range(1, 21)]
    rows_b = [{"step": s, "grpo/loss": -1.0, "grpo/clipfrac": 0.5} for s in range(2, 12, 2)]
    runs = {"dapo": _write_run(tmp_path / "a", grpo, rows_a),
            "gspo": _write_run(tmp_path / "b", grpo, rows_b),
            "sft": _write_run(tmp_path / "c", "output_dir: y\nsft: {}\n", [{"step": 1, "sft/loss": 2.0}])}
    results = {"num_prompts": 2, "num_samples": 2,
               "policies": {"p": _policy(**{"pass@k": {1: 0.5, 2: 0.75}})}}
    text = open(write_eval_report(tmp_path / "eval", results, runs)).read()
    assert text.count("## Compared:") == 1 and "## Compared: grpo runs" in text
    section = text.split("## Compared: grpo runs")[1]
    # dapo: the last 2 of 20 rows (19, 20): loss 19.5, scores 1.95; gspo: its last row only.
    assert "| run | last step | objective/scores | grpo/loss | grpo/clipfrac |" in section
    assert "| dapo | 20 | 1.95 | 19.5 |  |" in section
    assert "| gspo | 10 |  | -1 | 0.5 |" in section
    _assert_png(tmp_path / "eval" / "plots" / "compare_grpo.png")
    for name in runs:
        assert f"## Training curves: {name}" in text


def test_a_run_keeps_its_colour_in_every_subplot():
    """Overlaid runs: the second run is drawn in the second colour also where the first run
    logs nothing (a metric only one variant has)."""
    from rlhf_jax.plots import curves_figure
    runs = {"a": [{"step": 1, "loss": 1.0}], "b": [{"step": 1, "loss": 2.0, "clipfrac": 0.1}]}
    loss_axis, clip_axis = curves_figure(runs, ["loss", "clipfrac"]).axes
    assert [line.get_color() for line in loss_axis.get_lines()] == ["C0", "C1"]
    assert [(line.get_label(), line.get_color()) for line in clip_axis.get_lines()] == [("b", "C1")]
