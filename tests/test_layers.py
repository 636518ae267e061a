"""Import layering: `classic/` imports nothing from `pipeline/` (parsed with `ast`, not run)."""
import ast
from pathlib import Path

import rlhf_jax

PACKAGE_ROOT = Path(rlhf_jax.__file__).parent


def _imported_modules(path: Path) -> list[str]:
    """Absolute names of every module imported by `path` (relative imports resolved)."""
    package = "rlhf_jax." + ".".join(path.relative_to(PACKAGE_ROOT).parent.parts)
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rstrip(".").split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            names.append(module)
            names.extend(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_imported_modules_sees_classic_imports():
    source = PACKAGE_ROOT / "classic" / "run.py"
    names = _imported_modules(source)
    assert any(name.startswith("rlhf_jax.classic.") for name in names)


def test_classic_imports_nothing_from_pipeline():
    offenders = []
    for path in sorted((PACKAGE_ROOT / "classic").rglob("*.py")):
        for name in _imported_modules(path):
            if name == "rlhf_jax.pipeline" or name.startswith("rlhf_jax.pipeline."):
                offenders.append(f"{path.relative_to(PACKAGE_ROOT)} imports {name}")
    assert not offenders, offenders
