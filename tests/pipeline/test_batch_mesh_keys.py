"""A batch size that does not split over the mesh's batch shards, or into
`train.num_microbatches`, is one config-error line naming the key, before any model is built
(tests run on 8 host devices, tests/conftest.py)."""
import re

import jax
import pytest
from stage_helpers import QUIET, sft_overrides, tiny_task

from rlhf_jax.pipeline import cli
from rlhf_jax.pipeline.stages.stage_setup import check_batch_shards, stage_mesh
from rlhf_jax.training.sharding import MeshConfig
from rlhf_jax.typed_config import ConfigError


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    return tiny_task(tmp_path_factory.mktemp("task"))


def test_check_batch_shards_names_the_key():
    assert jax.device_count() >= 4
    mesh = stage_mesh(MeshConfig(data=2, fsdp=2))
    check_batch_shards(mesh, {"train.batch_size": 8, "eval.batch_size": 4})
    with pytest.raises(ConfigError, match=r"`eval.batch_size` \(6\) must be a multiple of the mesh's 4 batch "
                                          r"shards \(`mesh.data` x `mesh.fsdp` = 2 x 2\): set it to 4 or 8"):
        check_batch_shards(mesh, {"train.batch_size": 8, "eval.batch_size": 6})
    with pytest.raises(ConfigError, match=r"`train.batch_size` \(2\) must be a multiple of the mesh's 8 batch "
                                          r"shards \(`mesh.data` x `mesh.fsdp` = 8 x 1\): set it to 8, or change "
                                          r"`mesh` \(e.g. `mesh.data=2`\)$"):
        check_batch_shards(stage_mesh(MeshConfig(data=8)), {"train.batch_size": 2})


@pytest.mark.parametrize("extra, message", [
    (["mesh.data=3"], r"`train.batch_size` \(8\) must be a multiple of the mesh's 3 batch shards"),
    (["mesh.data=2", "eval.batch_size=5"], r"`eval.batch_size` \(5\) must be a multiple of the mesh's 2"),
    (["train.num_microbatches=3"], r"`train.batch_size` \(8\) must be a multiple of `train.num_microbatches` \(3\)"),
    (["mesh.data=2", "mesh.fsdp=8"], r"`mesh`: mesh data x fsdp x tensor = 2 x 8 x 1 = 16 does not match"),
])
def test_sft_batch_that_does_not_fit_the_mesh_is_a_config_error(task, tmp_path, capsys, extra, message):
    argv = [arg for arg in sft_overrides(task, tmp_path / "run", steps=1) if arg != QUIET[-1]]
    code = cli.main(["sft", *argv, *extra])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2
    assert len(lines) == 1 and lines[0].startswith("rlhf-jax sft: config error: ")
    assert re.search(message, lines[0]), lines[0]
