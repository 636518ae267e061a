"""`rlhf-jax reward`: a Bradley-Terry reward model on prompt/chosen/rejected pairs.

    rlhf-jax reward --config configs/reward.yaml model.path=runs/sft/model

The model is the decoder of `model.path` (usually the SFT policy) with a scalar head read at
the last token (`RewardModel`; a fresh N(0, 1/sqrt(d+1)) head unless the folder has one).
Held-out pairs (`data.eval_files`) give `eval/reward/accuracy` (share of pairs scored in the
right order) and `eval/reward/margin`. The model is exported as a `*ForSequenceClassification`
folder in `<output_dir>/model`.
"""
from __future__ import annotations

import jax
import numpy as np

from rlhf_jax.pipeline.stage_configs import RewardConfig, load_stage_config
from rlhf_jax.pipeline.stages import skeletons, stage_setup
from rlhf_jax.training.batches import PreferenceBatch
from rlhf_jax.training.lora_state import inference_model
from rlhf_jax.training.reward_step import pair_scores, reward_step


def pair_batch(batch: dict) -> PreferenceBatch:
    return PreferenceBatch.from_arrays(batch)


def make_pair_scorer(apply_fn):
    """Jitted `(params, PreferenceBatch) -> (chosen [B], rejected [B])` reward-model scores."""
    return jax.jit(lambda params, batch: pair_scores(apply_fn, params, batch))


def score_pairs(scorer, params, data, batch_size: int, mesh, max_batches: int | None = None):
    """Scores `(chosen [N], rejected [N])` of every pair of `data` (fixed-shape batches)."""
    return skeletons.pair_values(scorer, params, data, batch_size, mesh, max_batches)


def pair_accuracy(chosen, rejected) -> dict:
    return {"eval/reward/accuracy": float(np.mean(chosen > rejected)),
            "eval/reward/margin": float(np.mean(chosen - rejected))}


def train_reward(config: RewardConfig, *, resume: bool = False) -> dict:
    setup = skeletons.open_supervised_stage(config, kind="preference", stage="reward", resume=resume,
                                            why="the reward model needs preference pairs")
    module, params = stage_setup.build_model(config.model, setup.tokenizer, stage_setup.rng_key(config.seed, 0),
                                        head="reward")
    state, step = skeletons.supervised_state_and_step(config, module, params, setup.mesh, reward_step,
                                                   center_coef=config.reward.center_coef)
    del params
    evaluate = None
    if setup.eval_data is not None:
        scorer = make_pair_scorer(inference_model(module, state)[0].apply)
        evaluate = lambda params: pair_accuracy(*score_pairs(
            scorer, params, setup.eval_data, config.eval.batch_size, setup.mesh, config.eval.max_batches))
    return skeletons.run_supervised_stage(
        "reward", config, setup, module, state, step, resume=resume, evaluate=evaluate,
        prepare_batch=lambda batch: stage_setup.place(pair_batch(batch), setup.mesh),
        progress_keys=("reward/loss", "reward/accuracy", "eval/reward/accuracy"))


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax reward` entry point."""
    return train_reward(load_stage_config(RewardConfig, config_path, overrides), resume=resume)
