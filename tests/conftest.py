"""Test session setup: 8 fake CPU devices so sharding tests run anywhere.

The flag must be set before jax is imported, which pytest guarantees by loading this file
before any test module.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
