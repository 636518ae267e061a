"""rlhf_jax: reinforcement learning from human feedback in JAX/Flax.

The functional core is importable from here: advantages (`gae`, `group_advantages`, ...), KL
(`kl_estimate`, `full_kl`, `shape_rewards`), masking and log-prob helpers, and every loss
(`ppo_policy_loss`, `dpo_loss`, `reward_model_loss`, ...). Models live in `rlhf_jax.models`,
step functions in `rlhf_jax.training`, the YAML-driven pipeline in `rlhf_jax.pipeline`.
"""
from rlhf_jax.losses import *  # noqa: F401,F403
from rlhf_jax.models.generation import generate  # noqa: F401 (in __all__ below)
from rlhf_jax.losses import __all__ as _losses_all
from rlhf_jax.ops import *  # noqa: F401,F403
from rlhf_jax.ops import __all__ as _ops_all

__version__ = "0.1.0"
__all__ = sorted(set(_ops_all) | set(_losses_all) | {"generate"})
