"""Orbax checkpoints of the train state in `workdir/checkpoints`, checksummed and resumed automatically.

Each checkpoint holds two items: `state` (the TrainState, restored straight into
its shardings) and `meta` (JSON: the model config, the image shape, the full
config), so a workdir alone is enough to rebuild and sample its model
(`saved_meta`). A run refuses to resume a checkpoint whose model config differs from
its own and lists the differing keys; a training run also refuses changed training
settings (schedule, optimizer, data, loss) unless `train.allow_schedule_change` is set.
The workdir may be a local folder or a gs:// URL (runtime/storage.py); orbax reaches GCS
through etils.epath and tensorstore.

Integrity. Saves are asynchronous and atomic: orbax writes a temporary directory and
renames it (on GCS it marks the step complete with a commit file). Just before that
commit, process 0 writes `asyncpatch_checksums.json` into the step: the size and
sha256 of every file of the step (`manifest.MANIFEST`; only orbax's own commit records,
`_CHECKPOINT_METADATA` and `commit_success.txt`, are written after it and are checked
for being readable instead). Restoring verifies the newest step against it (plus
orbax's own checks) and falls back to the newest step that verifies; a damaged step is
reported in one line (step, file, what is wrong) and left where it is. Before a
training run saves again, damaged steps newer than the one it resumed are renamed to
`<step>.damaged` (never deleted), so they neither block saving that step again nor
count towards `keep_checkpoints`. A step without a manifest (written before checksums
existed) is restored under orbax's checks alone. If no step can be restored, a
`step_selection.DamagedCheckpointError` lists what was found and nothing is changed.

A save that fails (disk full, permissions) raises `SaveError` at the next save, wait
or `poll()`: the half-written temporary directory is removed, older checkpoints are
untouched (orbax removes old steps only after a newer one is committed), and the
message names the step, the reason and the checkpoints that remain.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from asyncpatch_jax.runtime import storage
from asyncpatch_jax.runs import compat
from asyncpatch_jax.runs import manifest
from asyncpatch_jax.runs import run_lock
from asyncpatch_jax.runs import step_selection
from asyncpatch_jax.runtime import sharding

ITEMS = ("state", "meta")
# orbax's suffix of a step being written (`<step>.orbax-checkpoint-tmp...`).
TMP_SUFFIX = ".orbax-checkpoint-tmp"
DAMAGED_SUFFIX = ".damaged"

class SaveError(storage.WriteError):
  """A checkpoint could not be written; the message names the step, the reason, what remains."""


def _json(obj):
  return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


class _OrbaxTracebackFilter(std_logging.Filter):
  """Drops the tracebacks of a failed orbax save from the logs.

  orbax logs such a failure with its full traceback, and asyncio logs each of the
  save's failed write tasks when they are garbage collected (hundreds of lines for a
  full disk); the failure is raised as one `SaveError` line with the cause chained.
  With --verbosity >= 1 everything passes.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    if record.levelno < std_logging.ERROR or logging.get_verbosity() >= 1:
      return True
    if record.exc_info and "orbax" in record.pathname:
      return False
    message = record.getMessage()
    return not ("exception was never retrieved" in message and "orbax" in message)


def _drop_closed_loop_callbacks(previous):
  """A sys.unraisablehook that drops "Event loop is closed" from late tensorstore callbacks.

  When one write of an orbax save fails, orbax's event loop ends while tensorstore still
  completes the step's other writes; each completion reports the closed loop as an
  unraisable RuntimeError (a 6-line traceback each, dozens per failed save). The failure
  itself is raised as SaveError. Every other unraisable exception goes to `previous`.
  """

  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    previous(unraisable)

  return hook


_QUIETED = False


def _configure_orbax() -> None:
  """Once per process: serial array writes on CPU, and a failed save as one line.

  On CPU, each replicated array is written once instead of replica-parallel: orbax's
  replica-parallel writes compile one slicing program per array shape at the first save
  (~10 s for a UNet on 8 host devices); they pay off only on accelerators. (The registry
  override logs a warning, which is not news here.)
  """
  global _QUIETED
  if _QUIETED:
    return
  _QUIETED = True
  logging.get_absl_logger().addFilter(_OrbaxTracebackFilter())
  std_logging.getLogger("asyncio").addFilter(_OrbaxTracebackFilter())
  sys.unraisablehook = _drop_closed_loop_callbacks(sys.unraisablehook)
  if jax.default_backend() == "cpu":
    absl_logger = logging.get_absl_logger()
    level = absl_logger.level
    absl_logger.setLevel(std_logging.ERROR)
    try:
      ocp.type_handlers.register_type_handler(
          jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    finally:
      absl_logger.setLevel(level)


# ----------------------------------------------------------------------------------------
# Checksums of a step directory.

class _Manager(ocp.CheckpointManager):
  """orbax's CheckpointManager whose every wait turns a failed background save into SaveError."""

  def __init__(self, *args, on_save_failure, **kwargs):
    self._on_save_failure = on_save_failure
    super().__init__(*args, **kwargs)

  def wait_until_finished(self):
    try:
      super().wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._on_save_failure(e) from e


def note_location(workdir, meta: dict) -> None:
  """Logs both places when a checkpoint's meta says it was written in another workdir."""
  written = meta.get("workdir")
  if written and written != os.fspath(workdir):
    logging.info("workdir %s was written as %s (a copy, a moved folder or another path to "
                 "it); reading it here.", os.fspath(workdir), written)


def _newest(workdir, read_meta: bool) -> tuple[int | None, dict | None]:
  """(step, meta or None) of the workdir's newest intact checkpoint; (None, None) if none."""
  directory = storage.check_bucket(workdir, "workdir") / "checkpoints"
  if not directory.is_dir():
    return None, None
  _configure_orbax()
  manager = ocp.CheckpointManager(directory, options=_reading_options(), item_names=ITEMS)
  try:
    step = step_selection.StepReader(directory, manager).step()
    if step is None or not read_meta:
      return step, None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    note_location(directory.parent, meta)
    return step, meta
  finally:
    manager.close()


def saved_step(workdir) -> int | None:
  """The step of the workdir's newest intact checkpoint (None if it holds none); reads no
  arrays. Raises step_selection.DamagedCheckpointError if no step verifies."""
  return _newest(workdir, read_meta=False)[0]


def saved_meta(workdir) -> dict | None:
  """The `meta` item (model config, image shape, config) of the workdir's newest intact checkpoint.

  None if the workdir holds no checkpoint. Reads only JSON (and the checksums of the
  newest steps): no dataset, no arrays. Raises step_selection.DamagedCheckpointError if no step verifies.
  """
  return _newest(workdir, read_meta=True)[1]


def _reading_options() -> ocp.CheckpointManagerOptions:
  # Not orbax's read_only mode (which logs a warning per manager); this writes nothing
  # as long as nothing is saved.
  return ocp.CheckpointManagerOptions(create=False, enable_async_checkpointing=False)


class Checkpointer:
  """Saves every `every` steps (and when forced), keeps `keep`, restores the newest intact step.

  workdir: a local folder or a gs:// URL (str or epath.Path).
  model: the settings that define the checkpointed model (default config.model).
  read_only: restore only (sampling); nothing in the workdir is created or renamed.
  A Checkpointer that may save is a training run: it first takes the workdir's run lock
  (run_lock.py; InputError naming the owner if another run holds it) and releases it in
  `close()`.
  """

  def __init__(self, workdir, config: ml_collections.ConfigDict,
               image_shape: tuple[int, ...], *, every: int, keep: int,
               model: dict | None = None, read_only: bool = False):
    _configure_orbax()
    self.workdir = storage.path(workdir, "workdir")
    self.directory = self.workdir / "checkpoints"
    model = config.model.to_dict() if model is None else model
    # `workdir`: where the run wrote it, so that a mode opening it elsewhere (a copy, a
    # mount, a moved folder) can name both places (`note_location`).
    self.meta = _json({"model": model, "image_shape": list(image_shape),
                       "config": config.to_dict(), "workdir": os.fspath(self.workdir)})
    self.read_only = read_only
    self.lock = None if read_only else run_lock.RunLock.acquire(
        self.workdir, config.train.get("lock_timeout", run_lock.DEFAULT_TIMEOUT))
    self._saving: int | None = None       # the step orbax is writing in the background
    self._changed_at: int | None = None   # resumed step whose training settings changed
    if read_only:
      options = _reading_options()
    else:
      options = ocp.CheckpointManagerOptions(
          save_interval_steps=max(int(every), 1), max_to_keep=keep, create=True,
          enable_async_checkpointing=True, cleanup_tmp_directories=True,
          async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest))
    self.manager = _Manager(self.directory, options=options, item_names=ITEMS,
                            on_save_failure=self._save_failed)
    self._reader = step_selection.StepReader(self.directory, self.manager)

  # -- restoring ---------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest step that verifies; None if there is none at all.

    Raises step_selection.DamagedCheckpointError if there are checkpoints but none verifies.
    """
    return self._reader.step()

  def saved_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def check_compatible(self, training: bool = True) -> None:
    """Raises InputError if the newest checkpoint was written for another model.

    training: also refuse changed training settings (compat.check) unless the config
    sets train.allow_schedule_change; then the new config is kept beside the original
    (`write_config_json`).
    """
    step = self.latest_step()
    if step is None:
      return
    saved = self.saved_meta(step)
    note_location(self.workdir, saved)
    if compat.check(self.workdir, step, saved, self.meta, training=training,
                    changed_config_name=self._changed_config_name(step)):
      self._changed_at = step

  @staticmethod
  def _changed_config_name(step: int) -> str:
    return f"config.step_{step}.json"

  def write_config_json(self) -> None:
    """The run's full config as JSON, readable without orbax (process 0).

    `config.json` is written by the run that starts the workdir (no checkpoint yet) and
    then kept; a resumed run whose changed training settings were accepted writes
    `config.step_<k>.json` (k: the step it resumed) beside it.
    """
    if jax.process_index() != 0:
      return
    if self._changed_at is not None:
      name = self._changed_config_name(self._changed_at)
    elif self.latest_step() is None or not (self.workdir / "config.json").exists():
      name = "config.json"
    else:
      return
    storage.write_text_atomic(self.workdir / name,
                              json.dumps(self.meta["config"], indent=2, sort_keys=True))

  def restore(self, abstract_state, *, partial: bool = False):
    """The newest intact state, restored into the shardings of `abstract_state`, or None.

    Leaves without a sharding are restored replicated over all devices, whatever
    topology wrote the checkpoint (e.g. sampling on one device from a pod run).
    partial: `abstract_state` is a dict of some of the saved state's fields (e.g.
    {"ema_params": ..., "step": ...}); only those are read, so loading a trained model
    needs neither the optimizer's state nor its structure.
    """
    replicated = sharding.replicated_everywhere()
    abstract_state = jax.tree.map(
        lambda a: a if getattr(a, "sharding", None) is not None else
        jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), abstract_state)
    while True:
      step = self.latest_step()
      if step is None:
        return None
      logging.info("Restoring checkpoint of step %d from %s", step, str(self.workdir))
      try:
        args = (ocp.args.PyTreeRestore(
            item=abstract_state, partial_restore=True,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state))
                if partial else ocp.args.StandardRestore(abstract_state))
        restored = self.manager.restore(step, args=ocp.args.Composite(state=args))
        return restored["state"]
      except Exception as e:  # pylint: disable=broad-except
        if step in self._reader.verified or jax.process_count() > 1:
          raise    # intact files: a genuine mismatch (e.g. another optimizer), not damage
        self._reader.reject(step, e)

  # -- saving ------------------------------------------------------------------------------

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Starts an asynchronous save of `state` as `step` (waits for the previous save first).

    Raises SaveError if this or the previous save failed.
    """
    if self.read_only:
      raise RuntimeError("this Checkpointer was opened read_only.")
    self._set_damaged_aside()
    self.manager.wait_until_finished()          # the previous save's errors surface here
    self._saving = step
    try:
      return self.manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(self.meta)), force=force)
    except SaveError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(e) from e

  def poll(self) -> None:
    """Raises SaveError now if the save running in the background has failed (non-blocking),
    and InputError if another run took the workdir's lock over."""
    if self._saving is not None and not self.manager.is_saving_in_progress():
      self.wait()
    if self.lock is not None:
      self.lock.poll()

  def wait(self) -> None:
    """Waits for the background save; raises SaveError if it failed."""
    self.manager.wait_until_finished()
    self._saving = None

  def _write_manifest(self) -> None:
    """orbax's post-finalization callback (process 0, background thread, before the commit)."""
    step = self._saving
    tmp = [p for p in self.directory.glob(f"{step}{TMP_SUFFIX}*") if p.is_dir()]
    if len(tmp) == 1:
      manifest.write_manifest(tmp[0])
    elif (self.directory / str(step)).is_dir():   # commit-file style (GCS): written in place
      manifest.write_manifest(self.directory / str(step))
    else:
      raise FileNotFoundError(f"cannot find the directory of step {step} being saved in "
                              f"{self.directory} (found {[p.name for p in tmp]}).")

  def _set_damaged_aside(self) -> None:
    """Renames damaged steps newer than the restored one to <step>.damaged (process 0)."""
    newer = [(s, what) for s, what in self._reader.damaged
             if self._reader.step() is None or s > self._reader.step()]
    if not newer:
      return
    if jax.process_index() == 0:
      for s, _ in newer:
        src = self.directory / str(s)
        if not src.exists():
          continue
        dst = self.directory / f"{s}{DAMAGED_SUFFIX}"
        k = 1
        while dst.exists():
          dst, k = self.directory / f"{s}{DAMAGED_SUFFIX}-{k}", k + 1
        try:
          src.rename(dst)
        except OSError as e:
          raise SaveError(f"checkpoint step {s} in {self.directory} is damaged and cannot be "
                          f"moved aside to {dst.name} ({storage.reason(e)}); move or remove it "
                          "yourself, then rerun.") from e
        logging.warning("renamed the damaged checkpoint step %d to %s (kept, not deleted) so "
                        "that training can save step %d again.", s, dst, s)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices("asyncpatch_damaged_steps_moved")
    self._reader.damaged = [d for d in self._reader.damaged if d not in newer]
    self.manager.reload()

  def _save_failed(self, e: BaseException) -> SaveError:
    """Removes the failed step's temporary files; the SaveError to raise."""
    step, self._saving = self._saving, None
    removed = []
    if jax.process_index() == 0 and step is not None:
      leftovers = list(self.directory.glob(f"{step}{TMP_SUFFIX}*"))
      final = self.directory / str(step)
      if storage.is_url(self.directory) and final.exists() and \
          not (final / "commit_success.txt").exists():
        leftovers.append(final)   # commit-file style: an uncommitted step is its leftover
      for p in leftovers:
        try:
          p.rmtree() if p.is_dir() else p.unlink()
          removed.append(p.name)
        except OSError:
          pass
    try:
      self.manager.reload()
      kept = [s for s in self.manager.all_steps() if s != step]
    except Exception:  # pylint: disable=broad-except
      kept = []
    return SaveError(
        f"saving checkpoint step {step} to {self.directory} failed ({step_selection.one_line(e)}); training "
        f"stopped. {'Removed its partial files; ' if removed else ''}the checkpoints of steps "
        f"{kept} are intact. Free space or fix permissions, then rerun the same command to "
        "resume.")

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def close(self) -> None:
    """Waits for the last save: SaveError if it failed (each failure is raised once)."""
    try:
      self.wait()
    finally:
      try:
        self.manager.close()
      finally:
        if self.lock is not None:
          self.lock.release()
          self.lock = None
