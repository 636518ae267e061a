"""rlhf_jax: reinforcement learning from human feedback in JAX/Flax."""

__version__ = "0.1.0"
