"""The frozen base left out of LoRA checkpoints: its fingerprint (exact, sharding-independent,
sensitive to any changed bit or moved value) and the resume check's errors."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax.pipeline.errors import CheckpointError
from rlhf_jax.pipeline.frozen_base import BaseSource, base_record, check_base, tree_fingerprint
from rlhf_jax.training.lora_state import LoRAApply, frozen_bases, with_frozen_base, without_frozen_base


def _tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"embed": rng.normal(size=(16, 8)).astype(np.float32),
            "norm": rng.normal(size=(8,)).astype(jnp.bfloat16),
            "square": rng.normal(size=(8, 8)).astype(np.float32),
            "count": np.arange(5, dtype=np.int32)}


def test_fingerprint_is_the_same_on_one_device_and_sharded_over_eight():
    tree = _tree()
    mesh = jax.make_mesh((8,), ("fsdp",))
    sharded = {"embed": jax.device_put(tree["embed"], NamedSharding(mesh, PartitionSpec("fsdp"))),
               "norm": jax.device_put(tree["norm"], NamedSharding(mesh, PartitionSpec("fsdp"))),
               "square": jax.device_put(tree["square"], NamedSharding(mesh, PartitionSpec(None, "fsdp"))),
               "count": jax.device_put(tree["count"], NamedSharding(mesh, PartitionSpec()))}
    single = jax.device_put(tree, jax.devices()[0])
    assert tree_fingerprint(single) == tree_fingerprint(sharded) == tree_fingerprint(tree)


@pytest.mark.parametrize("change", ["one_bit", "transpose", "dtype", "leaf_name", "shape"])
def test_fingerprint_changes_with_any_changed_bit_moved_value_or_layout(change):
    tree = _tree()
    other = dict(tree)
    if change == "one_bit":
        flipped = tree["embed"].copy().view(np.uint32)
        flipped[3, 5] ^= 1
        other["embed"] = flipped.view(np.float32)
    elif change == "transpose":
        other["square"] = np.ascontiguousarray(tree["square"].T)
    elif change == "dtype":
        other["count"] = tree["count"].astype(np.uint32)
    elif change == "leaf_name":
        other["counts"] = other.pop("count")
    else:
        other["embed"] = tree["embed"].reshape(8, 16)
    assert tree_fingerprint(other) != tree_fingerprint(tree)


def _carry(base):
    apply = LoRAApply(model=None, base=base, dropout_key=jnp.zeros(2, jnp.uint32))
    return {"policy": {"apply_fn": apply, "params": {"lora": jnp.ones(3)}}, "rng": jnp.zeros(2, jnp.uint32)}


def test_without_and_with_frozen_base_round_trip():
    carry = _carry(_tree())
    stored = without_frozen_base(carry)
    assert stored["policy"]["apply_fn"].base is None
    assert len(jax.tree.leaves(stored)) == len(jax.tree.leaves(carry)) - len(_tree())
    assert list(frozen_bases(carry)) == ["policy.apply_fn"] and frozen_bases(stored) == {"policy.apply_fn": None}
    back = with_frozen_base(stored, carry)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(a, b), back, carry))


def test_check_base_names_the_config_key_of_a_different_base():
    where = "runs/x/checkpoints/4"
    saved = base_record(_carry(_tree(0)), {"policy": BaseSource("policy.path", "runs/sft/model")})
    same = base_record(_carry(_tree(0)), {"policy": BaseSource("policy.path", "/copy/of/sft")})
    check_base(saved, same, where)  # another folder with the same weights resumes
    other = base_record(_carry(_tree(1)), {"policy": BaseSource("policy.path", "runs/other")})
    with pytest.raises(CheckpointError, match=r"^`policy.path`: the frozen base differs from the one the "
                                              r"checkpoint runs/x/checkpoints/4 was trained on \(then "
                                              r"policy.path=runs/sft/model, now policy.path=runs/other"):
        check_base(saved, other, where)
    with pytest.raises(CheckpointError, match="records no frozen base"):
        check_base({}, same, where)
    with pytest.raises(CheckpointError, match="has a LoRA state `policy` but this run does not"):
        check_base(saved, {}, where)
    check_base(None, {}, where)  # full fine-tuning: nothing to check
