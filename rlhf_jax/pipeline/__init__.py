"""The YAML-driven pipeline behind the `rlhf-jax` command: stage configs, data, the training
loop, checkpoints, logs and evaluation.

The stage entry points (`train_sft(config)`, ..., `run_quickstart(config)`), `load_stage_config`
and the config dataclasses are importable from here; each is loaded from its module on first
use, so importing this package (and `rlhf-jax --help`) stays cheap:

    config = load_stage_config(SFTConfig, "configs/sft.yaml", ["train.steps=10"])
    summary = train_sft(config)
"""
from __future__ import annotations

from rlhf_jax.lazy_exports import lazy_exports

_EXPORTS = {
    "stage_configs": ("load_stage_config", "check_stage_config", "with_schedule_length", "schedule_length",
                      "with_schedule_lengths",
                      "StageConfig", "SFTConfig", "RewardConfig", "DPOConfig", "RLStageConfig",
                      "PPOStageConfig", "GRPOStageConfig", "EvalConfig", "QuickstartConfig",
                      "ModelSection", "LoRASection", "TrainSection", "EvalSection", "CheckpointSection",
                      "LoggingSection", "SFTOptions", "RewardOptions", "RewardFunctionSpec", "RewardSource",
                      "DynamicSamplingSection", "RLTrainSection", "EvalRewardSection"),
    "stages.sft": ("train_sft",),
    "stages.reward": ("train_reward",),
    "stages.dpo": ("train_dpo",),
    "stages.ppo": ("train_ppo",),
    "stages.grpo": ("train_grpo",),
    "stages.evaluate": ("evaluate_policies", "run_eval"),
    "stages.quickstart": ("run_quickstart",),
    "loop": ("run_loop",),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
