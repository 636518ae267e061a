"""Test session setup: 8 fake CPU devices so sharding tests run anywhere, and a fast compiler.

The flags must be set before jax is imported, which pytest guarantees by loading this file
before any test module. Processes the tests start (the CLI, launched workers, benchmark
scripts) inherit them through the environment.

`--xla_backend_optimization_level=0` skips LLVM's optimisation passes when XLA compiles for the
CPU: the tests' models are tiny, so compiling dominates their time and the unoptimised code
runs fast enough (about 35% less CPU time in the compile-bound tests). XLA's own passes
(fusion, layouts, the expansion of each op) still run; only the machine code is less tuned.
`benchmarks/accelerator_check.py --dry-run` uses the same flag for the same reason. With it,
compiled programs hold many memory mappings, so every test module ends by dropping them (below).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


import jax  # noqa: E402  (after the flags above)
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs_after_each_module():
    """Drop every compiled program when a test module ends. With the unoptimised backend and
    the 8 host devices, XLA:CPU keeps hundreds of memory mappings per compiled program (about
    10x as many as optimised, or on one device), and a test worker that runs half the suite
    would otherwise pass Linux's default limit of 65,530 mappings per process
    (`vm.max_map_count`), where the next compilation crashes with a segmentation fault."""
    yield
    jax.clear_caches()
