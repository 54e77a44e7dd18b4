"""Devices, processes and the mesh: the one place (with train.py) that knows about them.

The mesh has two axes, `data` and `fsdp`. The batch is split over both (every
device sees its own examples); with fsdp > 1, parameters and optimizer state are
also split over `fsdp` along their largest divisible axis (ZeRO-3 / FSDP, as in
big_vision and maxtext), which is what lets the 620M model fit.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from asyncpatch_jax import checks

BATCH_AXES = ("data", "fsdp")
# Leaves smaller than this stay replicated: sharding them saves nothing.
MIN_FSDP_SIZE = 2 ** 14


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
