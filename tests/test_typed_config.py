import dataclasses
from typing import ClassVar, Literal, Optional

import pytest

from rlhf_jax.typed_config import ConfigError, apply_overrides, load_config, parse_override, to_dict


@dataclasses.dataclass
class Optim:
    lr: float = 1e-3
    schedule: Literal["cosine", "linear"] = "cosine"
    betas: tuple[float, ...] = (0.9, 0.999)


@dataclasses.dataclass
class Run:
    seed: int = 0
    name: str = "run"
    steps: Optional[int] = None
    debug: bool = False
    optim: Optim = dataclasses.field(default_factory=Optim)


def test_defaults_without_file():
    assert load_config(Run) == Run()


def test_yaml_and_overrides_merge_nested_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\noptim:\n  schedule: linear\n")
    cfg = load_config(Run, path, ["optim.lr=0.5", "steps=10", "debug=true", "optim.betas=[0.8, 0.9]"])
    assert cfg.seed == 3 and cfg.steps == 10 and cfg.debug is True
    assert cfg.optim == Optim(lr=0.5, schedule="linear", betas=(0.8, 0.9))
    assert to_dict(cfg)["optim"]["lr"] == 0.5


def test_int_is_accepted_for_float_but_not_the_reverse():
    assert load_config(Run, None, ["optim.lr=1"]).optim.lr == 1.0
    assert load_config(Run, None, ["optim.lr=3e-4"]).optim.lr == 3e-4  # YAML 1.1 reads this as a string
    with pytest.raises(ConfigError, match="`seed` must be an int, got 1.5"):
        load_config(Run, None, ["seed=1.5"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", r"unknown config key 'optim.lrr' at `optim`; valid keys: betas, lr, schedule"),
        ("sed=1", r"unknown config key 'sed' at the top level; valid keys: debug, name, optim, seed, steps"),
        ("optim.schedule=step", r"`optim.schedule` must be one of \['cosine', 'linear'\], got 'step'"),
        ("debug=maybe", r"`debug` must be a bool"),
        ("optim=3", r"`optim` must be a mapping"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Run, None, [override])


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Run, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(Run, bad)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ConfigError, match=r"wrong.yaml: `optim.lr` must be a number, got 'fast'"):
        load_config(Run, wrong)


def test_override_syntax():
    assert parse_override("a.b=1") == (["a", "b"], 1)
    with pytest.raises(ConfigError, match="must look like key.sub=value"):
        parse_override("novalue")
    with pytest.raises(ConfigError, match="empty key part"):
        parse_override("a..b=1")
    assert apply_overrides({}, ["x.y=hello"]) == {"x": {"y": "hello"}}


def test_an_error_names_the_command_line_when_the_file_alone_loads(tmp_path):
    """An override at fault is not attributed to the file (which the user would search in vain)."""
    path = tmp_path / "run.yaml"
    path.write_text("steps: 3\noptim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match="^command line: unknown config key 'optim.l'"):
        load_config(Run, path, ["optim.l=0.5"])
    with pytest.raises(ConfigError, match=r"^command line: `optim.betas` must be a list, got 0.8 \(a list of one"):
        load_config(Run, path, ["optim.betas=0.8"])
    path.write_text("steps: 3\noptim: {l: 0.1}\n")
    with pytest.raises(ConfigError, match=f"^{path}: unknown config key 'optim.l'"):
        load_config(Run, path, ["steps=4"])
    with pytest.raises(ConfigError, match=f"^{path}: unknown config key 'optim.l'"):
        load_config(Run, path)


@dataclasses.dataclass
class Hook:
    SHORTHAND_FIELD: ClassVar[str] = "target"
    target: str = ""
    weight: float = 1.0


@dataclasses.dataclass
class Hooks:
    hooks: list[Hook] = dataclasses.field(default_factory=list)


def test_a_plain_string_stands_for_the_shorthand_field():
    config = load_config(Hooks, None, ["hooks=[a.py:f, {target: b.py:g, weight: 0.5}]"])
    assert config.hooks == [Hook("a.py:f"), Hook("b.py:g", 0.5)]
    with pytest.raises(ConfigError, match=r"`optim` must be a mapping of Optim fields, got 'fast'"):
        load_config(Run, None, ["optim=fast"])  # no shorthand: a string is still refused
