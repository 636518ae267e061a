"""Which scorer a `reward` section selects (`RewardSource`): `kind: auto` (the default) is the
reward model when `path` is set and the gold scorer otherwise, whatever other keys are set;
with `functions`, `path` alone decides whether the reward model joins them."""
import pytest

from rlhf_jax.pipeline.stage_configs import GRPOStageConfig, PPOStageConfig, RewardSource, load_stage_config


@pytest.mark.parametrize("settings, scorer, uses_model, uses_gold", [
    ({}, "gold", False, True),
    ({"path": "rm"}, "reward_model", True, False),
    ({"kind": "gold", "path": "rm"}, "gold", False, True),
    ({"kind": "reward_model"}, "reward_model", True, False),
    ({"functions": [{"function": "m.py:f"}]}, "gold", False, False),
    ({"functions": [{"function": "m.py:f"}], "path": "rm"}, "reward_model", True, False),
    ({"functions": [{"function": "m.py:f"}], "kind": "reward_model"}, "reward_model", False, False),
])
def test_the_scorer_a_reward_section_selects(settings, scorer, uses_model, uses_gold):
    source = load_stage_config(GRPOStageConfig, None, [f"reward={settings}"]).reward
    assert (source.scorer, source.uses_model, source.uses_gold) == (scorer, uses_model, uses_gold)


@pytest.mark.parametrize("cls", [GRPOStageConfig, PPOStageConfig])
@pytest.mark.parametrize("override", ["reward.gold_kind=graded", "reward.task=arithmetic",
                                      "reward.model_weight=0.5"])
def test_another_reward_key_does_not_change_the_scorer(cls, override):
    config = load_stage_config(cls, None, [override])
    assert config.reward.kind == "auto" and config.reward.uses_gold
    assert load_stage_config(cls, None, [override, "reward.path=rm"]).reward.uses_model


def test_the_stages_default_to_auto():
    assert GRPOStageConfig().reward == PPOStageConfig().reward == RewardSource(kind="auto")
