"""Pure array math (jax + chex only): masking, log-probs and entropy, KL estimators and the
KL controller, per-token reward shaping, advantages (GAE, returns, group / RLOO baselines),
the LM head's token statistics computed in blocks (`chunked_head_stats`), attention computed
in blocks (`blockwise_attention`, `blockwise_attention_with_lse`) and N continuations'
attention to one shared prefix (`prefix_attention`, blockwise: `blockwise_prefix_attention`)."""
from rlhf_jax.ops.advantages import GROUP_SCALES, SCAN_METHODS, discounted_returns, gae, group_advantages, rloo_advantages
from rlhf_jax.ops.blockwise_attention import blockwise_attention, blockwise_attention_with_lse
from rlhf_jax.ops.blockwise_prefix_attention import blockwise_prefix_attention
from rlhf_jax.ops.chunked_head import HeadStats, OutputHead, chunked_head_stats, default_chunk_size, soft_cap
from rlhf_jax.ops.kl import KL_ESTIMATORS, full_kl, kl_estimate
from rlhf_jax.ops.kl_controller import KLController, KLControllerState, adaptive_kl_controller, fixed_kl_controller
from rlhf_jax.ops.logprobs import entropy_from_logits, sequence_logprobs, token_logprobs
from rlhf_jax.ops.prefix_attention import prefix_attention
from rlhf_jax.ops.masking import last_token_index, masked_mean, masked_sum, masked_var, masked_whiten
from rlhf_jax.ops.rewards import shape_rewards

__all__ = [
    "GROUP_SCALES", "HeadStats", "KL_ESTIMATORS", "OutputHead", "blockwise_attention", "blockwise_attention_with_lse",
    "blockwise_prefix_attention", "chunked_head_stats", "default_chunk_size",
    "soft_cap", "KLController", "KLControllerState", "SCAN_METHODS", "adaptive_kl_controller",
    "discounted_returns", "entropy_from_logits", "fixed_kl_controller", "full_kl", "gae", "group_advantages",
    "kl_estimate", "last_token_index", "masked_mean", "masked_sum", "masked_var", "masked_whiten", "prefix_attention", "rloo_advantages",
    "sequence_logprobs", "shape_rewards", "token_logprobs",
]
