"""The `rlhf-jax` command: one subcommand per pipeline stage.

    rlhf-jax STAGE [--config configs/NAME.yaml] [--resume] [--print-config] [key.sub=value ...]

After the stage, its flags and the overrides may come in any order (`rlhf-jax dpo a=1 --resume
b=2`); later overrides of a key win. `--resume` without `--config` reads the run's own
`<output_dir>/config.yaml` as the config file (`config_and_overrides`), so `rlhf-jax sft --resume
output_dir=runs/x` continues that run with the settings it ran with.

Each stage is a function `run(config_path, overrides, *, resume) -> dict` in its own module,
imported only when its subcommand runs, so `rlhf-jax --help` stays fast. `--print-config`
prints the stage's resolved config (defaults, then the file, then the overrides) as YAML, every
key there is, and exits without running: the text is a config file the stage reads back.

A problem the user can fix (a bad config key, data file, model or tokenizer folder, an
unwritable output directory, no readable checkpoint to resume, a run whose training went
non-finite) ends the command with one line `rlhf-jax <stage>: <kind> error: <message>` on
stderr and exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

import yaml

# transformers warns "PyTorch was not found" at import on installs without torch (which a JAX
# run does not need); its advisory warnings are off for the command.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from rlhf_jax.models.errors import ModelError
from rlhf_jax.typed_config import ConfigError, to_yaml
from rlhf_jax.pipeline.data_formats import DataError
from rlhf_jax.pipeline.errors import CheckpointError, NonFiniteError, OutputError
from rlhf_jax.rewards.loading import RewardError

# What a user can fix, reported as one line `rlhf-jax <stage>: <kind> error: <message>`, exit 2.
USER_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (ConfigError, "config"), (DataError, "data"), (ModelError, "model"), (OutputError, "output"),
    (CheckpointError, "checkpoint"), (NonFiniteError, "training"), (RewardError, "reward"),
)

# subcommand -> (module, function, one-line help)
STAGES: dict[str, tuple[str, str, str]] = {
    "classic": ("rlhf_jax.classic.run", "run_classic", "PPO / REINFORCE on gymnax environments (CartPole, Acrobot)"),
    "sft": ("rlhf_jax.pipeline.stages.sft", "run", "supervised fine-tuning on prompt/completion data"),
    "reward": ("rlhf_jax.pipeline.stages.reward", "run", "train a reward model on preference pairs"),
    "ppo": ("rlhf_jax.pipeline.stages.ppo", "run", "PPO against a reward model (or the gold scorer)"),
    "dpo": ("rlhf_jax.pipeline.stages.dpo", "run", "DPO / IPO / SimPO / ... on preference pairs"),
    "grpo": ("rlhf_jax.pipeline.stages.grpo", "run", "GRPO with group-relative advantages"),
    "eval": ("rlhf_jax.pipeline.stages.evaluate", "run", "evaluate policies: pass@k, win rate, KL, report"),
    "quickstart": ("rlhf_jax.pipeline.stages.quickstart", "run",
                   "the whole pipeline on the built-in task, with a report"),
}

# subcommand -> (module, name): a config class read by `load_stage_config`, or a function
# `(config_path, overrides) -> config`
CONFIGS: dict[str, tuple[str, str]] = {
    "classic": ("rlhf_jax.classic.config", "load_classic_config"),
    "sft": ("rlhf_jax.pipeline.stage_configs", "SFTConfig"),
    "reward": ("rlhf_jax.pipeline.stage_configs", "RewardConfig"),
    "ppo": ("rlhf_jax.pipeline.stage_configs", "PPOStageConfig"),
    "dpo": ("rlhf_jax.pipeline.stage_configs", "DPOConfig"),
    "grpo": ("rlhf_jax.pipeline.stage_configs", "GRPOStageConfig"),
    "eval": ("rlhf_jax.pipeline.stage_configs", "EvalConfig"),
    "quickstart": ("rlhf_jax.pipeline.stages.quickstart", "load_quickstart_config"),
}


def resolved_config(stage: str, config_path=None, overrides=()):
    """The config `stage` runs with: its defaults, then the `config_path` file, then `overrides`,
    its optimizer schedules as long as the run (`optim.total_steps`, as config.yaml records it)."""
    module_name, name = CONFIGS[stage]
    loader = getattr(importlib.import_module(module_name), name)
    if not isinstance(loader, type):
        config = loader(config_path, overrides)
    else:
        from rlhf_jax.pipeline.stage_configs import load_stage_config

        config = load_stage_config(loader, config_path, overrides)
    from rlhf_jax.pipeline.stage_configs import with_schedule_lengths

    return with_schedule_lengths(config)


# Stages `--resume` continues; without `--config` it reads the run's `<output_dir>/config.yaml`.
RESUMABLE = ("sft", "reward", "ppo", "dpo", "grpo", "quickstart")


def config_and_overrides(stage: str, config_path, overrides, resume: bool) -> tuple[str | None, list[str]]:
    """`(config file, overrides)` a stage loads. `--resume` without `--config` continues the run
    in `output_dir` (the last `output_dir=` override, else the stage's default) with the config
    it ran with: its `config.yaml` when there is one written by this stage, with
    `train.stop_after` (one invocation's) reset to null, `output_dir` set to that folder (the
    file may name the folder the run was moved from) and then `overrides` on top. Otherwise
    `config_path` and `overrides` as given."""
    overrides = list(overrides)
    if not resume or config_path is not None or stage not in RESUMABLE:
        return config_path, overrides
    from rlhf_jax.pipeline.resume_check import PER_INVOCATION_KEYS, stage_of
    from rlhf_jax.pipeline.stage_configs import QUICKSTART_STAGES

    given = [text for text in overrides if text.startswith("output_dir=")]
    output_dir = resolved_config(stage, None, given).output_dir
    saved_file = Path(output_dir) / "config.yaml"
    if not saved_file.is_file():
        return None, overrides
    try:
        saved = yaml.safe_load(saved_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        saved = None  # loading it reports the problem, naming the file
    if isinstance(saved, dict) and stage_of(saved) not in (None, stage):
        return None, overrides  # another stage's run: the stage's resume check names it
    sections = [f"{name}." for name in QUICKSTART_STAGES if name != "eval"] if stage == "quickstart" else [""]
    resets = [f"{section}{key}=null" for section in sections for key in PER_INVOCATION_KEYS]
    if not given:  # the stage's default folder
        resets.append(f"output_dir={output_dir}")
    return str(saved_file), resets + overrides


def build_parser() -> argparse.ArgumentParser:
    """The `rlhf-jax` parser, one subparser per stage (also in its `stage_parsers`, by name)."""
    parser = argparse.ArgumentParser(prog="rlhf-jax",
                                     description="RLHF in JAX: run a pipeline stage from a YAML config.")
    commands = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    parser.stage_parsers = {}
    for name, (_, _, help_text) in STAGES.items():
        sub = parser.stage_parsers[name] = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", default=None,
                         help="YAML config file (when omitted: the defaults, or with --resume the run's config.yaml)")
        sub.add_argument("--resume", action="store_true",
                         help="continue from the latest checkpoint in the output dir; without --config, the config "
                              "is the run's <output_dir>/config.yaml (output_dir from the overrides, else the "
                              "stage's default), with the overrides on top")
        sub.add_argument("--print-config", action="store_true",
                         help="print the resolved config (every key: defaults, --config, overrides) as YAML and exit")
        sub.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def show_warnings_as_lines() -> None:
    """The library's logged warnings (e.g. truncated rows, unscored batches) as one line each
    on stderr, `warning: <message>`, whatever logging set-up other packages installed."""
    logger = logging.getLogger("rlhf_jax")
    if not any(isinstance(handler, _WarningLines) for handler in logger.handlers):
        handler = _WarningLines()
        handler.setFormatter(logging.Formatter("warning: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logger.propagate = False


class _WarningLines(logging.Handler):
    """The `rlhf-jax` command's handler of the library's warnings: to the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 (logging's own convention)
            self.handleError(record)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (default `sys.argv[1:]`): the stage, then its flags and overrides in any
    order. argparse alone stops taking positionals after the first flag (`dpo a=1 --resume b=2`
    would be "unrecognized arguments: b=2"), so the stage's own arguments are read again with
    `parse_intermixed_args`."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = parser.parse_known_args(argv)[0].stage  # help, a missing or unknown stage: argparse's errors
    where = argv.index(stage)
    if where:  # the top level takes no option but --help
        parser.error(f"unrecognized arguments: {' '.join(argv[:where])}")
    return parser.stage_parsers[stage].parse_intermixed_args(argv[where + 1:], argparse.Namespace(stage=stage))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    show_warnings_as_lines()

    def source():
        return config_and_overrides(args.stage, args.config, args.overrides, args.resume)

    if args.print_config:
        return _report_errors(args.stage, lambda: print(to_yaml(resolved_config(args.stage, *source())), end=""))
    module_name, function_name, _ = STAGES[args.stage]
    # Under a launcher or cluster (JAX_COORDINATOR_ADDRESS + RLHF_JAX_NUM_PROCESSES/PROCESS_ID, SLURM,
    # Open MPI, TPU pods) every process joins one runtime; a plain run stays single-process.
    from rlhf_jax.training.multihost import initialize_from_env

    initialize_from_env()
    run = getattr(importlib.import_module(module_name), function_name)
    return _report_errors(args.stage, lambda: run(*source(), resume=args.resume))


def _report_errors(stage: str, action) -> int:
    """Run `action`: exit code 0, or 2 with one line `rlhf-jax <stage>: <kind> error: ...` on
    stderr for an error the user can fix."""
    try:
        action()
    except tuple(error for error, _ in USER_ERRORS) as err:
        kind = next(kind for error, kind in USER_ERRORS if isinstance(err, error))
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"rlhf-jax {stage}: {kind} error: {message}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
