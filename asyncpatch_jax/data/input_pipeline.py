"""Input pipeline: the per-process batch of step k as a pure function, and the global batch array.

Order. The training stream is the concatenation of epoch permutations of the
source's indices, epoch e shuffled by `SeedSequence([seed, e])`. The global
batch of step k is stream positions [k G, (k + 1) G) (G = global batch size),
and process p of P reads positions k G + p L + [0, L), L = G / P. So:
  * a batch is a pure function of (source, seed, G, step, process_index):
    resuming at step k (the train step restored from the checkpoint) gives
    bit-for-bit the batches the uninterrupted run saw -- no iterator state to
    save;
  * the processes' reads are disjoint and together cover every example exactly
    once per epoch (batches may straddle an epoch boundary; nothing is dropped);
  * the global batch of a step does not depend on the process count, so a run
    may resume on a different slice shape and still see the same data.
Reading runs in grain threads (`MapDataset.to_iter_dataset`) with a small
prefetch; `make_global_batch` turns the per-process batch into one global
`jax.Array` (big_vision / maxdiffusion style).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from asyncpatch_jax.runtime import checks

Batch = dict[str, np.ndarray]


def _process_index_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_count is None:
    process_count = jax.process_count()
  if process_index is None:
    process_index = jax.process_index()
  checks.check_positive_int(process_count, "process_count")
  if not 0 <= process_index < process_count:
    raise checks.InputError(f"process_index must lie in [0, {process_count}), got {process_index}.")
  return int(process_index), int(process_count)


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  checks.check_positive_int(global_batch_size, "global_batch_size")
  if global_batch_size % process_count:
    raise checks.InputError(f"global_batch_size={global_batch_size} is not divisible by "
                     f"process_count={process_count}; every process reads an equal share.")
  return int(global_batch_size) // process_count


def _read(source, indices: np.ndarray) -> list[dict[str, Any]]:
  if hasattr(source, "__getitems__"):
    return list(source.__getitems__([int(i) for i in indices]))
  return [source[int(i)] for i in indices]


def _stack(examples: Sequence[dict[str, Any]]) -> Batch:
  return {k: np.stack([np.asarray(ex[k]) for ex in examples]) for k in examples[0]}


class InputPipeline:
  """Deterministic, shuffled, infinite per-process training batches.

  Usage in a train loop (start_step restored from the checkpoint, 0 if none):

      pipe = InputPipeline(source, config.batch_size, seed=config.seed)
      batches = pipe.iterate(start_step, num_steps - start_step)
      for step, batch in zip(range(start_step, num_steps), batches):
          batch = make_global_batch(batch, mesh)  # global jax.Array per key
          ...
  """

  def __init__(self, source, global_batch_size: int, *, seed: int, shuffle: bool = True,
               process_index: int | None = None, process_count: int | None = None):
    """Sets up the order; reads nothing yet.

    Args:
      source: random-access source (`__len__`, `__getitem__` -> dict of arrays).
      global_batch_size: G, examples per step over all processes.
      seed: order seed (non-negative int).
      shuffle: False reads the epochs in index order.
      process_index, process_count: default `jax.process_index()/process_count()`.
    """
    self.process_index, self.process_count = _process_index_count(process_index, process_count)
    self.local_batch_size = _local_batch_size(global_batch_size, self.process_count)
    self.global_batch_size = int(global_batch_size)
    if not isinstance(seed, (int, np.integer)) or seed < 0:
      raise checks.InputError(f"seed must be a non-negative int, got {seed!r}.")
    self.num_records = len(source)
    if self.num_records < 1:
      raise checks.InputError(f"source {source!r} is empty.")
    self.source = source
    self.seed = int(seed)
    self.shuffle = bool(shuffle)
    self._permutation = functools.lru_cache(maxsize=4)(self._make_permutation)

  def _make_permutation(self, epoch: int) -> np.ndarray:
    if not self.shuffle:
      return np.arange(self.num_records, dtype=np.int64)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
    perm = rng.permutation(self.num_records).astype(np.int64)
    perm.setflags(write=False)
    return perm

  @property
  def steps_per_epoch(self) -> float:
    return self.num_records / self.global_batch_size

  def _indices(self, positions: np.ndarray) -> np.ndarray:
    epochs, offsets = np.divmod(positions, self.num_records)
    out = np.empty_like(positions)
    for e in np.unique(epochs):
      sel = epochs == e
      out[sel] = self._permutation(int(e))[offsets[sel]]
    return out

  def global_indices(self, step: int) -> np.ndarray:
    """Source indices of the global batch of `step`: [G] int64, process p owns slice p."""
    if step < 0:
      raise checks.InputError(f"step must be >= 0, got {step}.")
    g = self.global_batch_size
    return self._indices(np.arange(step * g, (step + 1) * g, dtype=np.int64))

  def local_indices(self, step: int) -> np.ndarray:
    """Source indices this process reads at `step`: [L] int64."""
    if step < 0:
      raise checks.InputError(f"step must be >= 0, got {step}.")
    lo = step * self.global_batch_size + self.process_index * self.local_batch_size
    return self._indices(np.arange(lo, lo + self.local_batch_size, dtype=np.int64))

  def get_batch(self, step: int) -> Batch:
    """This process's batch of `step`: dict of [L, ...] NumPy arrays."""
    return _stack(_read(self.source, self.local_indices(int(step))))

  def iterate(self, start_step: int = 0, num_steps: int | None = None, *,
              num_threads: int = 2, prefetch: int = 2) -> Iterator[Batch]:
    """Yields `get_batch(start_step)`, `get_batch(start_step + 1)`, ... in order.

    Batches are built ahead by `num_threads` grain threads, at most
    `prefetch` batches in the buffer. Infinite unless `num_steps` is given.
    """
    import grain  # pylint: disable=g-import-not-at-top

    if start_step < 0:
      raise checks.InputError(f"start_step must be >= 0, got {start_step}.")
    stop = start_step + num_steps if num_steps is not None else 2**62
    ds = grain.MapDataset.range(start_step, stop).map(self.get_batch)
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(prefetch, 1))
    return iter(ds.to_iter_dataset(options))

  def describe(self) -> dict[str, Any]:
    """JSON-serialisable description of the order (store it with checkpoints to
    check on resume that the data order has not changed)."""
    return {"source": repr(self.source), "num_records": self.num_records,
            "global_batch_size": self.global_batch_size, "seed": self.seed,
            "shuffle": self.shuffle}


def eval_batches(source, global_batch_size: int, *, process_index: int | None = None,
                 process_count: int | None = None) -> Iterator[Batch]:
  """One ordered pass over `source` for evaluation, in per-process batches.

  Every batch has the full local size L; the last global batch is padded
  (with example 0) and `batch['valid']` [L] bool marks real examples. Over all
  processes and steps each example is valid exactly once.
  """
  pi, pc = _process_index_count(process_index, process_count)
  local = _local_batch_size(global_batch_size, pc)
  n = len(source)
  for step in range(math.ceil(n / global_batch_size)):
    pos = step * global_batch_size + pi * local + np.arange(local, dtype=np.int64)
    valid = pos < n
    batch = _stack(_read(source, np.where(valid, pos, 0)))
    batch["valid"] = valid
    yield batch


def make_global_batch(local_batch: Batch, mesh_or_sharding: Mesh | NamedSharding,
                      batch_axes: str | Sequence[str] | None = None) -> dict[str, jax.Array]:
  """Per-process batch -> global `jax.Array`s sharded along the batch dimension.

  Args:
    local_batch: dict of [L, ...] arrays, this process's share of the step.
    mesh_or_sharding: a `Mesh` (the batch dimension is split over `batch_axes`,
      default all mesh axes, e.g. ('data', 'fsdp')) or a `NamedSharding` to use
      as is.
    batch_axes: mesh axis name(s) the batch dimension is split over.
  Returns:
    dict of global arrays [L * process_count, ...] (`jax.make_array_from_process_local_data`).
  """
  if not local_batch:
    raise checks.InputError("local_batch is empty.")
  sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in local_batch.items()}
  if None in sizes.values() or len(set(sizes.values())) != 1:
    raise checks.InputError(f"every entry of local_batch needs the same leading batch size, got {sizes}.")
  local = next(iter(sizes.values()))
  if isinstance(mesh_or_sharding, NamedSharding):
    sharding = mesh_or_sharding
    mesh = sharding.mesh
    spec0 = sharding.spec[0] if len(sharding.spec) else None
    axes = () if spec0 is None else ((spec0,) if isinstance(spec0, str) else tuple(spec0))
  elif isinstance(mesh_or_sharding, Mesh):
    mesh = mesh_or_sharding
    axes = tuple(mesh.axis_names) if batch_axes is None else (
        (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes))
    unknown = [a for a in axes if a not in mesh.axis_names]
    if unknown:
      raise checks.InputError(f"batch_axes {unknown} are not axes of the mesh {mesh.axis_names}.")
    sharding = NamedSharding(mesh, PartitionSpec(axes))
  else:
    raise checks.InputError(f"expected a jax.sharding.Mesh or NamedSharding, got {type(mesh_or_sharding)}.")
  shards = math.prod(mesh.shape[a] for a in axes)
  global_size = local * jax.process_count()
  if global_size % shards:
    raise checks.InputError(f"global batch {global_size} (= {local} per process x "
                     f"{jax.process_count()} processes) is not divisible by the {shards} "
                     f"shards of mesh axes {axes}.")
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
