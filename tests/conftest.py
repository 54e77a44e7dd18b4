"""Shared pytest setup: CPU with 8 host devices (for sharding tests), float32 default."""

import os

# Must happen before jax is imported anywhere: 8 fake CPU devices let the sharding
# tests build real meshes; single-device code paths are unaffected.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
