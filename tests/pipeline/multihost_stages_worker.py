"""Run `rlhf-jax` stages one after another in one process of a launched job:

    python multihost_stages_worker.py STAGE ARGS... -- STAGE ARGS... [-- ...]

Each process joins the job (`initialize_from_env`) and runs every stage; a stage that exits
non-zero ends the worker with its code."""
import sys

from rlhf_jax.pipeline import cli


def main(argv: list[str]) -> int:
    commands, current = [], []
    for arg in argv:
        if arg == "--":
            commands.append(current)
            current = []
        else:
            current.append(arg)
    commands.append(current)
    for command in commands:
        code = cli.main(command)
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
