"""A counted token outside the vocabulary (Hugging Face-style -100 labels passed with the
attention mask as `mask`) is a ValueError naming the position, not a silent NaN loss; the
same id under mask 0, or at the unread first position, is fine, and under jit nothing reads
values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.sft import sft_loss
from rlhf_jax.ops.logprobs import sequence_logprobs

B, T, V = 2, 5, 7
LOGITS = jax.random.normal(jax.random.key(0), (B, T, V))
IDS = np.array([[-100, -100, 3, 4, 5], [1, 2, 3, 4, 6]])  # row 0: prompt labels set to -100
MASK = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], np.float32)


@pytest.mark.parametrize("fn", [lambda ids, mask: sft_loss(LOGITS, ids, mask)[0],
                                lambda ids, mask: sequence_logprobs(LOGITS, ids, mask)])
def test_out_of_vocabulary_counted_label_is_an_error(fn):
    assert np.all(np.isfinite(fn(IDS, MASK)))  # -100 under mask 0: ignored
    first_unread = IDS.copy()
    first_unread[1, 0] = -100  # mask[:, 0] is never read: nothing predicts the first token
    assert np.all(np.isfinite(fn(first_unread, MASK)))
    with pytest.raises(ValueError, match=r"`input_ids` holds token id -100 at index \[0, 1\].*mask 0"):
        fn(IDS, np.ones((B, T), np.float32))  # the attention mask by mistake
    too_big = IDS.copy()
    too_big[1, 3] = V
    with pytest.raises(ValueError, match=rf"token id {V} at index \[1, 3\].*\[0, {V}\)"):
        fn(too_big, MASK.astype(bool))
    jitted = jax.jit(fn)(IDS, np.ones((B, T), np.float32))  # traced: no value check
    assert not np.all(np.isfinite(jitted))
