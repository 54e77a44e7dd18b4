"""Shared pytest setup: CPU with 8 host devices (for sharding tests), a compilation cache."""

import os
import tempfile

# Must happen before jax is imported anywhere: 8 fake CPU devices let the sharding
# tests build real meshes; single-device code paths are unaffected.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8").strip()
# The tests check numbers and behaviour, not speed, and most of the suite's time is XLA
# compiling tiny programs: without XLA's backend optimisations it compiles ~40 % faster
# (the tiny textures train step: 11.2 s -> 6.6 s) and the whole suite runs in 927 s
# instead of 1159 s on the 2-core development machine, every test passing both ways.
# The command-line subprocesses inherit it. .ci/run's plain-install run, the benchmarks and
# every user run keep XLA's default level; set XLA_FLAGS yourself to test at that level.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
# One persistent compilation cache for the session, shared by pytest workers and the
# command-line subprocesses the tests start: each train step compiles once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "asyncpatch_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
