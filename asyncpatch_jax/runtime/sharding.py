"""Devices, processes and the mesh: the one place (with train.py) that knows about them.

The mesh has two axes, `data` and `fsdp`. The batch is split over both (every
device sees its own examples); with fsdp > 1, parameters and optimizer state are
also split over `fsdp` along their largest divisible axis (ZeRO-3 / FSDP, as in
big_vision and maxtext), which is what lets the 620M model fit.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import subprocess
import sys
from collections.abc import Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from asyncpatch_jax.runtime import checks

BATCH_AXES = ("data", "fsdp")
# Leaves smaller than this stay replicated: sharding them saves nothing.
MIN_FSDP_SIZE = 2 ** 14


# --- XLA:CPU host devices (the CPU default) ------------------------------------------

HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"
# More host devices than this are not chosen automatically (8 on 2 cores trained slower
# than 4; machines with more cores were not measured: results/bench/host_devices.json).
MAX_AUTO_HOST_DEVICES = 8
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin", "jax_plugins")


def available_cores() -> int:
  """CPU cores this process may run on: its affinity mask where the OS has one, else os.cpu_count()."""
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:           # macOS, Windows
    return max(1, os.cpu_count() or 1)


def cpu_host_device_count(cores: int, batch_sizes: Sequence[int] = ()) -> int:
  """The library's rule: how many XLA:CPU host devices a run on `cores` cores gets.

  Two host devices per core (one on a single core), at most MAX_AUTO_HOST_DEVICES,
  lowered to the largest count that divides every batch size, so that every device
  holds an equal share of each batch. Measured on the 2-core development machine with
  experiments/benchmarks/bench_host_devices.py (results/bench/host_devices.json, quiet machine,
  speed-up over one device): default-config train step 1.35x with 2 devices and 1.34x
  with 4 (8: 0.95x of 2); 50-step sampling 1.47x with 2, 1.77x with 4 (8: 1.2x of 2,
  measured while the load rose); the 60M train step at 64x64 0.97-0.98x with 2 or 4 (its
  large convolutions already keep both cores busy on one device). On one core (taskset)
  2 devices gave 1.02x / 0.99x: nothing to gain, so one.
  """
  checks.check_positive_int(cores, "cores")
  divisor = 0
  for b in batch_sizes:
    divisor = math.gcd(divisor, checks.check_positive_int(b, "batch size"))
  n = min(1 if cores == 1 else 2 * cores, MAX_AUTO_HOST_DEVICES)
  while divisor and divisor % n:
    n -= 1
  return n


def host_device_count_in(xla_flags: str) -> int | None:
  """The host device count that XLA_FLAGS asks for (the last occurrence wins), else None."""
  found = re.findall(re.escape(HOST_DEVICE_FLAG) + r"(?:=(\S*))?(?=\s|$)", xla_flags)
  if not found:
    return None
  value = found[-1]
  if not re.fullmatch(r"[1-9][0-9]*", value):
    raise checks.InputError(f"XLA_FLAGS has {HOST_DEVICE_FLAG}={value}; it takes a positive "
                            f"integer, e.g. {HOST_DEVICE_FLAG}=2.")
  return int(value)


@functools.cache
def check_xla_flags(xla_flags: str) -> None:
  """Raises InputError when the installed jaxlib does not know a flag in `xla_flags`.

  XLA parses XLA_FLAGS when its first backend starts and ends the process on a flag it
  does not know (a fatal log line 'Unknown flag in XLA_FLAGS: ...' from
  parse_flags_from_env.cc, exit code 1, no Python exception). So the flags are tried in
  a child process that starts only the CPU backend, before this process starts one.
  """
  env = dict(os.environ, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu")
  try:
    res = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
  except subprocess.TimeoutExpired:
    logging.warning("Could not check XLA_FLAGS=%r (the check timed out); using them.", xla_flags)
    return
  if res.returncode == 0:
    return
  import jaxlib  # pylint: disable=g-import-not-at-top
  unknown = re.findall(r"Unknown flags? in XLA_FLAGS: (.*)", res.stderr)
  if unknown:
    raise checks.InputError(
        f"the installed jaxlib {jaxlib.__version__} does not know the XLA flag(s) "
        f"{unknown[-1].strip()} (XLA_FLAGS={xla_flags!r}); remove them from XLA_FLAGS, or "
        "install the jaxlib version setup.py pins.")
  lines = [l for l in res.stderr.strip().splitlines() if l.strip()]
  raise checks.InputError(f"XLA:CPU does not start with XLA_FLAGS={xla_flags!r}: "
                          f"{lines[-1] if lines else 'exit code ' + str(res.returncode)}")


def _accelerator_installed() -> bool:
  return any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def configure_cpu_devices(batch_size: int | None = None, *, other_batch_sizes: Sequence[int] = (),
                          requested: int | None = None, environ=None,
                          cores: int | None = None) -> int | None:
  """Gives XLA:CPU its host devices (the CPU default); call before any JAX computation.

  XLA reads XLA_FLAGS once, when its CPU backend starts, so main.py (and the benchmark
  scripts) call this at startup. In order:
  * `requested` (a script's explicit count) or a count the user already put in
    XLA_FLAGS is kept; it must divide `batch_size` (the training batch, split over
    every device), else InputError naming both numbers and the fix.
  * Otherwise, on a CPU-only installation with one process, the count is
    `cpu_host_device_count(available_cores(), [batch_size, *other_batch_sizes])` and
    is appended to XLA_FLAGS, after checking that the installed jaxlib knows every flag
    (`check_xla_flags`). With an accelerator plugin installed (GPU/TPU) or several
    processes (jax.distributed) nothing is changed.
  Returns the host device count in effect (None where it is left to JAX).
  """
  environ = os.environ if environ is None else environ
  xla_flags = environ.get("XLA_FLAGS", "")
  processes = int(environ.get("JAX_NUM_PROCESSES", "1") or 1)
  user = host_device_count_in(xla_flags)
  if requested is not None:
    checks.check_positive_int(requested, "host device count")
    if user is not None and user != requested:
      raise checks.InputError(f"{requested} host devices were requested but XLA_FLAGS already "
                              f"has {HOST_DEVICE_FLAG}={user}; remove one of the two.")
  count = requested if requested is not None else user
  if count is not None:
    if batch_size is not None and batch_size % (count * processes):
      n = count * processes
      fits = [d for d in range(1, min(batch_size, 64) + 1) if batch_size % (d * processes) == 0]
      raise checks.InputError(
          f"train.batch_size={batch_size} does not split over {n} host devices "
          f"({HOST_DEVICE_FLAG}={count}{f' x {processes} processes' if processes > 1 else ''}); "
          f"use a device count that divides {batch_size} ({', '.join(map(str, fits[-4:]))}), "
          f"or unset it to let the library choose, or set --config.train.batch_size to a "
          f"multiple of {n}.")
    if user is None:
      new = f"{xla_flags} {HOST_DEVICE_FLAG}={count}".strip()
      check_xla_flags(new)
      environ["XLA_FLAGS"] = new
    return count
  if processes > 1 or _accelerator_installed() or "cpu" not in environ.get(
      "JAX_PLATFORMS", "cpu").lower():
    return None
  count = cpu_host_device_count(
      available_cores() if cores is None else cores,
      [b for b in (batch_size, *other_batch_sizes) if b is not None])
  new = f"{xla_flags} {HOST_DEVICE_FLAG}={count}".strip()
  check_xla_flags(new)
  environ["XLA_FLAGS"] = new
  return count


def maybe_initialize_distributed() -> None:
  """Calls `jax.distributed.initialize()` when the environment describes several processes.

  Recognised: JAX_COORDINATOR_ADDRESS + JAX_NUM_PROCESSES + JAX_PROCESS_ID (explicit,
  e.g. localhost tests or SLURM wrappers); ASYNCPATCH_DISTRIBUTED=auto (set by
  launch/tpu_pod.sh: jax detects the TPU slice itself); or TPU_WORKER_HOSTNAMES
  naming several hosts.
  """
  if jax.distributed.is_initialized():
    return
  coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
  if coordinator:
    num = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    pid = int(os.environ.get("JAX_PROCESS_ID", "0"))
    if num > 1:
      # Collectives between CPU processes (tests, CPU clusters); other backends ignore it.
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
      jax.distributed.initialize(coordinator_address=coordinator, num_processes=num,
                                 process_id=pid)
      logging.info("jax.distributed: process %d of %d", pid, num)
    return
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  if os.environ.get("ASYNCPATCH_DISTRIBUTED") == "auto" or "," in hosts:
    jax.distributed.initialize()
    logging.info("jax.distributed on a TPU slice: process %d of %d",
                 jax.process_index(), jax.process_count())


def make_mesh(fsdp: int = 1, devices=None) -> Mesh:
  """A ('data', 'fsdp') mesh over all (or the given) devices, data = n / fsdp."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  n = devices.size
  if fsdp < 1 or n % fsdp:
    raise checks.InputError(f"train.fsdp={fsdp} must divide the number of devices ({n}).")
  return Mesh(devices.reshape(n // fsdp, fsdp), BATCH_AXES)


def sampling_mesh(devices=None) -> Mesh | None:
  """A 1-D mesh (axis `data`) over all (or the given) devices when there are several, else None.

  The samplers (diffusion/samplers.py) shard their batch over it.
  """
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.array(devices), ("data",)) if len(devices) > 1 else None


def replicated_everywhere() -> NamedSharding:
  """Replicated over every device of every process (restoring for sampling or analysis)."""
  return NamedSharding(Mesh(np.array(jax.devices()), ("all",)), P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """The batch dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int) -> P:
  """Shards the largest axis divisible by `fsdp` over 'fsdp'; small leaves replicated."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_FSDP_SIZE:
    return P()
  for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
    if shape[axis] % fsdp == 0:
      spec = [None] * len(shape)
      spec[axis] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state, mesh: Mesh):
  """NamedShardings for every leaf of a (abstract) train state."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp)),
                      abstract_state)
