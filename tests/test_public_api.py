"""The package-level public API: every name in `__all__` resolves to its module's object, and
importing the packages loads none of the heavy modules behind them."""
import importlib
import subprocess
import sys

import pytest

PACKAGES = ["rlhf_jax", "rlhf_jax.ops", "rlhf_jax.losses", "rlhf_jax.models", "rlhf_jax.training", "rlhf_jax.classic",
            "rlhf_jax.rewards", "rlhf_jax.tasks", "rlhf_jax.pipeline"]


@pytest.mark.parametrize("package", PACKAGES)
def test_every_name_in_all_resolves(package):
    module = importlib.import_module(package)
    assert module.__all__, package
    missing = [name for name in module.__all__ if getattr(module, name, None) is None]
    assert not missing, f"{package}: {missing}"


@pytest.mark.parametrize("package", ["rlhf_jax.training", "rlhf_jax.pipeline"])
def test_exports_are_the_defining_modules_objects(package):
    module = importlib.import_module(package)
    module_of = {name: source for source, names in module._EXPORTS.items() for name in names}
    for name in module.__all__:
        source = importlib.import_module(f"{package}.{module_of[name]}")
        assert getattr(module, name) is getattr(source, name), name
        if hasattr(source, "__all__"):
            assert name in source.__all__, f"{source.__name__}.__all__ lacks {name}"


def test_unknown_name_is_an_attribute_error():
    import rlhf_jax.training

    with pytest.raises(AttributeError, match="no_such_name"):
        rlhf_jax.training.no_such_name  # noqa: B018


def test_importing_the_packages_loads_no_stage_or_rl_module():
    code = "import sys, rlhf_jax.training, rlhf_jax.pipeline; print(' '.join(sorted(sys.modules)))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    heavy = [name for name in loaded if name.startswith(("rlhf_jax.pipeline.", "rlhf_jax.training.rollout",
                                                          "rlhf_jax.training.grpo", "rlhf_jax.training.ppo",
                                                          "rlhf_jax.training.multihost"))]
    assert not heavy, heavy


def test_step_functions_stay_bound_after_their_modules_are_imported():
    import rlhf_jax.training
    import rlhf_jax.training.preference_step  # noqa: F401
    import rlhf_jax.training.sft_step  # noqa: F401

    assert callable(rlhf_jax.training.sft_step) and callable(rlhf_jax.training.preference_step)


def _readme_api_rows():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = text.split("## Public API by layer", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[1].startswith("`rlhf_jax"):
            modules = [part for part in cells[1].split("`")[1::2] if part.startswith("rlhf_jax")]
            yield cells[0], modules, cells[2].split("`")[1::2]


def test_readme_api_table_names_resolve():
    rows = list(_readme_api_rows())
    assert len(rows) >= 10
    for layer, modules, names in rows:
        packages = [importlib.import_module(module) for module in modules]
        for name in names:
            assert any(hasattr(package, name) for package in packages), f"{layer}: {name} not in {modules}"
