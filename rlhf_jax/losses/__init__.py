"""Pure losses. Each returns `(scalar_loss, metrics)` for `jax.value_and_grad(..., has_aux=True)`.

- policy gradients: `ppo_policy_loss`, `grpo_loss`, `reinforce_loss`, `value_loss`, `entropy_loss`
  and the token-aggregation modes of `aggregate`;
- preferences: `dpo_loss` (every `DPO_LOSS_TYPES`), `simpo_loss`, `cpo_loss`, `orpo_loss`, `kto_loss`;
- reward models: `reward_model_loss`, `ensemble_reward_model_loss`, `ensemble_scores`;
- regression: `rwr_weights`, `awr_weights`, `weighted_nll_loss`; supervised: `sft_loss`.

Causal shift: functions that take a model's logits take them for the whole `input_ids` and
shift themselves (`sft_loss(logits, input_ids, mask)`, like `ops.sequence_logprobs`);
functions that take per-token log-probs (every policy and preference loss,
`sft_loss_from_logprobs`) take them aligned with the tokens they score. Hyperparameter names
are listed in the glossary of docs/numerics.md.
"""
from rlhf_jax.losses.aggregation import AGGREGATION_MODES, aggregate
from rlhf_jax.losses.entropy import entropy_loss
from rlhf_jax.losses.kto import kto_loss
from rlhf_jax.losses.policy import IMPORTANCE_LEVELS, grpo_loss, ppo_policy_loss
from rlhf_jax.losses.preference import DIVERGENCES, DPO_LOSS_TYPES, dpo_loss
from rlhf_jax.losses.reference_free import cpo_loss, log_odds, orpo_loss, simpo_loss
from rlhf_jax.losses.regression import awr_weights, rwr_weights, weighted_nll_loss
from rlhf_jax.losses.reinforce import reinforce_loss
from rlhf_jax.losses.reward import ensemble_reward_model_loss, ensemble_scores, reward_model_loss
from rlhf_jax.losses.sft import sft_loss, sft_loss_from_logprobs
from rlhf_jax.losses.value import value_loss

__all__ = [
    "AGGREGATION_MODES", "DIVERGENCES", "DPO_LOSS_TYPES", "IMPORTANCE_LEVELS", "aggregate", "awr_weights",
    "cpo_loss", "dpo_loss", "ensemble_reward_model_loss", "ensemble_scores", "entropy_loss", "grpo_loss",
    "kto_loss", "log_odds", "orpo_loss", "ppo_policy_loss", "reinforce_loss", "reward_model_loss",
    "rwr_weights", "sft_loss", "sft_loss_from_logprobs", "simpo_loss", "value_loss", "weighted_nll_loss",
]
