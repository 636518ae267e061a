"""Configuration for classic (environment) RL: PPO and REINFORCE on gymnax environments.

`ClassicConfig` is a flat typed dataclass loaded from YAML with `load_classic_config`, so an
unknown key or a value of the wrong type is an error naming the key. `validate_classic_config`
checks the values that YAML types cannot (positive sizes, divisibility) and `derived_sizes`
computes, once and outside any traced function, the sizes the training loop is built from.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal, Sequence

from rlhf_jax.typed_config import ConfigError, load_config

SUPPORTED_ENVS = ("CartPole-v1", "Acrobot-v1")


@dataclasses.dataclass
class ClassicConfig:
    """Defaults are the tuned PPO-on-CartPole settings of configs/classic_ppo.yaml."""

    # Environment
    env_name: str = "CartPole-v1"        # a gymnax discrete-action environment (SUPPORTED_ENVS)
    num_envs: int = 8                    # environments stepped in parallel (vectorised with vmap)
    num_steps: int = 32                  # steps per environment in one rollout
    total_timesteps: int = 131_072       # environment steps over the whole run, per seed

    # Algorithm
    algorithm: Literal["ppo", "reinforce"] = "ppo"
    baseline: bool = True                # REINFORCE only: subtract a learned value V(s_t)
    gamma: float = 0.98                  # discount
    gae_lambda: float = 0.8              # PPO: GAE lambda
    clip_eps: float = 0.2                # PPO: policy ratio clip range
    value_clip_eps: float | None = 0.2   # PPO: value clip range around the rollout values (null: off)
    ent_coef: float = 0.0                # entropy bonus coefficient
    vf_coef: float = 0.5                 # value loss coefficient
    whiten_advantages: bool = True       # whiten advantages per minibatch
    bootstrap_truncated: bool = True     # on a time-limit cut, add gamma * V(final obs) to the reward

    # Optimisation
    learning_rate: float = 1e-3          # Adam learning rate (policy and value networks)
    anneal_lr: bool = True               # linear decay of the learning rate to 0 over the run
    max_grad_norm: float = 0.5           # clip each network's gradient by global norm
    epochs: int = 20                     # passes over each rollout
    num_minibatches: int = 1             # minibatches per pass
    hidden_size: int = 64                # width of the two tanh hidden layers of each network

    # Run
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1, 2])
    log_every: int = 64                  # updates between progress lines (run_classic)
    output_dir: str = "outputs/classic_ppo"


@dataclasses.dataclass(frozen=True)
class DerivedSizes:
    batch_size: int          # num_envs * num_steps transitions per rollout
    num_updates: int         # rollouts (and parameter updates) per run
    minibatch_size: int      # batch_size // num_minibatches
    optimizer_steps: int     # num_updates * epochs * num_minibatches


def combine_losses(config: ClassicConfig, policy_loss, value_loss, neg_entropy, *metrics: dict):
    """`(total, metrics)`: `policy + vf_coef * value + ent_coef * (-entropy)` and the parts'
    metrics merged with the `loss/*` terms."""
    total = policy_loss + config.vf_coef * value_loss + config.ent_coef * neg_entropy
    merged = {key: value for part in metrics for key, value in part.items()}
    return total, {**merged, "loss/total": total, "loss/policy": policy_loss, "loss/value": value_loss,
                   "loss/entropy": neg_entropy}


def validate_classic_config(config: ClassicConfig) -> None:
    """Raise ConfigError naming the first key whose value cannot work."""
    if config.env_name not in SUPPORTED_ENVS:
        raise ConfigError(f"`env_name` must be one of {list(SUPPORTED_ENVS)}, got {config.env_name!r}")
    for name in ("num_envs", "num_steps", "total_timesteps", "epochs", "num_minibatches",
                 "hidden_size", "log_every"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"`{name}` must be > 0, got {getattr(config, name)}")
    for name in ("learning_rate", "max_grad_norm", "clip_eps"):
        if getattr(config, name) <= 0:
            raise ConfigError(f"`{name}` must be > 0, got {getattr(config, name)}")
    if config.value_clip_eps is not None and config.value_clip_eps <= 0:
        raise ConfigError(f"`value_clip_eps` must be > 0 or null, got {config.value_clip_eps}")
    for name in ("gamma", "gae_lambda"):
        if not 0.0 <= getattr(config, name) <= 1.0:
            raise ConfigError(f"`{name}` must be in [0, 1], got {getattr(config, name)}")
    for name in ("ent_coef", "vf_coef"):
        if getattr(config, name) < 0:
            raise ConfigError(f"`{name}` must be >= 0, got {getattr(config, name)}")
    batch_size = config.num_envs * config.num_steps
    if batch_size % config.num_minibatches:
        raise ConfigError(
            f"`num_minibatches` ({config.num_minibatches}) must divide num_envs * num_steps "
            f"({batch_size})"
        )
    if config.total_timesteps < batch_size:
        raise ConfigError(
            f"`total_timesteps` ({config.total_timesteps}) must be at least one rollout, "
            f"num_envs * num_steps = {batch_size}"
        )
    if not config.seeds:
        raise ConfigError("`seeds` must list at least one seed")


def derived_sizes(config: ClassicConfig) -> DerivedSizes:
    """Sizes of the training loop (Python ints, computed outside any traced function)."""
    validate_classic_config(config)
    batch_size = config.num_envs * config.num_steps
    num_updates = config.total_timesteps // batch_size
    return DerivedSizes(
        batch_size=batch_size,
        num_updates=num_updates,
        minibatch_size=batch_size // config.num_minibatches,
        optimizer_steps=num_updates * config.epochs * config.num_minibatches,
    )


def load_classic_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ClassicConfig:
    """Load a ClassicConfig from YAML plus `key=value` overrides, then validate it."""
    config = load_config(ClassicConfig, path, overrides)
    try:
        validate_classic_config(config)
    except ConfigError as err:
        source = f"{path}: " if path is not None else ""
        raise ConfigError(f"{source}{err}") from None
    return config
