"""docs/metrics.md names every metric the RL stages and the optimizer log, and only metrics
the code writes (the names are string literals in rlhf_jax/)."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTED_PREFIXES = ("grpo/", "ppo/", "value/", "objective/", "rollout/", "dynamic_sampling/", "optim/")


def _code_literals() -> set[str]:
    text = "\n".join(path.read_text(encoding="utf-8") for path in (ROOT / "rlhf_jax").rglob("*.py"))
    return set(re.findall(r'"([a-z_]+/[a-z_/0-9@]+)"', text))


def _documented() -> set[str]:
    text = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    names = set(re.findall(r"`([a-z_]+/[a-z_/0-9@]+)`", text))
    return {name for name in names if not name.endswith("/")}


def test_documented_metrics_exist_in_the_code():
    code = _code_literals()
    prefixes = {name.split("/")[0] + "/" for name in code}
    missing = sorted(name for name in _documented()
                     if name.split("/")[0] + "/" in prefixes and name not in code and not name.startswith("eval/"))
    assert not missing, f"docs/metrics.md names metrics the code does not write: {missing}"


def test_rl_and_optimizer_metrics_are_documented():
    documented = _documented()
    undocumented = sorted(name for name in _code_literals()
                          if name.startswith(DOCUMENTED_PREFIXES) and name not in documented)
    assert not undocumented, f"metrics missing from docs/metrics.md: {undocumented}"
