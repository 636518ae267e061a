"""Multi-process start-up: `jax.distributed.initialize` from config or the cluster environment.

Call `initialize_distributed(config)` once per process, before any other JAX call. Three ways:

- explicit: `coordinator_address` ("host:port" of process 0), `num_processes` and
  `process_id` all given (e.g. N local processes on one machine, or a hand-written launcher);
- cluster: none of the three given, and JAX recognises the environment (SLURM, Open MPI,
  Cloud TPU pods, Kubernetes; see `detect_cluster`): JAX reads them from it. Values that are
  given override the detected ones;
- single process: nothing given and no cluster detected (or `num_processes == 1`): nothing
  is done.

`local_device_ids` restricts a process to some of the machine's accelerators (one process per
GPU); the environment variables JAX_COORDINATOR_ADDRESS and JAX_LOCAL_DEVICE_IDS are honoured
by JAX itself.
"""
from __future__ import annotations

import dataclasses
import os

import jax


@dataclasses.dataclass
class DistributedConfig:
    coordinator_address: str | None = None  # "host:port" of process 0
    num_processes: int | None = None  # total number of processes
    process_id: int | None = None  # this process, in [0, num_processes)
    local_device_ids: tuple[int, ...] | None = None  # accelerators this process uses
    initialization_timeout: int = 300  # seconds to wait for all processes to connect


def detect_cluster() -> str | None:
    """Name of the cluster environment JAX would auto-detect ("slurm", "ompi", ...) or None.

    Uses JAX's own cluster registry when available; otherwise looks for SLURM and Open MPI
    variables only.
    """
    try:
        from jax._src import clusters  # internal: the registry behind jax.distributed
        for cluster in clusters.ClusterEnv._cluster_types:
            if not cluster.opt_in_only_method and cluster.is_env_present():
                return cluster.name or cluster.__name__
        return None
    except (ImportError, AttributeError):
        if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ:
            return "slurm"
        if "OMPI_MCA_orte_hnp_uri" in os.environ:
            return "ompi"
        return None


def _explicit_values(config: DistributedConfig) -> dict:
    return {
        "coordinator_address": config.coordinator_address,
        "num_processes": config.num_processes,
        "process_id": config.process_id,
    }


def validate_distributed_config(config: DistributedConfig) -> None:
    """Raise ValueError for values that cannot describe a valid process group."""
    if config.num_processes is not None and config.num_processes < 1:
        raise ValueError(f"`num_processes` must be >= 1, got {config.num_processes}")
    if config.process_id is not None and config.process_id < 0:
        raise ValueError(f"`process_id` must be >= 0, got {config.process_id}")
    if (
        config.num_processes is not None
        and config.process_id is not None
        and config.process_id >= config.num_processes
    ):
        raise ValueError(
            f"`process_id` ({config.process_id}) must be smaller than `num_processes` "
            f"({config.num_processes}); process ids run from 0 to num_processes - 1"
        )
    address = config.coordinator_address
    if address is not None:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"`coordinator_address` must look like 'host:port', got {address!r}")
    if config.local_device_ids is not None and any(
        not isinstance(i, int) or i < 0 for i in config.local_device_ids
    ):
        raise ValueError(f"`local_device_ids` must be non-negative ints, got {config.local_device_ids}")


def initialize_distributed(config: DistributedConfig | None = None) -> bool:
    """Start JAX's multi-process runtime as `config` and the environment say; return True if
    `jax.distributed.initialize` was called, False for a single process or a runtime this
    process already started (so a script may run several stages, each calling this)."""
    if jax.distributed.is_initialized():
        return False
    config = DistributedConfig() if config is None else config
    if config.coordinator_address is None and os.environ.get("JAX_COORDINATOR_ADDRESS"):
        # jax.distributed reads this variable itself; count it as given.
        config = dataclasses.replace(config, coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"])
    validate_distributed_config(config)
    values = _explicit_values(config)
    given = [name for name, value in values.items() if value is not None]
    missing = [name for name, value in values.items() if value is None]
    if config.num_processes == 1:
        return False
    if not given and detect_cluster() is None:
        return False
    if given and missing and detect_cluster() is None:
        raise ValueError(
            f"distributed config sets {', '.join(given)} but not {', '.join(missing)}, and no "
            "cluster environment (SLURM, Open MPI, TPU pod, ...) provides them; set all of "
            "coordinator_address, num_processes and process_id, or none"
        )
    local_ids = list(config.local_device_ids) if config.local_device_ids is not None else None
    jax.distributed.initialize(
        **values,
        local_device_ids=local_ids,
        initialization_timeout=config.initialization_timeout,
    )
    return True


__all__ = ["DistributedConfig", "detect_cluster", "validate_distributed_config", "initialize_distributed"]
