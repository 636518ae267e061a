"""Scalar heads on the decoder: a per-token value model and a sequence reward model.

Both share the parameter layout `{"decoder": ..., "score": {"kernel": [D, 1], "bias": [1]}}`,
so a value model can start from a reward model (or a policy) by copying `params["decoder"]`
(and, if wanted, `params["score"]`). The `score` name matches Hugging Face
`*ForSequenceClassification` checkpoints, whose `score.weight` is this kernel transposed.
Heads compute in float32.

    values = ValueModel(config).apply({"params": p}, input_ids, attention_mask)    # [B, T]
    rewards = RewardModel(config).apply({"params": p}, input_ids, attention_mask)  # [B]
    # from hidden states [..., D] already computed: method="scores_from_hidden" -> [...]
"""
from __future__ import annotations

import math

import flax.linen as nn
import jax.numpy as jnp

from rlhf_jax.models.config import ModelConfig
from rlhf_jax.models.layers import fold_matmul
from rlhf_jax.models.transformer import Decoder, shared_prefix_forward
from rlhf_jax.ops.masking import last_token_index


class ScalarHead(nn.Module):
    """`hidden @ kernel + bias` -> one float32 scalar per position."""

    kernel_std: float  # 0 gives an all-zero head

    @nn.compact
    def __call__(self, hidden):  # [..., D] -> [...]
        init = nn.initializers.zeros if self.kernel_std == 0 else nn.initializers.normal(self.kernel_std)
        kernel = self.param("kernel", init, (hidden.shape[-1], 1), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (1,), jnp.float32)
        return (fold_matmul(hidden.astype(jnp.float32), kernel) + bias)[..., 0]


def reward_head_std(hidden_size: int) -> float:
    """Reward-head init std `1 / sqrt(d_model + 1)` (Ziegler et al. 2019, arXiv:1909.08593)."""
    return 1.0 / math.sqrt(hidden_size + 1)


class _ScalarHeadModel(nn.Module):
    """Decoder + `ScalarHead` named `score`; subclasses set the head's init std."""

    config: ModelConfig

    def head_std(self) -> float:
        raise NotImplementedError

    def setup(self):
        self.decoder = Decoder(self.config)
        self.score = ScalarHead(kernel_std=self.head_std())

    def token_scores(self, input_ids, attention_mask=None, position_ids=None):
        """The head applied at every position [B, T]."""
        return self.score(self.hidden_states(input_ids, attention_mask, position_ids))

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None, output_positions=None):
        """Final hidden states [B, T, D] (`[B, M, D]` at `output_positions` [B, M], see `Decoder`)."""
        return self.decoder(input_ids, attention_mask, position_ids, None, output_positions)[0]

    def shared_prefix_hidden_states(self, prompt_ids, prompt_mask, response_ids, response_mask,
                                    response_positions=None):
        """`(prompt_last [B, D], responses [B, N, R, D])` (`[B, N, M, D]` at
        `response_positions` [B, N, M]), each prompt run once (see
        `rlhf_jax.models.transformer.shared_prefix_forward`)."""
        return shared_prefix_forward(self.decoder, self.config, prompt_ids, prompt_mask,
                                     response_ids, response_mask, response_positions)

    def scores_from_hidden(self, hidden):
        return self.score(hidden)


class ValueModel(_ScalarHeadModel):
    """Decoder + a zero-initialised scalar head: a value estimate V(s_t) for every token.

    A zero head makes the first value estimates 0, so the first PPO updates are not driven by
    a random critic. `values[:, t]` is the value of the state after reading token t.
    """

    def head_std(self) -> float:
        return 0.0

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        """Values [B, T] float32."""
        return self.token_scores(input_ids, attention_mask, position_ids)


class RewardModel(_ScalarHeadModel):
    """Decoder + a scalar head read at the last non-pad token of each row.

    `r(x, y) = w . h_last + b` where `h_last` is the final hidden state at the last position
    whose attention mask is 1 (works for left and right padding); `w ~ N(0, 1/(d_model+1))`,
    `b = 0` at init. `token_scores` gives the reward at each prefix end.
    """

    def head_std(self) -> float:
        return reward_head_std(self.config.hidden_size)

    def __call__(self, input_ids, attention_mask=None, position_ids=None):
        """Rewards [B] float32."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        last = last_token_index(attention_mask)  # [B]
        # the last layer past its keys and values runs at the read position only
        last_hidden = self.hidden_states(input_ids, attention_mask, position_ids, last[:, None])[:, 0]  # [B, D]
        return self.score(last_hidden)
