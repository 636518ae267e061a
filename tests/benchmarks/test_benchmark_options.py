"""Options and printed text of the benchmark scripts, without running a benchmark:
`loss_variants.py` (loss options, the write refusal, table and plot labels, the sweep table),
the shared `--write` / `--no-write` flags and command line, `train_step.py`'s section,
`memory.py`'s header and `vs_trl.py`'s description of what ran."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import common  # noqa: E402
import loss_variants  # noqa: E402


def no_writing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("RESULTS.md written")
    monkeypatch.setattr(common, "write_section", refuse)


def test_write_flags_and_command_line():
    parser = argparse.ArgumentParser()
    common.add_write_flags(parser, "--write-results")
    assert parser.parse_args([]).write is False
    assert parser.parse_args(["--no-write"]).write is False
    assert parser.parse_args(["--write"]).write is True and parser.parse_args(["--write-results"]).write is True
    with pytest.raises(SystemExit):
        parser.parse_args(["--write", "--no-write"])
    assert "(default:" not in parser.format_help()
    assert common.command_line("memory.py", ["--models", "probe", "--collect", "a b.log"]) == (
        "python benchmarks/memory.py --models probe --collect 'a b.log'")


def test_loss_variants_defaults_and_help():
    args = loss_variants.parse_args([])
    assert args.sft_steps == 3000 and args.warmup_steps == 5 and args.write is False
    assert args.loss_options == loss_variants.LOSS_DEFAULTS
    assert loss_variants.parse_args(["--write-results"]).write is True


def test_loss_variants_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        loss_variants.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for phrase in ("--steps STEPS training steps of every run (default: 60)", "(default: 3000)",
                   "(default: 0.1; simpo 2.0)", "(default: 0.0; robust 0.1)", "(default: [0.03, 0.3])",
                   "--write, --write-results"):
        assert phrase in text, phrase


def test_loss_options_go_to_the_losses_that_read_them():
    args = loss_variants.parse_args([
        "--loss-types", "sigmoid", "robust", "ipo", "simpo", "orpo", "kto", "--beta", "0.2", "simpo=2.5",
        "--label-smoothing", "sigmoid=0.1", "--target-margin", "1.0", "--odds-ratio-coef", "0.3",
        "--divergence", "ipo=alpha", "--alpha", "0.25", "--warmup-steps", "0", "--sweep-betas"])
    options = args.loss_options
    assert options["sigmoid"] == {"beta": 0.2, "label_smoothing": 0.1}
    assert options["robust"] == {"beta": 0.2, "label_smoothing": 0.1}  # its default 0.1 kept
    assert options["ipo"] == {"beta": 0.2, "divergence": "alpha", "alpha": 0.25}  # alpha: only the alpha divergence
    assert options["simpo"] == {"beta": 2.5, "target_margin": 1.0}
    assert options["orpo"] == {"odds_ratio_coef": 0.3}  # ORPO reads no beta
    assert options["kto"] == {"beta": 0.2}
    assert args.warmup_steps == 0 and args.sweep_betas == []
    settings = loss_variants.Settings("m", "t", "p", None, "o", loss_types=tuple(args.loss_types),
                                      sweep_betas=(), loss_options=options)
    assert loss_variants.runs_to_do(settings) == [("sigmoid", 0.2), ("robust", 0.2), ("ipo", 0.2), ("simpo", 2.5),
                                                  ("orpo", 0.1), ("kto", 0.2)]
    assert settings.config("simpo").target_margin == 1.0 and settings.config("orpo").odds_ratio_coef == 0.3
    text = loss_variants.loss_settings_text(settings)
    assert "orpo: odds_ratio_coef 0.3" in text and "simpo: beta 2.5, label_smoothing 0, target_margin 1" in text


@pytest.mark.parametrize("argv, message", [
    (["--loss-types", "sigmoid", "--target-margin", "1"], "none of the losses run (sigmoid) reads `target_margin`"),
    (["--loss-types", "sigmoid", "orpo", "--beta", "orpo=1"], "orpo does not read `beta`"),
    (["--loss-types", "sigmoid", "--beta", "ipo=1"], "'ipo' is not among the losses run"),
    (["--loss-types", "robust", "--label-smoothing", "0.6"], "[0, 0.5)"),
    (["--loss-types", "aot", "--divergence", "js"], "supports only divergence='reverse_kl'"),
    (["--beta", "x"], "'x' is not a float"),
    (["--train-data", "pairs.jsonl"], "--train-data needs --model"),
    (["--model", "m", "--train-data", "t"], "--model needs --train-data and --eval-prompts"),
    (["--model", "m", "--train-data", "t", "--eval-prompts", "p", "--write-results"],
     "--write records the built-in benchmark"),
    (["--model", "m", "--train-data", "t", "--eval-prompts", "p", "--write"], "keeps its results in --out"),
])
def test_loss_variants_refusals(argv, message, capsys):
    with pytest.raises(SystemExit):
        loss_variants.parse_args(argv)
    assert message in capsys.readouterr().err


def entry(loss, beta, kl, quality, *, main=True, score="graded"):
    metrics = {key: (quality, 0.01) for key in ("pass@1", "gold_reward", "win_rate", "accuracy")}
    return {"loss": loss, "beta": beta, "seeds": 1, "main": main, "score": score, **metrics,
            "kl": (kl, 0.01), "margin": (kl, 0.0)}


def summary(score="graded", sweep=False):
    rows = [entry("sft", 0.0, 0.0, 0.4, score=score), entry("sigmoid", 0.1, 0.58, 0.19, score=score),
            entry("ipo", 0.1, 0.55, 0.22, score=score), entry("simpo", 2.0, 0.47, 0.22, score=score),
            entry("kto", 0.1, 0.65, 0.22, score=score), entry("orpo", 0.1, 0.5, 0.2, score=score)]
    if sweep:
        rows.append(entry("sigmoid", 0.3, 0.3, 0.25, main=False, score=score))
    return rows


def test_tables_label_the_score_and_show_the_sweep_only_with_one():
    main, sweep = loss_variants.markdown_tables(summary())
    assert "| gold reward (graded) |" in main.splitlines()[0] and sweep == ""
    assert "| orpo | - |" in main and "| simpo | 2 |" in main
    main, sweep = loss_variants.markdown_tables(summary("exact", sweep=True))
    assert "| gold reward (exact match) |" in main.splitlines()[0]
    assert "| sigmoid | 0.3 |" not in main
    assert [line.split(" | ")[:2] for line in sweep.splitlines()[2:]] == [["| sigmoid", "0.1"], ["| sigmoid", "0.3"]]
    settings = loss_variants.Settings("m", "t", "p", None, "o", loss_types=("sigmoid", "ipo", "simpo", "kto", "orpo"))
    text = loss_variants.results_section(settings, summary("exact"), "cmd", ["info"], 1.0, "frontier.png")
    assert "exact match of the response with the prompt's `answer`" in text and "Beta sweep" not in text
    assert "![gold reward (exact match) and pass@1 against KL](frontier.png)" in text
    assert "no held-out pairs" in text
    text = loss_variants.results_section(settings, summary(sweep=True), "cmd", ["info"], 1.0, "frontier.png")
    assert "graded score" in text and "Beta sweep (DPO = sigmoid, IPO, hinge):" in text


@pytest.mark.parametrize("score", ["graded", "exact"])
def test_plot_labels_sit_on_their_own_points(score):
    import matplotlib.pyplot as plt

    points = [e for e in summary(score, sweep=True) if e["main"]]
    figure = loss_variants.frontier_figure(summary(score, sweep=True))
    try:
        for axis, key in zip(figure.axes[:2], ("gold_reward", "pass@1")):
            labels = {text.get_text(): text for text in axis.texts}
            assert sorted(labels) == sorted(e["loss"] for e in points)
            for e in points:
                annotation = labels[e["loss"]]
                assert annotation.xy == (e["kl"][0], e[key][0])  # tied to its own point
                assert annotation.arrow_patch is not None  # by a leader line
        assert figure.axes[0].get_ylabel() == "mean " + loss_variants.SCORE_LABELS[score]
        legend = [text.get_text() for text in figure.axes[1].get_legend().get_texts()]
        assert sorted(legend) == sorted([e["loss"] for e in points] + ["sigmoid: beta 0.1, 0.3"])
        markers = [line for line in figure.axes[0].lines if line.get_marker() in "*osD^vP<>Xh"]  # not the caps
        assert len(markers) == len(points)
        assert len({(str(line.get_color()), line.get_marker()) for line in markers}) == len(points)  # one style each
    finally:
        plt.close(figure)


def test_train_step_section_holds_only_what_was_measured():
    import train_step

    row = dict(name="sft", step_ms=1.0, best_step_ms=1.0, tokens_per_s=1.0, gflop=1.0, gflops=1.0, peak_gflops=1.0,
               fraction=0.5, cpu_fraction=0.5)
    text = train_step.section([row], [], ["cpu: x"], "python benchmarks/train_step.py --repeats 2", 3.0)
    assert text.startswith(train_step.SECTION)
    assert "Command: `python benchmarks/train_step.py --repeats 2`" in text and "| sft | 1 |" in text
    assert "Reading it" not in text and "PPO iteration" not in text
    ppo = [dict(phase="update", seconds=1.0, tokens=2, tokens_per_s=2.0)]
    assert "PPO iteration (`benchmarks/ppo_iteration.py`)" in train_step.section([row], ppo, [], "c", 3.0)


def test_memory_header_shows_the_command(tmp_path, monkeypatch, capsys):
    import memory

    no_writing(monkeypatch)
    log = tmp_path / "memory.log"
    case = dict(model="probe", step="sft", head="full", tokens=1024, finetune="full", attention="auto",
                executed=False, xla_estimate_gb=1.0, temp_gb=0.5, process_peak_kb=1024)
    log.write_text("noise\n" + json.dumps(case) + "\n")
    memory.main(["--collect", str(log), "--no-write"])
    out = capsys.readouterr().out
    assert f"`python benchmarks/memory.py --collect {log} --no-write` (the cases logged in {log}; models probe)." in out


def test_vs_trl_describes_only_the_rows_that_ran():
    import vs_trl

    config = SimpleNamespace(vocab_size=256, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128)
    setup = SimpleNamespace(config=config, prompt_length=16, response_length=16, ppo_prompt_ids=np.zeros((8, 9)))
    hp = vs_trl.Hyperparameters(batch_size=4, ppo_batch_size=8, ppo_response_length=8)
    args = SimpleNamespace(steps=3, ppo_steps=4, rounds=1, warmup=1)
    dpo = vs_trl.model_sentence(["dpo"], hp, setup, args)
    assert "DPO: 4 pairs per step" in dpo and "PPO" not in dpo and "1 alternating rounds of 3 timed steps per" in dpo
    ppo = vs_trl.model_sentence(["ppo"], hp, setup, args)
    assert "pairs" not in ppo and "PPO: 8 prompts of 9 tokens" in ppo and "of 4 timed PPO iterations per" in ppo
    both = vs_trl.model_sentence(["dpo", "reward", "ppo"], hp, setup, args)
    assert "DPO / reward: 4 pairs" in both and "3 timed steps and 4 timed PPO iterations" in both
