"""docs/from_trl.md names only config keys the stages read and metrics the code writes: every
backticked dotted key in its tables resolves in a stage config, every metric key exists."""
import re
from pathlib import Path

from rlhf_jax.pipeline.stage_configs import DPOConfig, GRPOStageConfig, PPOStageConfig, RewardConfig, SFTConfig
from rlhf_jax.typed_config import to_dict

DOC = Path(__file__).resolve().parents[1] / "docs" / "from_trl.md"
TOP_LEVEL = {"seed", "output_dir", "reference", "mask_truncated"}


def _keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for name, value in tree.items():
        path = f"{prefix}{name}"
        keys.add(path)
        if isinstance(value, dict):
            keys |= _keys(value, path + ".")
    return keys


def _table_cells(column: int) -> list[str]:
    """The `column`-th cell (0-based) of every table row of the doc, headers excluded."""
    cells = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        parts = [part.strip() for part in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(parts) > column and not set(parts[0]) <= {"-"}:
            cells.append(parts[column])
    return cells


def test_every_config_key_named_exists():
    known = set().union(*(_keys(to_dict(cls())) for cls in (SFTConfig, RewardConfig, DPOConfig, PPOStageConfig,
                                                             GRPOStageConfig)))
    named = set()
    for cell in _table_cells(1):
        for token in re.findall(r"`([^`]+)`", cell):
            key = token.split(":")[0].strip()
            if key.endswith(".py"):  # a reward function's `file.py:name`
                continue
            if re.fullmatch(r"[a-z_]+(\.[a-z_0-9]+)+", key) or key in TOP_LEVEL:
                named.add(key)
    assert len(named) > 40
    assert not sorted(named - known), f"docs/from_trl.md names config keys no stage has: {sorted(named - known)}"


def test_every_metric_named_exists():
    code = "\n".join(path.read_text(encoding="utf-8") for path in (DOC.parents[1] / "rlhf_jax").rglob("*.py"))
    literals = set(re.findall(r'"([a-z_]+/[a-z_/0-9]+)"', code))
    text = DOC.read_text(encoding="utf-8").split("## Metrics")[1]
    named = {m for m in re.findall(r"`(?:1 - )?([a-z_]+/[a-z_]+)`", text)
             if m.split("/")[0] in {"objective", "grpo", "rollout", "optim", "dpo", "sft"}}
    named |= {f"reward/{part}" for part in ("unscored_fraction",) if f"reward/{part}" in text}
    assert len(named) > 15
    assert not sorted(named - literals), f"metrics the code does not write: {sorted(named - literals)}"
