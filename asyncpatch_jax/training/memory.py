"""The memory check before allocating: a compiled train step's peak bytes per device vs the limit.

Every trainer (train.py, head_train.py, autoencoder_train.py) compiles its jitted train
step through `compile_train_step`, on abstract inputs (`jax.ShapeDtypeStruct`s with the
real shardings), before anything is allocated on a device or written to the workdir:
it logs the parameter count, that it is compiling, and XLA's estimate of the step's
peak memory per device (`StepMemory`, from `Compiled.memory_analysis()`); a step that
cannot fit the devices' memory (`memory_limit`) stops with one InputError that names
settings that would (a smaller `train.batch_size`, more `train.fsdp`) or may
(`model.remat=full` where the step trains a model with less remat).
`train.skip_memory_check=True` runs it anyway. The compiled step is the one training then
calls (the step compiles once).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from absl import logging

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import sharding

_CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v1 writes "no limit" as the largest page-aligned int64; anything above this is none.
_NO_LIMIT = 2 ** 60


def format_bytes(n: float) -> str:
  """`n` bytes as '12.3 GiB' (or MiB / KiB below 1 GiB / 1 MiB)."""
  for unit, size in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
    if abs(n) >= size:
      return f"{n / size:.1f} {unit}"
  return f"{int(n)} B"


@dataclasses.dataclass(frozen=True)
class StepMemory:
  """Bytes per device of one compiled step, from XLA's buffer assignment.

  arguments: the inputs (train state: parameters, optimizer state, EMA; the batch;
    frozen inputs such as a frozen model or autoencoder).
  outputs: the new state and the metrics.
  aliased: output bytes written into donated argument buffers (the donated state).
  temporaries: XLA's temp allocation (activations kept for the backward pass,
    gradients, optimizer temporaries).
  """
  arguments: int
  outputs: int
  aliased: int
  temporaries: int

  @classmethod
  def of(cls, compiled: jax.stages.Compiled) -> StepMemory:
    """The memory analysis of a compiled (SPMD-partitioned: per-device) program."""
    m = compiled.memory_analysis()
    return cls(arguments=int(m.argument_size_in_bytes), outputs=int(m.output_size_in_bytes),
               aliased=int(m.alias_size_in_bytes), temporaries=int(m.temp_size_in_bytes))

  @property
  def peak(self) -> int:
    """Estimated peak bytes per device while the step runs.

    The arguments are live for the whole step (the caller holds them; the donated state
    is freed only when the outputs replace it). Outputs that alias donated arguments
    reuse those buffers, so only the others (the metrics; the whole new state when
    nothing is donated) are new: outputs - aliased. The temporaries are XLA's temp
    buffer, live during the step. The sum is an upper bound of what the buffer
    assignment holds at once; XLA's own runtime buffers and the generated code are not
    in it.
    """
    return self.arguments + (self.outputs - self.aliased) + self.temporaries

  def describe(self) -> str:
    """The peak and its parts, for the log line."""
    return (f"{format_bytes(self.peak)} (arguments {format_bytes(self.arguments)}: state and "
            f"batch; temporaries {format_bytes(self.temporaries)}; new outputs "
            f"{format_bytes(self.outputs - self.aliased)})")


# --- the devices' memory ---------------------------------------------------------------

def cgroup_memory_limit(root: str = _CGROUP_ROOT, proc_cgroup: str = "/proc/self/cgroup"
                        ) -> int | None:
  """The smallest memory limit of this process's cgroup and its ancestors, in bytes (None: none).

  cgroup v2: `memory.max` ('max' = none) along the path of the `0::` line of
  /proc/self/cgroup; cgroup v1: `memory/.../memory.limit_in_bytes` (a value near 2^63
  = none). Inside a container the namespace root is the container's own cgroup.
  """
  paths = {}
  try:
    with open(proc_cgroup, encoding="utf-8") as f:
      for line in f:
        parts = line.strip().split(":", 2)
        if len(parts) == 3:
          paths[parts[1]] = parts[2]
  except OSError:
    pass
  candidates = []

  def along(base: str, rel: str, name: str):
    rel = rel.strip("/")
    parts = rel.split("/") if rel else []
    for i in range(len(parts), -1, -1):
      candidates.append(os.path.join(base, *parts[:i], name))

  along(root, paths.get("", "/"), "memory.max")                      # v2 (unified)
  v1 = next((p for k, p in paths.items() if "memory" in k.split(",")), "/")
  along(os.path.join(root, "memory"), v1, "memory.limit_in_bytes")   # v1
  limits = []
  for p in dict.fromkeys(candidates):
    try:
      with open(p, encoding="utf-8") as f:
        text = f.read().strip()
    except OSError:
      continue
    if text.isdigit() and 0 < int(text) < _NO_LIMIT:
      limits.append(int(text))
  return min(limits) if limits else None


def host_memory() -> tuple[int, str]:
  """(bytes, what) of the memory this host lets the process use: the cgroup limit or the RAM."""
  ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  limit = cgroup_memory_limit()
  if limit is not None and limit < ram:
    return limit, "the cgroup memory limit"
  return ram, "host RAM"


@dataclasses.dataclass(frozen=True)
class MemoryLimit:
  """What the devices of this process may hold.

  bytes: the limit of one device, or of the memory all `shared_by` devices share.
  shared_by: devices of this process that draw on it (XLA:CPU host devices share the
    host's RAM; an accelerator has its own: 1).
  what: where the limit comes from, for messages.
  """
  bytes: int
  shared_by: int
  what: str

  def fits(self, per_device: float) -> bool:
    """Whether `per_device` bytes on each of the `shared_by` devices stay within the limit."""
    return per_device * self.shared_by <= self.bytes


def memory_limit(local_devices) -> MemoryLimit | None:
  """The memory limit of these (local) devices; None when the backend does not report one.

  CPU: `host_memory()`, shared by every host device of the process. An accelerator: the
  smallest `memory_stats()['bytes_limit']` of the devices (what its allocator may use).
  """
  local_devices = list(local_devices)
  if all(d.platform == "cpu" for d in local_devices):
    total, what = host_memory()
    return MemoryLimit(total, len(local_devices), what)
  limits = []
  for d in local_devices:
    try:
      stats = d.memory_stats() or {}
    except Exception:  # pylint: disable=broad-except  # backends without memory stats
      stats = {}
    if "bytes_limit" not in stats:
      return None
    limits.append(int(stats["bytes_limit"]))
  return MemoryLimit(min(limits), 1, f"{local_devices[0].device_kind} memory (bytes_limit)")


# --- abstract inputs --------------------------------------------------------------------

def with_shardings(tree, shardings) -> Any:
  """`jax.ShapeDtypeStruct`s of a tree of arrays (or of ShapeDtypeStructs) with its shardings.

  shardings: a tree of shardings like `tree`, or one sharding for every leaf.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    shardings = jax.tree.map(lambda _: shardings, tree)
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s,
                                        weak_type=getattr(a, "weak_type", False)),
      tree, shardings)


def abstract_batch(example: dict[str, Any], batch_size: int,
                   batch_sharding: jax.sharding.Sharding) -> dict[str, jax.ShapeDtypeStruct]:
  """The global batch of `batch_size` examples shaped like `example` ({key: one example}).

  Each entry is [batch_size, *example[key].shape], with the dtype JAX gives the NumPy
  array (e.g. int64 -> int32 without x64), as `input_pipeline.make_global_batch` does.
  """
  return {k: jax.ShapeDtypeStruct((batch_size, *np.shape(v)),
                                  jax.dtypes.canonicalize_dtype(np.asarray(v).dtype),
                                  sharding=batch_sharding)
          for k, v in example.items()}


# --- the check --------------------------------------------------------------------------

def bytes_per_device(abstract_tree) -> int:
  """Bytes one device holds of a tree of `jax.ShapeDtypeStruct`s with shardings."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(abstract_tree))


def _fsdp_share(params, fsdp: int) -> float:
  """The share of the parameters' bytes one device holds with an fsdp axis of `fsdp`.

  Leaves as `sharding.fsdp_spec` shards them. The optimizer state and the EMA are
  parameter-shaped trees (flattened into one vector when fsdp = 1, per leaf otherwise),
  so the state shrinks by this share too.
  """
  full = split = 0
  for leaf in jax.tree.leaves(params):
    n = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    full += n
    sharded = any(axis == "fsdp" for axis in sharding.fsdp_spec(tuple(leaf.shape), fsdp))
    split += n // fsdp if sharded else n
  return split / max(full, 1)


def _suggestions(memory: StepMemory, limit: MemoryLimit, *, config: ml_collections.ConfigDict,
                 num_devices: int, abstract_state, params,
                 compile_at: Callable[[int], StepMemory]) -> tuple[list[str], list[str]]:
  """(settings that would fit `limit`, each with its estimate; what was found not to fit)."""
  cfg = config
  batch, fsdp = cfg.train.batch_size, cfg.train.fsdp
  local = batch // num_devices                 # examples per device
  budget = limit.bytes / limit.shared_by        # bytes one device may use
  fits, not_fits = [], []
  # Per-device memory is affine in the examples per device, fixed + slope * local. One
  # more compile, at one example per device, gives both (only on this failing path).
  if local > 1:
    try:
      small = compile_at(num_devices)
    except Exception as e:  # pylint: disable=broad-except  # the suggestion is optional
      logging.warning("Could not compile the step at one example per device (%s); no batch "
                      "size suggested.", e)
      small = None
    if small is not None:
      slope = (memory.peak - small.peak) / (local - 1)
      fixed = small.peak - slope
      if small.peak <= budget:
        n = int((budget - fixed) // slope) if slope > 0 else local - 1
        n = max(1, min(n, local - 1))
        fits.append(f"--config.train.batch_size={n * num_devices} or less (about "
                    f"{format_bytes(fixed + slope * n)} per device at {n * num_devices})")
      else:
        not_fits.append(f"a smaller train.batch_size (one example per device needs about "
                        f"{format_bytes(small.peak)})")
  # FSDP splits the state over the fsdp axis (leaves as sharding.fsdp_spec shards them);
  # the temporaries are taken as they are. An estimate without a compile, on the high
  # side where measured (configs/test.py at base_channels=4096, 4 CPU devices: 44.6 GiB
  # per device at fsdp=1; fsdp=4 estimated 22.9 GiB, compiled 19.5 GiB, since gathered
  # parameters and gradients keep most of the temporaries).
  now = bytes_per_device(abstract_state)
  larger = [k for k in range(fsdp + 1, num_devices + 1) if num_devices % k == 0]
  for k in larger:
    shrink = 1 - _fsdp_share(params, k) / _fsdp_share(params, fsdp)
    estimate = memory.peak - now * shrink
    if estimate <= budget:
      fits.append(f"--config.train.fsdp={k} (the state split over {k} devices: about "
                  f"{format_bytes(estimate)} per device)")
      break
  else:
    if larger:
      not_fits.append(f"train.fsdp={larger[-1]} (about {format_bytes(estimate)} per device)")
  return fits, not_fits


def _remat_hint(remat: str | None) -> str | None:
  """A `model.remat` that keeps fewer activations than `remat` (None: already full, or the
  step has no remat setting).

  Not estimated (it would take another compile): remat trades recomputation for the
  activations the backward pass keeps, and XLA:CPU's schedule saves them only where the
  blocks are a scan (the DiT's), not the UNet's unrolled blocks (models/blocks.py).
  """
  if remat is None or remat == "full":
    return None
  more = " (or block: keeps the matmul outputs)" if remat == "none" else ""
  return (f"--config.model.remat=full{more}, which recomputes each block's activations in "
          "the backward pass (not estimated)")


def compile_train_step(jitted, abstract_args: Callable[[int], tuple], *,
                       config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
                       params, what: str = "train step",
                       remat: str | None = None) -> jax.stages.Compiled:
  """Compiles `jitted` on abstract inputs and checks its memory; returns the compiled step.

  Args:
    jitted: the `jax.jit`-ed step (state donated as argument 0).
    abstract_args: batch_size -> the step's arguments as `jax.ShapeDtypeStruct`s with
      their shardings (state, global batch of that size, frozen inputs).
    config: the run's config (train.batch_size, train.fsdp, train.skip_memory_check).
    mesh: the training mesh (its devices of this process share or own the memory).
    params: the (abstract) parameters, for the parameter count.
    what: the step's name in messages.
    remat: the `model.remat` of the network this step trains (None: the step has none);
      a message that does not fit suggests a remat that keeps less.
  Returns:
    The compiled step: call it as the jitted function (same arguments and shardings).
  Raises:
    InputError: the estimated peak memory per device (times the devices sharing it)
      exceeds the devices' memory and `train.skip_memory_check` is not set; the one-line
      message gives the estimate, the limit and settings that would fit.
  """
  cfg = config
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  devices = list(mesh.devices.flat)
  local_devices = [d for d in devices if d.process_index == jax.process_index()]
  logging.info("Compiling the %s (%s parameters, batch %d over %d devices) ...", what,
               f"{num_params:,}", cfg.train.batch_size, len(devices))
  start = time.time()
  args = abstract_args(cfg.train.batch_size)
  compiled = jitted.lower(*args).compile()
  memory = StepMemory.of(compiled)
  limit = memory_limit(local_devices)
  if limit is None:
    limit_text = "the backend reports no memory limit, not checked"
  elif limit.shared_by > 1:
    limit_text = (f"x {limit.shared_by} devices = {format_bytes(memory.peak * limit.shared_by)} "
                  f"of {format_bytes(limit.bytes)} ({limit.what}, shared by the "
                  f"{limit.shared_by} host devices)")
  else:
    limit_text = f"of {format_bytes(limit.bytes)} ({limit.what})"
  logging.info("The %s needs about %s per device, %s; compiled in %.0f s.", what,
               memory.describe(), limit_text, time.time() - start)
  if limit is None or limit.fits(memory.peak):
    return compiled
  if cfg.train.get("skip_memory_check", False):
    logging.warning("The %s's estimated memory exceeds the limit; running it anyway "
                    "(train.skip_memory_check=True).", what)
    return compiled

  def compile_at(batch_size: int) -> StepMemory:
    return StepMemory.of(jitted.lower(*abstract_args(batch_size)).compile())

  need = (f"{format_bytes(memory.peak)} per device x {limit.shared_by} host devices = "
          f"{format_bytes(memory.peak * limit.shared_by)}" if limit.shared_by > 1
          else f"{format_bytes(memory.peak)} per device")
  fits, not_fits = _suggestions(memory, limit, config=cfg, num_devices=len(devices),
                                abstract_state=args[0], params=params,
                                compile_at=compile_at)
  remat_hint = _remat_hint(remat)
  raise checks.InputError(
      f"the {what} ({num_params:,} parameters, train.batch_size={cfg.train.batch_size}, "
      f"train.fsdp={cfg.train.fsdp}) needs about {need} (arguments "
      f"{format_bytes(memory.arguments)}, temporaries {format_bytes(memory.temporaries)}), "
      f"more than the {format_bytes(limit.bytes)} of {limit.what}; nothing was allocated or "
      f"written. {'Would fit: ' + '; '.join(fits) + '. ' if fits else ''}"
      f"{'Would not fit: ' + '; '.join(not_fits) + '. ' if not_fits else ''}"
      f"{'May fit: ' + remat_hint + '. ' if remat_hint else ''}"
      f"{'Or' if fits else 'Use'} a smaller model, or --config.train.skip_memory_check=True "
      "to run it anyway.")
