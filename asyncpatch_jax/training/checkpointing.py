"""Orbax checkpoints of the train state in `workdir/checkpoints`, resumed automatically.

Each checkpoint holds two items: `state` (the TrainState, restored straight into
its shardings) and `meta` (JSON: the model config, the image shape, the full
config), so a workdir alone is enough to rebuild and sample its model
(`saved_meta`). A run refuses to resume a checkpoint whose model config differs from
its own and lists the differing keys. Saves are asynchronous and atomic (orbax writes
a temporary directory and renames it, or on GCS marks it complete with a commit file),
and older checkpoints are only removed after a newer one is complete, so a failing run
never damages what was saved. The workdir may be a local folder or a gs:// URL
(data/storage.py); orbax reaches GCS through etils.epath and tensorstore.
"""

from __future__ import annotations

import json
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from asyncpatch_jax import checks
from asyncpatch_jax.data import storage
from asyncpatch_jax.training import sharding

ITEMS = ("state", "meta")


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def config_differences(saved: dict, current: dict) -> list[str]:
  """'key: saved -> current' for every leaf that differs (sorted)."""
  a, b = _flatten(saved), _flatten(current)
  return [f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]


def _json(obj):
  return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def _use_serial_array_writes_on_cpu() -> None:
  """On CPU, write each replicated array once instead of replica-parallel.

  Orbax's replica-parallel writes compile one slicing program per array shape at the
  first save (~10 s for a UNet on 8 host devices); they pay off only on accelerators.
  """
  if jax.default_backend() == "cpu":
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)


def saved_meta(workdir) -> dict | None:
  """The `meta` item (model config, image shape, config) of the workdir's latest checkpoint.

  None if the workdir holds no checkpoint. Reads only JSON: no dataset, no arrays.
  """
  directory = storage.check_bucket(workdir, "workdir") / "checkpoints"
  if not directory.is_dir():
    return None
  manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_names=ITEMS)
  try:
    step = manager.latest_step()
    if step is None:
      return None
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    manager.close()


class Checkpointer:
  """Saves every `every` steps (and when forced), keeps `keep`, restores the latest.

  workdir: a local folder or a gs:// URL (str or epath.Path).
  """

  def __init__(self, workdir, config: ml_collections.ConfigDict,
               image_shape: tuple[int, ...], *, every: int, keep: int,
               model: dict | None = None):
    _use_serial_array_writes_on_cpu()
    self.workdir = storage.path(workdir, "workdir")
    model = config.model.to_dict() if model is None else model
    self.meta = _json({"model": model, "image_shape": list(image_shape),
                       "config": config.to_dict()})
    self.manager = ocp.CheckpointManager(
        self.workdir / "checkpoints",
        options=ocp.CheckpointManagerOptions(
            save_interval_steps=max(int(every), 1), max_to_keep=keep, create=True,
            enable_async_checkpointing=True),
        item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def saved_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def check_compatible(self) -> None:
    """Raises ValueError if the latest checkpoint was written for another model."""
    step = self.latest_step()
    if step is None:
      return
    saved = self.saved_meta(step)
    diffs = config_differences(saved["model"], self.meta["model"])
    if saved["image_shape"] != self.meta["image_shape"]:
      diffs.append(f"image_shape: {saved['image_shape']} -> {self.meta['image_shape']}")
    if diffs:
      raise checks.InputError(
          f"workdir {str(self.workdir)!r} holds a checkpoint (step {step}) of a different model; "
          "refusing to resume it. Differing keys (checkpoint -> this run):\n  "
          + "\n  ".join(diffs) + "\nUse another --workdir, or the checkpoint's config "
          f"({self.workdir / 'config.json'}).")
    other = config_differences(saved["config"], self.meta["config"])
    if other:
      logging.info("Resuming with changed non-model settings: %s", "; ".join(other))

  def write_config_json(self) -> None:
    """`workdir/config.json`: the run's full config, readable without orbax (process 0)."""
    if jax.process_index() == 0:
      storage.write_text_atomic(self.workdir / "config.json",
                                json.dumps(self.meta["config"], indent=2, sort_keys=True))

  def restore(self, abstract_state):
    """The latest state, restored into the shardings of `abstract_state`, or None.

    Leaves without a sharding are restored replicated over all devices, whatever
    topology wrote the checkpoint (e.g. sampling on one device from a pod run).
    """
    step = self.latest_step()
    if step is None:
      return None
    replicated = sharding.replicated_everywhere()
    abstract_state = jax.tree.map(
        lambda a: a if getattr(a, "sharding", None) is not None else
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract_state)
    logging.info("Restoring checkpoint of step %d from %s", step, str(self.workdir))
    restored = self.manager.restore(
        step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

  def save(self, step: int, state, *, force: bool = False) -> bool:
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self.meta)), force=force)

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
