"""The `rlhf-jax` command: one subcommand per pipeline stage.

    rlhf-jax STAGE [--config configs/NAME.yaml] [--resume] [--print-config] [key.sub=value ...]

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
    """The config `stage` runs with: its defaults, then the `config_path` file, then `overrides`."""
    module_name, name = CONFIGS[stage]
    loader = getattr(importlib.import_module(module_name), name)
    if isinstance(loader, type):
        from rlhf_jax.pipeline.stage_configs import load_stage_config

        return load_stage_config(loader, config_path, overrides)
    return loader(config_path, overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-jax", description="RLHF in JAX: run a pipeline stage from a YAML config.")
    commands = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, _, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", default=None, help="YAML config file (defaults apply when omitted)")
        sub.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
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


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    show_warnings_as_lines()
    if args.print_config:
        return _report_errors(args.stage, lambda: print(to_yaml(resolved_config(args.stage, args.config,
                                                                                args.overrides)), end=""))
    module_name, function_name, _ = STAGES[args.stage]
    # Under a launcher or cluster (JAX_COORDINATOR_ADDRESS + RLHF_JAX_NUM_PROCESSES/PROCESS_ID, SLURM,
    # Open MPI, TPU pods) every process joins one runtime; a plain run stays single-process.
    from rlhf_jax.training.multihost import initialize_from_env

    initialize_from_env()
    run = getattr(importlib.import_module(module_name), function_name)
    return _report_errors(args.stage, lambda: run(args.config, args.overrides, resume=args.resume))


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
