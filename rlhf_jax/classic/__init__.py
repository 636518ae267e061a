"""Classic RL on gymnax environments: PPO and REINFORCE as one jitted, seed-vmappable function.

    train = jax.jit(jax.vmap(make_train(load_classic_config("configs/classic_ppo.yaml"))))
    runner_state, metrics = train(jax.random.split(jax.random.key(0), 3))

The losses and advantages are the library's (`gae` with dones and bootstrap value,
`ppo_policy_loss`, `value_loss`, `entropy_loss`, `reinforce_loss`).
"""
from rlhf_jax.classic.config import ClassicConfig, derived_sizes, load_classic_config
from rlhf_jax.classic.networks import ActorMLP, CriticMLP, create_train_states
from rlhf_jax.classic.ppo import ppo_update, rollout_advantages
from rlhf_jax.classic.reinforce import reinforce_update, rollout_returns
from rlhf_jax.classic.rollout import collect_rollout, make_env, reset_envs, track_episodes
from rlhf_jax.classic.run import run_classic
from rlhf_jax.classic.train import RunnerState, make_train

__all__ = [
    "ActorMLP", "ClassicConfig", "CriticMLP", "RunnerState", "collect_rollout", "create_train_states",
    "derived_sizes", "load_classic_config", "make_env", "make_train", "ppo_update", "reinforce_update",
    "reset_envs", "rollout_advantages", "rollout_returns", "run_classic", "track_episodes",
]
