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
# One BLAS thread per process (read when numpy loads, so before any import of it): pytest -n 2
# runs two workers on the 2 cores beside XLA's own threads, and OpenBLAS's threads spin
# against them on the small [D, D] eigendecompositions of the Frechet bootstrap, ~25x slower
# per call under that load (1.5 ms -> 39 ms at D = 128); the tiny sampler_ablation.py run
# took 90 s with 2 threads and 67 s with 1 beside a busy core. Subprocesses inherit it.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
  os.environ.setdefault(_var, "1")
# One persistent compilation cache for the session, shared by pytest workers and the
# command-line subprocesses the tests start: each train step compiles once.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "asyncpatch_jax_test_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from fixtures import cli  # pylint: disable=wrong-import-position
from fixtures import configs  # pylint: disable=wrong-import-position
from fixtures import gcs_emulator  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Fixtures that train a model (or a feature network) before their tests run: every test
# that takes one is `slow` (pytest -m "not slow" is the quick loop; CI runs everything).
TRAINING_FIXTURES = {"ae_run", "latent_run", "trained", "models", "reference",
                     "trained_workdir", "tiny_workdir", "workdir", "uninterrupted_run",
                     "two_processes", "one_process", "cell_classifier", "gaussian_setup"}


def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
      item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def main_cli():
  """The command line (tests/fixtures/cli.py): `main_cli.run(*args)`, `main_cli.start(*args)`."""
  return cli


@pytest.fixture(scope="session")
def tiny_workdir(tmp_path_factory):
  """A workdir of configs/test.py trained to its end (24 steps) once per test process, with
  no grids and no end-of-training evaluation: for tests that sample, evaluate or read it.
  Tests must not write into it (copy it first)."""
  from asyncpatch_jax.modes import train_mode  # pylint: disable=g-import-not-at-top
  path = tmp_path_factory.mktemp("tiny_workdir")
  train_mode.train_and_evaluate(
      configs.with_overrides({"sample.num_images": 0, "evaluate.classifier_samples": 0}), str(path))
  return path


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """A GCS emulator on localhost (tests/fixtures/gcs_emulator.py) for one test module.

  `gcs.env` runs the command line against it as a user would (STORAGE_EMULATOR_HOST
  alone). This process reads the bucket through the library too: it gets the emulator's
  tensorstore URL and token explicitly, since a module before it may have configured
  gs:// access for another emulator.
  """
  with gcs_emulator.running(tmp_path_factory.mktemp("emulator"), ROOT) as emulator:
    with pytest.MonkeyPatch.context() as mp:
      for k in ("STORAGE_EMULATOR_HOST", "GCE_METADATA_HOST", "GCE_METADATA_IP",
                "GCE_METADATA_ROOT"):
        mp.setenv(k, emulator.env[k])
      mp.setenv("TENSORSTORE_GCS_HTTP_URL", emulator.url)
      mp.setenv("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
      yield emulator
