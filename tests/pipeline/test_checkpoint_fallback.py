"""A damaged finished checkpoint: restore falls back to the newest readable one and sets the
damaged one aside; with none readable, one CheckpointError names the folder."""
import glob
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.pipeline.checkpoint import Checkpointer
from rlhf_jax.pipeline.errors import CheckpointError


def _state(step):
    return {"w": jnp.full((4, 3), float(step)), "count": jnp.asarray(step, jnp.int32)}


def _truncate(pattern):
    paths = glob.glob(pattern)
    assert paths, pattern
    for path in paths:
        with open(path, "r+b") as file:
            file.truncate(min(5, os.path.getsize(path) // 2))


@pytest.fixture
def directory(tmp_path):
    with Checkpointer(tmp_path / "ckpt", async_save=False) as checkpointer:
        for step in (1, 2, 3):
            checkpointer.save(step, _state(step), {"step": step})
    return tmp_path / "ckpt"


# The files a full disk or a storage crash can leave truncated in a finished checkpoint.
DAMAGES = {
    "sharding file (orbax: FAILED_PRECONDITION Invalid JSON)": "state/_sharding",
    "state metadata": "state/_METADATA",
    "array data": "state/d/*",
    "ocdbt manifest": "state/manifest.ocdbt",
    "meta item": "meta/metadata",
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_latest_falls_back_to_the_newest_readable(directory, damage):
    _truncate(str(directory / "3" / DAMAGES[damage]))
    with Checkpointer(directory, async_save=False) as checkpointer:
        assert checkpointer.latest_step() == 3  # orbax lists it: it was finished, then damaged
        state, meta, skipped = checkpointer.restore_latest_readable(target=_state(0))
        assert meta["step"] == 2 and int(state["count"]) == 2
        np.testing.assert_array_equal(np.asarray(state["w"]), np.full((4, 3), 2.0))
        assert [step for step, _ in skipped] == [3] and skipped[0][1]
        assert "\n" not in skipped[0][1] and len(skipped[0][1]) < 300
        assert checkpointer.all_steps() == [1, 2]  # set aside, so step 3 can be written again
        assert checkpointer.save(3, _state(30), {"step": 3})
    assert (directory / "3.unreadable").is_dir()
    with Checkpointer(directory, async_save=False) as checkpointer:
        state, meta, skipped = checkpointer.restore_latest_readable(target=_state(0))
        assert meta["step"] == 3 and int(state["count"]) == 30 and skipped == []


def test_several_damaged_are_all_named_and_set_aside(directory):
    _truncate(str(directory / "3" / "state" / "_sharding"))
    _truncate(str(directory / "2" / "meta" / "metadata"))
    with Checkpointer(directory, async_save=False) as checkpointer:
        _, meta, skipped = checkpointer.restore_latest_readable(target=_state(0))
        assert meta["step"] == 1 and [step for step, _ in skipped] == [3, 2]
        assert checkpointer.all_steps() == [1]


def test_none_readable_names_the_folder_and_moves_nothing(directory):
    for step in (1, 2, 3):
        _truncate(str(directory / str(step) / "state" / "_sharding"))
    with Checkpointer(directory, async_save=False) as checkpointer:
        with pytest.raises(CheckpointError, match=rf"^no readable checkpoint in {directory} \(step 3: .*; "
                                                  r"step 2: .*; step 1: .*\)$"):
            checkpointer.restore_latest_readable(target=_state(0))
        assert checkpointer.all_steps() == [1, 2, 3]
    assert sorted(os.listdir(directory)) == ["1", "2", "3"]


def test_a_structure_mismatch_is_reported_not_skipped_past(directory):
    """A target that fits no checkpoint (e.g. a changed model) fails on every step alike."""
    with Checkpointer(directory, async_save=False) as checkpointer:
        with pytest.raises(CheckpointError, match="does not match the restore target"):
            checkpointer.restore_latest_readable(target={"w": jnp.zeros((4, 3))})
        assert checkpointer.all_steps() == [1, 2, 3]


def test_an_unfinished_save_is_never_listed(directory):
    """What orbax guarantees: a step is written under a temporary name and renamed when
    complete, so a save cut off by a kill is not a step (and is cleaned up on the next open)."""
    unfinished = directory / "4.orbax-checkpoint-tmp-1733500000000000"
    unfinished.mkdir()
    (unfinished / "state").mkdir()
    with Checkpointer(directory, async_save=False) as checkpointer:
        assert checkpointer.all_steps() == [1, 2, 3]
        _, meta, skipped = checkpointer.restore_latest_readable(target=_state(0))
        assert meta["step"] == 3 and skipped == []
    assert not unfinished.exists()
