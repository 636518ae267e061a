"""`rlhf-jax sft`: supervised fine-tuning on prompt/completion (or messages) data.

    rlhf-jax sft --config configs/sft.yaml model.path=my_model data.train_files=[sft.jsonl]

Trains the response tokens with cross-entropy (`rlhf_jax.training.sft_step`), evaluates the
held-out files' token loss and accuracy as `eval/sft/*`, and exports `<output_dir>/model`.
"""
from __future__ import annotations

import jax
import numpy as np

from rlhf_jax.pipeline.stage_configs import SFTConfig, load_stage_config
from rlhf_jax.pipeline.stages import skeletons, stage_setup
from rlhf_jax.training.batches import SFTBatch
from rlhf_jax.training.lora_state import inference_model
from rlhf_jax.training.sft_step import sft_step, sft_token_sums


def make_sft_evaluator(apply_fn, data, config: SFTConfig, mesh):
    """`params -> {"eval/sft/loss", "eval/sft/accuracy"}`: token means over the held-out data."""
    skeletons.ordered_batches(data, config.eval.batch_size)  # a batch size the processes cannot share fails now

    @jax.jit
    def sums(params, batch: SFTBatch):
        totals = sft_token_sums(apply_fn, params, batch)
        return totals["sft/nll"], totals["sft/accuracy"], totals["tokens"]

    def evaluate(params) -> dict:
        totals = np.zeros(3)
        for batch in skeletons.ordered_batches(data, config.eval.batch_size, config.eval.max_batches):
            totals += np.asarray(jax.device_get(sums(params, stage_setup.place(SFTBatch.from_arrays(batch), mesh))))
        tokens = max(totals[2], 1.0)
        return {"eval/sft/loss": totals[0] / tokens, "eval/sft/accuracy": totals[1] / tokens}

    return evaluate


def train_sft(config: SFTConfig, *, resume: bool = False) -> dict:
    setup = skeletons.open_supervised_stage(config, kind="sft", stage="sft", resume=resume,
                                            why="SFT needs prompt/completion data")
    module, params = stage_setup.build_model(config.model, setup.tokenizer, stage_setup.rng_key(config.seed, 0))
    state, step = skeletons.supervised_state_and_step(config, module, params, setup.mesh, sft_step,
                                                   label_smoothing=config.sft.label_smoothing)
    del params
    evaluate = (make_sft_evaluator(inference_model(module, state)[0].apply, setup.eval_data, config, setup.mesh)
                if setup.eval_data is not None else None)
    return skeletons.run_supervised_stage(
        "sft", config, setup, module, state, step, resume=resume, evaluate=evaluate,
        prepare_batch=lambda batch: stage_setup.place(SFTBatch.from_arrays(batch), setup.mesh),
        progress_keys=("sft/loss", "sft/accuracy", "eval/sft/accuracy"))


def run(config_path=None, overrides=(), *, resume: bool = False) -> dict:
    """The `rlhf-jax sft` entry point."""
    return train_sft(load_stage_config(SFTConfig, config_path, overrides), resume=resume)
