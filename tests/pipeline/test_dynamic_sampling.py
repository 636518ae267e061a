"""DAPO dynamic sampling: which groups are dropped and how many refills, against a plain
NumPy reference written from the paper's description (arXiv:2503.14476, section 3.2)."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from rlhf_jax.pipeline.dynamic_sampling import needs_refill, select_groups, tied_groups


def reference_selection(draws, num_groups, group_size, max_refills):
    """Keep sampling (up to max_refills extra draws) until num_groups groups with 0 < std;
    pad with the tied groups in order when the cap is hit."""
    informative, uninformative, used = [], [], 0
    for index, scores in enumerate(draws[: max_refills + 1]):
        if index > 0 and len(informative) >= num_groups:
            break
        used = index
        for group in range(len(scores) // group_size):
            values = scores[group * group_size:(group + 1) * group_size]
            (informative if np.std(values) > 0 else uninformative).append((index, group))
    batch = informative[:num_groups]
    batch += uninformative[: num_groups - len(batch)]
    return batch, used


def test_a_worked_example():
    group = 2
    draws = [np.array([1, 1, 0, 1, 0, 0, 1, 0], np.float32),   # groups: tie, keep, tie, keep
             np.array([0, 0, 1, 1, 0.5, 0, 1, 1], np.float32),  # tie, tie, keep, tie
             np.array([0, 1, 0, 1, 0, 1, 0, 1], np.float32)]    # all keep
    np.testing.assert_array_equal(tied_groups(draws[0], group), [True, False, True, False])
    selection = select_groups(draws, 4, group)
    assert selection.groups == [(0, 1), (0, 3), (1, 2), (2, 0)]
    assert selection.refills == 2 and selection.dropped_fraction == 0.5 and selection.filled_fraction == 0.0
    short = select_groups(draws[:2], 4, group)  # cap reached after one refill: fill with ties
    assert short.groups == [(0, 1), (0, 3), (1, 2), (0, 0)]
    assert short.refills == 1 and short.filled_fraction == 0.25
    assert needs_refill(draws[:1], 4, group) and not needs_refill(draws, 4, group)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), num_groups=st.integers(1, 5), group_size=st.integers(2, 4),
       max_refills=st.integers(0, 3))
def test_matches_the_reference(seed, num_groups, group_size, max_refills):
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, 2, num_groups * group_size).astype(np.float32) for _ in range(max_refills + 1)]
    # the stage draws only while a refill is needed and the cap allows one
    taken = [draws[0]]
    while len(taken) <= max_refills and needs_refill(taken, num_groups, group_size):
        taken.append(draws[len(taken)])
    selection = select_groups(taken, num_groups, group_size)
    groups, used = reference_selection(draws, num_groups, group_size, max_refills)
    assert selection.groups == groups and selection.refills == used
    first_ties = [np.std(draws[0][g * group_size:(g + 1) * group_size]) == 0 for g in range(num_groups)]
    assert selection.dropped_fraction == pytest.approx(np.mean(first_ties))
