"""Shared pytest setup: CPU with 8 host devices (for sharding tests), a compilation cache."""

import os
import tempfile

# Must happen before jax is imported anywhere: 8 fake CPU devices let the sharding
# tests build real meshes; single-device code paths are unaffected.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# One persistent compilation cache for the session, shared by pytest workers and the
# command-line subprocesses the tests start: each train step compiles once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "asyncpatch_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
