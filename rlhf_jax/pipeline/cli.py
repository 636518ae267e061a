"""The `rlhf-jax` command: one subcommand per pipeline stage.

    rlhf-jax STAGE [--config configs/NAME.yaml] [--resume] [key.sub=value ...]

Each stage is a function `run(config_path, overrides, *, resume) -> dict` in its own module,
imported only when its subcommand runs, so `rlhf-jax --help` stays fast.

A problem the user can fix (a bad config key, data file, model or tokenizer folder, an
unwritable output directory, no readable checkpoint to resume, a run whose training went
non-finite) ends the command with one line `rlhf-jax <stage>: <kind> error: <message>` on
stderr and exit code 2; anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# transformers warns "PyTorch was not found" at import on installs without torch (which a JAX
# run does not need); its advisory warnings are off for the command.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

from rlhf_jax.models.errors import ModelError
from rlhf_jax.typed_config import ConfigError
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhf-jax", description="RLHF in JAX: run a pipeline stage from a YAML config.")
    commands = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name, (_, _, help_text) in STAGES.items():
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--config", default=None, help="YAML config file (defaults apply when omitted)")
        sub.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
        sub.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    module_name, function_name, _ = STAGES[args.stage]
    # Under a launcher or cluster (JAX_COORDINATOR_ADDRESS + RLHF_JAX_NUM_PROCESSES/PROCESS_ID, SLURM,
    # Open MPI, TPU pods) every process joins one runtime; a plain run stays single-process.
    from rlhf_jax.training.multihost import initialize_from_env

    initialize_from_env()
    run = getattr(importlib.import_module(module_name), function_name)
    try:
        run(args.config, args.overrides, resume=args.resume)
    except tuple(error for error, _ in USER_ERRORS) as err:
        kind = next(kind for error, kind in USER_ERRORS if isinstance(err, error))
        message = " ".join(str(err).split())  # one line, whatever the message held
        print(f"rlhf-jax {args.stage}: {kind} error: {message}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
