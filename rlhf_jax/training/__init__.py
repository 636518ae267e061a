"""Train states, optimizers, sharding and the step functions of every algorithm.

The main names are importable from here (`from rlhf_jax.training import sft_step`); apart
from the three supervised steps each is loaded from its module on first use, so importing
this package does not load the RL, rollout or multi-host code. `__all__` lists
them; the modules hold the rest:

    sft_step, reward_step, preference_step   one optimizer update on a batch (supervised stages)
    LMBatch, SFTBatch, PreferenceBatch, ...   the one batch layout (left-padded prompt + response)
    response_logprobs, response_hidden_states log-probs / hidden states of the response tokens
    create_train_state, make_optimizer        train state and the optax chain (`OptimizerConfig`)
    make_train_step                           jit a step, on a mesh or not (`step_runner`)
    generate_rollout, grpo_*, ppo_*           RL rollouts and updates (`GRPOConfig`, `PPOConfig`)
    make_mesh, param_shardings, shard_batch   sharding over a ("data", "fsdp", ...) mesh
"""
from __future__ import annotations

from rlhf_jax.lazy_exports import lazy_exports

# These three modules share their names with their step functions. Importing them here binds
# the package attributes to the functions for good (a submodule's first import would otherwise
# rebind them to the modules).
from rlhf_jax.training.preference_step import preference_step
from rlhf_jax.training.reward_step import reward_step
from rlhf_jax.training.sft_step import sft_step

_EXPORTS = {
    "sft_step": ("sft_step", "sft_token_sums"),
    "reward_step": ("reward_step", "pair_scores", "response_scores"),
    "preference_step": ("preference_step", "PreferenceLossConfig", "PREFERENCE_KINDS", "preference_loss",
                        "pair_logps", "sequence_logps", "SequenceLogps", "reference_logps",
                        "with_reference_logps", "precompute_reference_logps"),
    "batches": ("SFTBatch", "PreferenceBatch", "KTOBatch"),
    "logprobs": ("LMBatch", "ResponseLogprobs", "ResponseHidden", "response_logprobs",
                 "response_hidden_states", "response_end_states", "response_states_at"),
    "state": ("TrainState", "create_train_state", "train_state_shardings", "reference_params"),
    "optim": ("OptimizerConfig", "make_optimizer", "make_schedule", "optimizer_metrics",
              "accumulate_gradients", "check_finite"),
    "step_runner": ("make_train_step", "JittedStep", "gradient_step"),
    "rollout": ("SamplingConfig", "Rollout", "generate_rollout", "score_rollout", "policy_logprobs",
                "response_values", "reward_model_scores", "ppo_advantages", "rollout_metrics",
                "sampled_batch", "flatten_responses"),
    "grpo": ("GRPOConfig", "sequence_advantages", "grpo_generate", "grpo_rollout", "grpo_update",
             "grpo_train", "grpo_iteration"),
    "ppo": ("PPOConfig", "kl_controller", "value_params_from_reward_model", "ppo_generate", "ppo_update",
            "ppo_train", "ppo_iteration"),
    "sharding": ("MeshConfig", "make_mesh", "replicated", "batch_sharding", "shard_batch", "param_shardings",
                 "shard_params", "opt_state_shardings"),
    "lora_state": ("LoRATrainState", "create_lora_train_state", "merged_params", "inference_model"),
    "distributed": ("DistributedConfig", "initialize_distributed"),
}
__all__, __getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
