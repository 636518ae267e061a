"""What the benchmarks share: machine description, timing statistics, RESULTS.md sections,
and a character-level tokenizer with a vocabulary of any size.

The scripts in this folder import it as `common` (they put their own folder on `sys.path`).
"""
from __future__ import annotations

import argparse
import importlib.metadata
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Sequence, TypeVar

import numpy as np

RESULTS = Path(__file__).with_name("RESULTS.md")
# Specials of `rlhf_jax.pipeline.tokenizer` (pad, eos, bos, unk and three role tokens).
NUM_SPECIAL_TOKENS = 7
# Characters for large character-level vocabularies, one token each: the CJK unified
# ideographs, then the Hangul syllables (no combining marks, no unassigned code points).
_CHARACTER_RANGES = ((0x4E00, 0x9FFF), (0xAC00, 0xD7A3))
T = TypeVar("T")


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def load_average(digits: int = 2, separator: str = " ") -> str:
    """The 1, 5 and 15 minute load averages (NaN where the platform has none)."""
    values = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return separator.join(f"{value:.{digits}f}" for value in values)


def load_average_1min() -> float:
    """The 1 minute load average (NaN where the platform has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what `platform` knows."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            names = [line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")]
    except OSError:
        return cpu
    return names[0] if names else cpu


def machine_info(packages: Sequence[str] = ("jax", "flax", "optax")) -> list[str]:
    """Lines describing the machine and the package versions (for a results block)."""
    import jax

    versions = ", ".join(f"{name}: {package_version(name)}" for name in packages)
    return [
        f"cpu: {cpu_name()}",
        f"cores: {os.cpu_count()}",
        f"load average (1/5/15 min): {load_average()}",
        f"python: {platform.python_version()}, numpy: {np.__version__}, {versions}",
        f"jax backend: {jax.default_backend()}, devices: {[str(d) for d in jax.devices()]}",
    ]


def median(values: Sequence[float]) -> float:
    if not values:
        raise ValueError("median of no values")
    return float(statistics.median(values))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std


def timed(fn: Callable[[], T]) -> tuple[T, float, float]:
    """`(fn(), wall seconds, process CPU seconds (all threads))` of one call of `fn`."""
    start, start_cpu = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - start, time.process_time() - start_cpu


def time_calls(fn: Callable[[], object], block: Callable[[object], object],
               count: int) -> tuple[list[float], list[float]]:
    """Wall seconds and process CPU seconds (all threads) of each of `count` calls of `fn`,
    each waited for with `block(result)`."""
    wall, cpu = [], []
    for _ in range(count):
        _, call_wall, call_cpu = timed(lambda: block(fn()))
        wall.append(call_wall)
        cpu.append(call_cpu)
    return wall, cpu


def utc_stamp(pattern: str = "%Y-%m-%d %H:%M UTC") -> str:
    """The current UTC time as `pattern` (a `time.strftime` format)."""
    return time.strftime(pattern, time.gmtime())


def write_section(heading: str, body: str, path: Path = RESULTS) -> None:
    """Replace the section `heading` (e.g. "## vs TRL") of RESULTS.md with `body`, or append
    it; every other section is kept as it is. `body` starts with the heading line."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    body = body.rstrip("\n") + "\n"
    if start is None:
        text = text.rstrip("\n") + "\n\n" + body
    else:
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        rest = "".join(lines[end:])
        text = "".join(lines[:start]) + body + ("\n" + rest if rest else "")
    path.write_text(text)


def add_write_flags(parser, *aliases: str, target: str = "benchmarks/RESULTS.md", note: str = "") -> None:
    """`--write` (update `target`; `aliases` are older names of it; `note` ends its help) and
    `--no-write` (print only, the default) on an argparse `parser`; the choice lands in `args.write`."""
    parser.set_defaults(write=False)  # set first: the flags' own default stays SUPPRESS (no "(default: ...)")
    group = parser.add_mutually_exclusive_group()
    hide = dict(dest="write", default=argparse.SUPPRESS)
    group.add_argument("--write", *aliases, action="store_true", help=f"also update {target}{note}", **hide)
    group.add_argument("--no-write", action="store_false", help=f"print only, leave {target} alone (the default)",
                       **hide)


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """The command as run: `python benchmarks/<script> <argv>` (`argv` default: `sys.argv[1:]`),
    each argument quoted where the shell needs it."""
    return shlex.join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def character_alphabet(size: int) -> str:
    """`size` distinct characters (CJK ideographs, then Hangul syllables), each a token of a
    character tokenizer."""
    available = [code for low, high in _CHARACTER_RANGES for code in range(low, high + 1)]
    if not 1 <= size <= len(available):
        raise ValueError(f"alphabet size must be in [1, {len(available)}], got {size}")
    return "".join(map(chr, available[:size]))


def build_character_tokenizer(folder, vocab_size: int):
    """A Hugging Face character tokenizer with exactly `vocab_size` tokens (7 specials, then
    one token per character), saved to `folder` (`rlhf_jax.pipeline.tokenizer`)."""
    from rlhf_jax.pipeline.tokenizer import build_tokenizer

    if vocab_size <= NUM_SPECIAL_TOKENS:
        raise ValueError(f"vocab_size must exceed {NUM_SPECIAL_TOKENS}, got {vocab_size}")
    tokenizer = build_tokenizer(folder, character_alphabet(vocab_size - NUM_SPECIAL_TOKENS))
    if len(tokenizer) != vocab_size:
        raise RuntimeError(f"built a tokenizer of {len(tokenizer)} tokens, wanted {vocab_size}")
    return tokenizer


def random_text(rng: np.random.Generator, alphabet: str, low: int, high: int) -> str:
    """A string of `low..high` (inclusive) characters drawn uniformly from `alphabet`."""
    length = int(rng.integers(low, high + 1))
    return "".join(alphabet[i] for i in rng.integers(0, len(alphabet), length))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]], align: str | None = None) -> str:
    """A markdown table; `align` is one character per column ("l" or "r", default: l then r)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---" if a == "l" else "---:" for a in align]
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


__all__ = [
    "RESULTS", "NUM_SPECIAL_TOKENS", "package_version", "load_average", "load_average_1min", "cpu_name", "machine_info",
    "median", "mean_std", "timed", "time_calls", "utc_stamp", "write_section", "add_write_flags", "command_line",
    "character_alphabet",
    "build_character_tokenizer", "random_text", "markdown_table",
]
