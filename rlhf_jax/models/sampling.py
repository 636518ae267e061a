"""Next-token selection: temperature, top-k, top-p (nucleus) and greedy, on [B, V] logits.

Every option that changes the program (top_k, top_p, greedy) is a static Python value, so a
disabled filter costs nothing: top_p == 1 never sorts the vocabulary, top_k == 0 never runs
`lax.top_k`. The returned log-probability is that of the full temperature-scaled
distribution, `log_softmax(logits / T)[token]`, which is what a training forward pass
recomputes (the filters only restrict which tokens can be drawn). `select_kept_set` also
returns the distribution the token was actually drawn from: the kept set, described by a
threshold `t` midway between its smallest scaled logit and the largest excluded one (the kept
set is `{v : logits_v / T >= t}`; `t = -inf` when nothing is excluded), and the token's
log-probability renormalised over it, `z_token - logsumexp(z_v : z_v >= t)` with
`z = logits / T`; a trainer replays that distribution from `t` (`rlhf_jax.ops.kept_set`).

Tokens are drawn by inverse-CDF sampling with one uniform number per row, and argmax-like
choices use min-reductions over indices: both are much cheaper on CPU than Gumbel-max
(one random number per vocabulary entry) and `argmax` (a variadic reduction).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.ops.checks import check_rank


def top_k_filter(logits, top_k: int):
    """Keep the `top_k` largest logits per row (ties with the k-th are kept); others -> -inf."""
    kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]  # [B, 1]
    return jnp.where(logits < kth_largest, -jnp.inf, logits)


def top_p_filter(logits, top_p: float):
    """Nucleus filter (Holtzman et al. 2019, arXiv:1904.09751).

    Keep the smallest set of most likely tokens whose probability mass reaches `top_p`: a
    token is kept when the mass of the tokens strictly more likely than it is below `top_p`
    (so the most likely token is always kept). Others -> -inf.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]  # descending, [B, V]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = mass_before < top_p
    # The smallest kept logit is the cut-off; equal logits are kept together.
    cutoff = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits < cutoff, -jnp.inf, logits)


def first_index(condition):
    """Index of the first True of each row of a [B, V] bool array, V where there is none.

    A plain min-reduction: on CPU it is several times faster than `argmax`, whose
    (value, index) reduction does not vectorise.
    """
    size = condition.shape[-1]
    return jnp.min(jnp.where(condition, jnp.arange(size, dtype=jnp.int32), size), axis=-1)


def _draw(uniforms, weights):
    """Inverse-CDF draw from unnormalised weights [B, V] whose row maximum is exactly 1.

    `uniforms` [B] in (0, 1]. Returns (tokens [B], cumulative weights [B, V]). The token is
    the first index with a nonzero weight whose cumulative weight reaches `u * total`; if
    rounding leaves no such index, the most likely token is taken.
    """
    cdf = jnp.cumsum(weights, axis=-1)
    drawn = first_index((cdf >= uniforms[:, None] * cdf[:, -1:]) & (weights > 0))
    most_likely = first_index(weights == 1.0)
    return jnp.where(drawn < weights.shape[-1], drawn, most_likely), cdf


def open_uniforms(rng, shape):
    """Uniform numbers in (0, 1] (never 0, so a draw never lands before the first token)."""
    return 1.0 - jax.random.uniform(rng, shape, dtype=jnp.float32)


def categorical(rng, logits):
    """One index per row drawn with probability `softmax(logits)` (-inf entries never drawn).

    Inverse-CDF sampling with one uniform number per row; Gumbel-max
    (`jax.random.categorical`) needs one random number per vocabulary entry and is several
    times slower on CPU for LM vocabularies.
    """
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # [B, V], 0 where -inf
    return _draw(open_uniforms(rng, logits.shape[:1]), weights)[0]


def check_temperature(temperature) -> None:
    """Raise unless a static temperature is > 0, pointing to `greedy=True` for temperature 0."""
    if isinstance(temperature, (int, float)) and not temperature > 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}; for greedy decoding (what "
                         "temperature 0 means elsewhere) pass `greedy=True` and keep temperature 1")


def validate_sampling_options(*, temperature, top_k: int, top_p: float, greedy: bool) -> None:
    check_temperature(temperature)
    if not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"`top_k` must be a static int >= 0 (0 disables it), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"`top_p` must be a static float in (0, 1] (1 disables it), got {top_p!r}")
    if not isinstance(greedy, bool):
        raise ValueError(f"`greedy` must be a static bool, got {greedy!r}")


def sample_tokens(rng, logits, *, temperature=1.0, top_k: int = 0, top_p: float = 1.0,
                  greedy: bool = False):
    """Draw one token per row from logits [B, V] -> (tokens [B] int32, logprobs [B] float32).

    greedy: argmax of the logits (rng unused). Otherwise sample from
    `softmax(filter(logits / T))` with top-k then top-p filtering when enabled.
    logprobs: `log_softmax(logits / T)` at the chosen token (unfiltered distribution).
    """
    check_rank(logits, 2, "logits")
    uniforms = None if greedy else open_uniforms(rng, logits.shape[:1])
    return select_tokens(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p,
                         greedy=greedy)


class KeptSetSelection(NamedTuple):
    """Tokens, their full-distribution log-probs, and the kept set they were drawn from."""

    tokens: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] float32: log_softmax(logits / T)[token]
    kept_logprobs: jax.Array  # [B] float32: log-prob under the kept set renormalised
    kept_threshold: jax.Array  # [B] float32: between the kept and the excluded scaled logits


def select_tokens(logits, uniforms, *, temperature=1.0, top_k: int = 0, top_p: float = 1.0,
                  greedy: bool = False):
    """`sample_tokens` with the randomness given: `uniforms` [B] in (0, 1] (None if greedy).

    Lets a decode loop draw all its random numbers before the loop.
    """
    selection = _select(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p,
                        greedy=greedy, kept_set=False)
    return selection.tokens, selection.logprobs


def select_kept_set(logits, uniforms, *, temperature=1.0, top_k: int = 0, top_p: float = 1.0,
                    greedy: bool = False) -> KeptSetSelection:
    """`select_tokens` plus the kept set: its threshold and the renormalised log-prob.

    Same tokens as `select_tokens` for the same `uniforms`. Greedy keeps only the row maximum
    (kept log-prob 0); without filters the kept set is the whole vocabulary (threshold = the
    smallest scaled logit, kept log-prob = the full one).
    """
    return _select(logits, uniforms, temperature=temperature, top_k=top_k, top_p=top_p,
                   greedy=greedy, kept_set=True)


def _select(logits, uniforms, *, temperature, top_k, top_p, greedy, kept_set) -> KeptSetSelection:
    check_rank(logits, 2, "logits")
    validate_sampling_options(temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy)
    logits = logits.astype(jnp.float32)
    if not (isinstance(temperature, (int, float)) and temperature == 1.0):
        logits = logits / temperature
    row_max = jnp.max(logits, axis=-1, keepdims=True)  # [B, 1]; the filters keep this token
    total = None  # sum of exp(logits - row_max) over the whole vocabulary
    kept_total = kept = None  # the kept set's mass (same shift) and membership [B, V]
    if greedy:
        tokens = jnp.minimum(first_index(logits == row_max), logits.shape[-1] - 1)
        if kept_set:
            kept_total, kept = jnp.ones(logits.shape[:1], jnp.float32), logits == row_max
    else:
        filtered = logits
        if 0 < top_k < logits.shape[-1]:
            filtered = top_k_filter(filtered, top_k)
        if top_p < 1.0:
            filtered = top_p_filter(filtered, top_p)
        tokens, cdf = _draw(uniforms, jnp.exp(filtered - row_max))
        if filtered is logits:
            total = cdf[:, -1]  # unfiltered: the draw already summed every weight
        if kept_set:
            kept_total, kept = cdf[:, -1], ~jnp.isneginf(filtered)
    if total is None:
        total = jnp.sum(jnp.exp(logits - row_max), axis=-1)
    chosen = jnp.take_along_axis(logits, tokens[:, None], axis=-1)[:, 0]
    logprobs = chosen - (row_max[:, 0] + jnp.log(total))
    kept_logprobs = threshold = None
    if kept_set:
        kept_logprobs = chosen - (row_max[:, 0] + jnp.log(kept_total))
        smallest_kept = jnp.min(jnp.where(kept, logits, jnp.inf), axis=-1)
        largest_excluded = jnp.max(jnp.where(kept, -jnp.inf, logits), axis=-1)
        threshold = 0.5 * smallest_kept + 0.5 * largest_excluded  # -inf when nothing is excluded
    return KeptSetSelection(tokens.astype(jnp.int32), logprobs, kept_logprobs, threshold)
