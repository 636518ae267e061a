"""`rlhf-jax STAGE --print-config`: the resolved config (every key) as YAML on stdout, a file
the stage reads back to the same config; nothing runs; a bad key is one config-error line."""
import pytest
import yaml

from rlhf_jax.pipeline import cli
from rlhf_jax.typed_config import to_dict


def run_cli(capsys, *argv):
    capsys.readouterr()
    code = cli.main([str(arg) for arg in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("stage", sorted(cli.STAGES))
def test_every_stage_prints_a_config_it_reads_back(stage, tmp_path, capsys):
    assert set(cli.CONFIGS) == set(cli.STAGES)
    code, out, err = run_cli(capsys, stage, "--print-config", f"output_dir={tmp_path / 'run'}")
    assert code == 0 and err == "", err
    printed = yaml.safe_load(out)
    assert printed == to_dict(cli.resolved_config(stage, None, [f"output_dir={tmp_path / 'run'}"]))
    assert printed["output_dir"] == str(tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing ran
    config_file = tmp_path / "printed.yaml"
    config_file.write_text(out)
    code, again, _ = run_cli(capsys, stage, "--print-config", "--config", config_file)
    assert code == 0 and again == out


def test_overrides_and_file_values_show_and_a_bad_key_is_one_line(tmp_path, capsys):
    config_file = tmp_path / "grpo.yaml"
    config_file.write_text("train: {iterations: 7}\ngrpo: {group_size: 8}\n")
    code, out, _ = run_cli(capsys, "grpo", "--print-config", "--config", config_file, "grpo.group_size=16",
                           "logging.wandb=true")
    printed = yaml.safe_load(out)
    assert code == 0
    assert (printed["train"]["iterations"], printed["grpo"]["group_size"], printed["logging"]["wandb"]) == (7, 16, True)
    assert printed["grpo"]["sampling"]["max_new_tokens"] == 32  # a default
    code, out, err = run_cli(capsys, "grpo", "--print-config", "train.batchsize=3")
    lines = err.strip().splitlines()
    assert code == 2 and out == "" and len(lines) == 1
    assert lines[0].startswith("rlhf-jax grpo: config error: unknown config key 'train.batchsize'"), lines[0]


def test_flags_and_overrides_mix_in_any_order(tmp_path, capsys):
    """Overrides after a flag are overrides too (argparse alone: "unrecognized arguments")."""
    config_file = tmp_path / "dpo.yaml"
    config_file.write_text("seed: 5\n")
    code, out, err = run_cli(capsys, "dpo", "train.steps=7", "--resume", "seed=3", "--config", config_file,
                             "train.batch_size=4", "--print-config", "train.steps=9")
    printed = yaml.safe_load(out)
    assert code == 0 and err == "", err
    assert (printed["seed"], printed["train"]["steps"], printed["train"]["batch_size"]) == (3, 9, 4)  # later wins
    args = cli.parse_args(["dpo", "a=1", "--resume", "b=2"])
    assert (args.stage, args.resume, args.overrides, args.config) == ("dpo", True, ["a=1", "b=2"], None)
    with pytest.raises(SystemExit):
        cli.parse_args(["dpo", "a=1", "--bogus"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


@pytest.mark.parametrize("stage, overrides, total_steps", [
    ("sft", ["train.steps=7"], 7),
    ("dpo", ["train.steps=3", "optim.warmup_steps=10"], 3),  # warmup capped below the run's length
    ("grpo", ["train.iterations=5", "grpo.epochs=2", "grpo.num_minibatches=4"], 40),
    ("ppo", ["train.iterations=5", "ppo.epochs=3", "ppo.num_minibatches=2", "value_optim={learning_rate: 0.1}"], 30),
])
def test_the_schedule_length_is_the_runs(stage, overrides, total_steps, tmp_path, capsys):
    """`optim.total_steps` shows the length the stage's schedule has (not the default 1000),
    and the printed file reads back (warmup capped below it, as the stage runs it)."""
    code, out, err = run_cli(capsys, stage, "--print-config", *overrides)
    printed = yaml.safe_load(out)
    assert code == 0 and err == "", err
    assert printed["optim"]["total_steps"] == total_steps
    assert printed["optim"]["warmup_steps"] < total_steps
    if stage == "ppo":
        assert printed["value_optim"]["total_steps"] == total_steps
    config_file = tmp_path / "printed.yaml"
    config_file.write_text(out)
    code, again, err = run_cli(capsys, stage, "--print-config", "--config", config_file)
    assert code == 0 and again == out, err


def test_the_quickstart_sections_show_their_schedule_lengths(capsys):
    code, out, _ = run_cli(capsys, "quickstart", "--print-config", "sft.train.steps=11", "grpo.train.iterations=2")
    printed = yaml.safe_load(out)
    assert code == 0 and printed["sft"]["optim"]["total_steps"] == 11
    grpo = printed["grpo"]
    assert grpo["optim"]["total_steps"] == 2 * grpo["grpo"]["epochs"] * grpo["grpo"]["num_minibatches"]


def test_resume_without_config_reads_the_runs_config_yaml(tmp_path, capsys, monkeypatch):
    """`--resume` without `--config`: `<output_dir>/config.yaml` is the config file (its
    `train.stop_after` reset), the overrides on top; an explicit `--config` wins."""
    run = tmp_path / "run"
    run.mkdir()
    _, saved, _ = run_cli(capsys, "sft", "--print-config", f"output_dir={run}", "train.steps=7", "train.stop_after=3",
                          "seed=4", "tokenizer=tok")
    (run / "config.yaml").write_text(saved)
    code, out, err = run_cli(capsys, "sft", "--resume", f"output_dir={run}", "--print-config", "train.batch_size=5")
    printed = yaml.safe_load(out)
    assert code == 0 and err == "", err
    assert (printed["seed"], printed["tokenizer"], printed["train"]["steps"], printed["optim"]["total_steps"]) == \
        (4, "tok", 7, 7)
    assert (printed["train"]["batch_size"], printed["train"]["stop_after"]) == (5, None)
    assert yaml.safe_load(run_cli(capsys, "sft", "--print-config", f"output_dir={run}")[1])["seed"] == 0  # no --resume
    other = tmp_path / "other.yaml"
    other.write_text("seed: 9\n")
    out = run_cli(capsys, "sft", "--resume", "--print-config", "--config", other, f"output_dir={run}")[1]
    assert yaml.safe_load(out)["seed"] == 9 and yaml.safe_load(out)["tokenizer"] is None
    # the stage's default output_dir (runs/sft), even when the file names the folder the run was moved from
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    run.rename(tmp_path / "runs" / "sft")
    printed = yaml.safe_load(run_cli(capsys, "sft", "--resume", "--print-config")[1])
    assert (printed["seed"], printed["output_dir"]) == (4, "runs/sft")
    # another stage's config.yaml is not read as this stage's (dpo: its resume check names the folder)
    printed = yaml.safe_load(run_cli(capsys, "dpo", "--resume", "--print-config", "output_dir=runs/sft")[1])
    assert (printed["seed"], printed["output_dir"]) == (0, "runs/sft")


def test_resume_without_config_reads_the_quickstarts_config_yaml(tmp_path, capsys):
    run = tmp_path / "qs"
    run.mkdir()
    _, saved, _ = run_cli(capsys, "quickstart", "--print-config", f"output_dir={run}", "seed=4",
                          "sft.train.stop_after=2", "stages=[sft]")
    (run / "config.yaml").write_text(saved)
    printed = yaml.safe_load(run_cli(capsys, "quickstart", "--resume", "--print-config", f"output_dir={run}")[1])
    assert (printed["seed"], printed["stages"], printed["sft"]["train"]["stop_after"]) == (4, ["sft"], None)
