"""Our side of `vs_trl.py` and `accelerator_check.py`: SFT, DPO, reward-model, GRPO and PPO
training with rlhf_jax.

Each session loads the Hugging Face folders written by `vs_trl.py` with `load_pretrained`,
builds the train states, jits the library's step function once (`make_train_step(sft_step)`,
`make_train_step(preference_step)`, `make_train_step(reward_step)`, `jax.jit(grpo_update)`,
`jax.jit(ppo_iteration)`) and runs its first step at construction: that call holds the
compilation (`compile_seconds` = first call minus a steady step) and, for SFT, DPO and the
reward model, the step-0 loss on the first batch (file rows 0..B-1, before the update).
`run(steps)` then returns the wall and CPU seconds of each further step; a step includes
preparing its batch on the host. Every session has `tokens_per_step` and `flops_per_step`
(model FLOPs: 2 per matmul parameter per token forward, backward = 2 x forward).

These classes are the one place the benchmarks call the training steps: a change of the
step or batch API is adapted here.

`setup` and `hp` are the `Setup` and `Hyperparameters` objects of `vs_trl.py`.
"""
from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import common
from rlhf_jax.models.checkpoint_io import load_pretrained
from rlhf_jax.models.config import ModelConfig
from rlhf_jax.pipeline.batching import BatchIterator
from rlhf_jax.pipeline.data import DataConfig, load_data
from rlhf_jax.training.batches import PreferenceBatch, SFTBatch
from rlhf_jax.training.grpo import GRPOConfig, grpo_rollout, grpo_update
from rlhf_jax.training.preference_step import PreferenceLossConfig, preference_step
from rlhf_jax.training.optim import OptimizerConfig, make_optimizer
from rlhf_jax.training.ppo import PPO_STATIC_ARGNAMES, PPOConfig, kl_controller, ppo_iteration
from rlhf_jax.training.reward_step import reward_step
from rlhf_jax.training.sft_step import sft_step
from rlhf_jax.training.rollout import SamplingConfig
from rlhf_jax.training.state import create_train_state
from rlhf_jax.training.step_runner import make_train_step


def optimizer_config(hp) -> OptimizerConfig:
    """AdamW with TRL's defaults as `_common_args` sets them (linear decay, no warmup)."""
    return OptimizerConfig(learning_rate=hp.learning_rate, schedule="linear", total_steps=100_000,
                           eps=hp.adam_eps, max_grad_norm=hp.max_grad_norm, weight_decay=0.0)


def matmul_params(config: ModelConfig, *, lm_head: bool) -> int:
    """Parameters that take part in matmuls per token (embedding lookup excluded)."""
    d, hd = config.hidden_size, config.dims_per_head
    attention = d * config.num_heads * hd * 2 + 2 * d * config.kv_heads * hd
    mlp = 3 * d * config.intermediate_size
    return config.num_layers * (attention + mlp) + (d * config.vocab_size if lm_head else 0)


def forward_flops(config: ModelConfig, tokens: float, context: float, *, lm_head: bool) -> float:
    """Model FLOPs of a forward pass over `tokens` tokens with mean context `context`:
    2 per matmul parameter per token + attention scores and values `4 * L * context * H * hd`."""
    attention = 4 * config.num_layers * context * config.num_heads * config.dims_per_head
    return tokens * (2 * matmul_params(config, lm_head=lm_head) + attention)


class TrainingSession:
    """Our SFT (`kind="sft"`, prompt + chosen of the pairs file), DPO (`kind="dpo"`) or
    reward-model (`kind="reward"`) steps: one jitted call per step, batches in file order
    (DPO and reward: each pair's prompt runs once). The first step (compile + step-0 loss)
    runs at construction. `tokens_per_step` and `flops_per_step` count the work of the
    prompt + response sequences as TRL runs them (a pair: two sequences)."""

    LOSS_METRICS = {"sft": "sft/loss", "dpo": "dpo/loss", "reward": "reward/loss"}

    def __init__(self, kind: str, setup, hp):
        if kind not in self.LOSS_METRICS:
            raise ValueError(f"kind must be one of {sorted(self.LOSS_METRICS)}, got {kind!r}")
        self.kind = kind
        is_dpo, is_lm = kind == "dpo", kind != "reward"
        module, params = load_pretrained(setup.reward_dir if kind == "reward" else setup.policy_dir, dtype=hp.dtype)
        self.ref_params = load_pretrained(setup.reference_dir, dtype=hp.dtype)[1] if is_dpo else None
        data_config = DataConfig(max_prompt_length=setup.prompt_length + 1,
                                 max_response_length=setup.response_length + 1)
        data_file, data_kind = (setup.sft_file, "sft") if kind == "sft" else (setup.pairs_file, "preference")
        self.data = load_data(data_file, setup.tokenizer_dir, data_config, kind=data_kind)
        self.state = create_train_state(module, params, make_optimizer(optimizer_config(hp)))
        options = {"config": PreferenceLossConfig(beta=hp.beta)} if is_dpo else {}
        step = {"sft": sft_step, "dpo": preference_step, "reward": reward_step}[kind]
        self.run_step = make_train_step(step, **options)
        self.batch_class = SFTBatch if kind == "sft" else PreferenceBatch
        self.batches = BatchIterator(self.data, hp.batch_size, shuffle=False)
        arrays = self.data.arrays
        lengths = arrays["prompt_mask"].sum(1)[:, None] + arrays["response_mask"].sum(2)  # [rows, N]
        self.tokens_per_step = float(hp.batch_size * lengths.sum(1).mean())
        train = forward_flops(setup.config, self.tokens_per_step, float(lengths.mean()), lm_head=is_lm)
        self.flops_per_step = 3 * train + (train if is_dpo else 0.0)  # + the reference forward
        start = time.perf_counter()
        metrics = jax.block_until_ready(self._step())
        first = time.perf_counter() - start
        self.loss0 = float(metrics[self.LOSS_METRICS[kind]])
        self.compile_seconds = first - common.median(self.run(2)[0])

    def first_chosen_ids(self) -> list[int]:
        arrays = self.data.arrays
        prompt = arrays["prompt_ids"][0][arrays["prompt_mask"][0] == 1]
        chosen = arrays["response_ids"][0, 0][arrays["response_mask"][0, 0] == 1]
        return prompt.tolist() + chosen.tolist()

    def _step(self):
        batch = jax.device_put(self.batch_class.from_arrays(next(self.batches)))
        extra = () if self.ref_params is None else (self.ref_params,)
        self.state, metrics = self.run_step(self.state, batch, *extra)
        return metrics

    def run(self, steps: int) -> tuple[list[float], list[float]]:
        """Wall and CPU seconds of `steps` steps."""
        return common.time_calls(self._step, jax.block_until_ready, steps)


class GRPOSession:
    """Our GRPO update: one rollout (G = `hp.grpo_group_size` samples of each of
    `hp.ppo_batch_size // G` prompts, `hp.ppo_response_length` new tokens, reference log-probs,
    reward-model scores, group advantages) made once at construction; each timed step is
    `grpo_update` on it (`hp.ppo_minibatches` minibatches, one pass) as one jitted call. The
    rollout is not timed: the update is the training step."""

    def __init__(self, setup, hp):
        c = setup.config
        policy, policy_params = load_pretrained(setup.policy_dir, dtype=hp.dtype)
        ref_params = load_pretrained(setup.reference_dir, dtype=hp.dtype)[1]
        reward_module, reward_params = load_pretrained(setup.reward_dir, head="reward", dtype=hp.dtype)
        self.state = create_train_state(policy, policy_params, make_optimizer(optimizer_config(hp)))
        sampling = SamplingConfig(max_new_tokens=hp.ppo_response_length, temperature=1.0,
                                  eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id)
        prompts = max(1, hp.ppo_batch_size // hp.grpo_group_size)
        # minibatches hold whole prompt groups: at most one per prompt
        self.config = GRPOConfig(sampling=sampling, group_size=hp.grpo_group_size,
                                 num_minibatches=math.gcd(prompts, hp.ppo_minibatches))
        prompt_ids = jnp.asarray(setup.ppo_prompt_ids[:prompts])
        rollout = jax.jit(grpo_rollout, static_argnames=("config", "reward_module"))
        self.data = jax.block_until_ready(rollout(
            self.state, ref_params, prompt_ids, jnp.ones_like(prompt_ids), jax.random.PRNGKey(0),
            config=self.config, reward_module=reward_module, reward_params=reward_params))
        self.update = jax.jit(grpo_update, static_argnames=("config",), donate_argnames=("policy_state",))
        groups, group_size, response_length = self.data.response_ids.shape  # [n, G, R]
        rows, length = groups * group_size, self.data.prompt_ids.shape[1] + response_length
        self.tokens_per_step = float(rows * length)
        self.flops_per_step = 3 * forward_flops(c, self.tokens_per_step, length, lm_head=True)
        self.index = 0
        start = time.perf_counter()
        metrics = jax.block_until_ready(self._step())
        first = time.perf_counter() - start
        self.loss0 = float(metrics["grpo/loss"])
        self.compile_seconds = first - common.median(self.run(2)[0])

    def _step(self):
        self.index += 1
        self.state, metrics = self.update(self.state, self.data, jax.random.PRNGKey(self.index),
                                          config=self.config)
        return metrics

    def run(self, steps: int) -> tuple[list[float], list[float]]:
        """Wall and CPU seconds of `steps` steps."""
        return common.time_calls(self._step, jax.block_until_ready, steps)


class PPOSession:
    """Our PPO: `ppo_iteration` (rollout with the sampler's log-probs, as TRL does, reference,
    value and reward forwards, GAE, 4 epochs x minibatches) as one jitted call."""

    def __init__(self, setup, hp):
        c = setup.config
        policy, policy_params = load_pretrained(setup.policy_dir, dtype=hp.dtype)
        self.ref_params = load_pretrained(setup.reference_dir, dtype=hp.dtype)[1]
        self.reward_module, self.reward_params = load_pretrained(setup.reward_dir, head="reward", dtype=hp.dtype)
        value, value_params = load_pretrained(setup.reward_dir, head="value", dtype=hp.dtype)  # zero head
        self.policy_state = create_train_state(policy, policy_params, make_optimizer(optimizer_config(hp)))
        self.value_state = create_train_state(value, value_params, make_optimizer(optimizer_config(hp)))
        sampling = SamplingConfig(max_new_tokens=hp.ppo_response_length, temperature=1.0,
                                  eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                                  logprobs_source="generate")
        self.config = PPOConfig(sampling=sampling, kl_coef=hp.kl_coef, epochs=hp.ppo_epochs,
                                num_minibatches=hp.ppo_minibatches)
        self.kl_state = kl_controller(self.config).init()
        self.iteration = jax.jit(ppo_iteration, static_argnames=PPO_STATIC_ARGNAMES,
                                 donate_argnames=("policy_state", "value_state"))
        self.prompts = setup.ppo_prompt_ids
        self.batch_size, self.index = hp.ppo_batch_size, 0
        rows, prompt = hp.ppo_batch_size, self.prompts.shape[1]
        length = prompt + hp.ppo_response_length
        lm = lambda tokens, context: forward_flops(c, tokens, context, lm_head=True)
        body = lambda tokens, context: forward_flops(c, tokens, context, lm_head=False)
        rollout = lm(rows * length, length / 2) + lm(rows * length, length) + 2 * body(rows * length, length)
        update = hp.ppo_epochs * 3 * (lm(rows * length, length) + body(rows * length, length))
        self.flops_per_step = rollout + update
        self.tokens_per_step = float(rows * length)  # prompt + response tokens per iteration
        start = time.perf_counter()
        jax.block_until_ready(self._step())
        first = time.perf_counter() - start
        self.compile_seconds = first - common.median(self.run(2)[0])

    def _step(self):
        rows = np.arange(self.index, self.index + self.batch_size) % len(self.prompts)
        self.index += self.batch_size
        prompt_ids = jnp.asarray(self.prompts[rows])
        key = jax.random.fold_in(jax.random.PRNGKey(0), self.index)
        self.policy_state, self.value_state, self.kl_state, metrics = self.iteration(
            self.policy_state, self.value_state, self.kl_state, self.ref_params, prompt_ids,
            jnp.ones_like(prompt_ids), key, config=self.config, reward_module=self.reward_module,
            reward_params=self.reward_params)
        return metrics

    def run(self, steps: int) -> tuple[list[float], list[float]]:
        """Wall and CPU seconds of `steps` steps."""
        return common.time_calls(self._step, jax.block_until_ready, steps)


__all__ = ["optimizer_config", "matmul_params", "forward_flops", "TrainingSession", "GRPOSession",
           "PPOSession"]
