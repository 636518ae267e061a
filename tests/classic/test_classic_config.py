"""ClassicConfig loading: the shipped YAML files, overrides, and clear errors."""
from pathlib import Path

import pytest

from rlhf_jax.classic.config import (
    ClassicConfig,
    derived_sizes,
    load_classic_config,
    validate_classic_config,
)
from rlhf_jax.typed_config import ConfigError

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("name,algorithm", [("classic_ppo.yaml", "ppo"),
                                            ("classic_reinforce.yaml", "reinforce")])
def test_shipped_configs_load(name, algorithm):
    config = load_classic_config(CONFIGS / name)
    assert config.algorithm == algorithm
    assert config.env_name == "CartPole-v1"
    sizes = derived_sizes(config)
    assert sizes.num_updates >= 1
    assert sizes.batch_size == config.num_envs * config.num_steps
    assert sizes.minibatch_size * config.num_minibatches == sizes.batch_size


def test_overrides_are_typed():
    config = load_classic_config(CONFIGS / "classic_ppo.yaml",
                                 ["learning_rate=0.0003", "seeds=[4, 5]", "env_name=Acrobot-v1",
                                  "value_clip_eps=null", "anneal_lr=false"])
    assert config.learning_rate == pytest.approx(3e-4)
    assert config.seeds == [4, 5]
    assert config.env_name == "Acrobot-v1"
    assert config.value_clip_eps is None and config.anneal_lr is False


@pytest.mark.parametrize("override,words", [
    ("update_epochs=4", ["update_epochs", "valid keys"]),
    ("num_envs=four", ["num_envs", "int"]),
    ("algorithm=a2c", ["algorithm", "ppo"]),
    ("baseline=maybe", ["baseline", "bool"]),
])
def test_unknown_keys_and_wrong_types_are_named(override, words):
    with pytest.raises(ConfigError) as error:
        load_classic_config(CONFIGS / "classic_ppo.yaml", [override])
    for word in words:
        assert word in str(error.value)
    assert str(error.value).startswith("command line:")  # the override, not the YAML file, holds it


@pytest.mark.parametrize("changes,key", [
    ({"env_name": "Pong-v0"}, "env_name"),
    ({"num_envs": 0}, "num_envs"),
    ({"num_envs": 3, "num_steps": 5, "num_minibatches": 2}, "num_minibatches"),
    ({"total_timesteps": 10}, "total_timesteps"),
    ({"gamma": 1.5}, "gamma"),
    ({"value_clip_eps": -0.1}, "value_clip_eps"),
    ({"ent_coef": -1.0}, "ent_coef"),
    ({"seeds": []}, "seeds"),
])
def test_bad_values_are_refused(changes, key):
    config = ClassicConfig(**changes)
    with pytest.raises(ConfigError, match=key):
        validate_classic_config(config)


def test_unknown_key_in_a_yaml_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("algorithm: ppo\nnum_env: 4\n")
    with pytest.raises(ConfigError, match="num_env"):
        load_classic_config(path)
