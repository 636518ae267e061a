"""DAPO's dynamic sampling on the host (Yu et al. 2025, arXiv:2503.14476, section 3.2).

A group whose G rewards all tie has zero group-relative advantage and contributes no policy
gradient, only a smaller effective batch. Dynamic sampling drops such groups and refills the
batch with groups sampled for further prompts:

    draw 0: n prompts -> n groups; keep the groups whose rewards do not all tie
    draw r = 1 .. max_refills, while fewer than n groups are kept: n more prompts, same rule
    batch = the first n kept groups in draw order; if fewer than n were kept after the last
            draw, the rest is filled with tied groups in draw order (they add no gradient)

`select_groups` makes that choice from the scores alone; the stage gathers the rows.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np


def tied_groups(scores: np.ndarray, group_size: int) -> np.ndarray:
    """`[n]` bool: the groups (contiguous `group_size` rows of `scores [n * G]`) whose rewards
    are all equal."""
    grouped = np.asarray(scores, np.float32).reshape(-1, group_size)
    return np.all(grouped == grouped[:, :1], axis=1)


@dataclasses.dataclass(frozen=True)
class GroupSelection:
    """Which groups form the batch: `(draw, group)` pairs, and what it took."""

    groups: list[tuple[int, int]]  # (draw index, group index within the draw), batch order
    refills: int  # draws after the first one that were used
    dropped_fraction: float  # share of the first draw's groups that tied
    filled_fraction: float  # share of the batch made of tied groups (refills ran out)


def select_groups(draw_scores: Sequence[np.ndarray], num_groups: int, group_size: int) -> GroupSelection:
    """The batch of `num_groups` groups from the draws' scores (see the module docstring).

    `draw_scores[r]` are the `[n * G]` scores of draw r; draws after the batch is full are
    not looked at (`refills` counts only the draws needed).
    """
    kept, tied, refills = [], [], 0
    for draw, scores in enumerate(draw_scores):
        if draw > 0:
            if len(kept) >= num_groups:
                break
            refills = draw
        ties = tied_groups(scores, group_size)
        kept += [(draw, group) for group in np.flatnonzero(~ties)]
        tied += [(draw, group) for group in np.flatnonzero(ties)]
    groups = kept[:num_groups]
    filled = num_groups - len(groups)
    groups += tied[:filled]
    if len(groups) < num_groups:
        raise ValueError(f"the draws hold {len(groups)} groups, fewer than the {num_groups} needed")
    first = tied_groups(draw_scores[0], group_size)
    return GroupSelection(groups, refills, float(first.mean()), filled / num_groups)


def needs_refill(draw_scores: Sequence[np.ndarray], num_groups: int, group_size: int) -> bool:
    """Whether the draws so far keep fewer than `num_groups` non-tied groups."""
    kept = sum(int((~tied_groups(scores, group_size)).sum()) for scores in draw_scores)
    return kept < num_groups


def group_rows(groups: Sequence[tuple[int, int]], group_size: int) -> list[tuple[int, np.ndarray]]:
    """Per selected group, `(draw, row indices within the draw)`."""
    return [(draw, np.arange(group * group_size, (group + 1) * group_size)) for draw, group in groups]


__all__ = ["tied_groups", "GroupSelection", "select_groups", "needs_refill", "group_rows"]
