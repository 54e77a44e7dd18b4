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
sha256 of every file of the step (`MANIFEST`; only orbax's own commit records,
`_CHECKPOINT_METADATA` and `commit_success.txt`, are written after it and are checked
for being readable instead). Restoring verifies the newest step against it (plus
orbax's own checks) and falls back to the newest step that verifies; a damaged step is
reported in one line (step, file, what is wrong) and left where it is. Before a
training run saves again, damaged steps newer than the one it resumed are renamed to
`<step>.damaged` (never deleted), so they neither block saving that step again nor
count towards `keep_checkpoints`. A step without a manifest (written before checksums
existed) is restored under orbax's checks alone. If no step can be restored, a
`DamagedCheckpointError` lists what was found and nothing is changed.

A save that fails (disk full, permissions) raises `SaveError` at the next save, wait
or `poll()`: the half-written temporary directory is removed, older checkpoints are
untouched (orbax removes old steps only after a newer one is committed), and the
message names the step, the reason and the checkpoints that remain.
"""

from __future__ import annotations

import hashlib
import json
import logging as std_logging
import os
import re
import sys
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import storage
from asyncpatch_jax.runs import run_lock
from asyncpatch_jax.runtime import sharding

ITEMS = ("state", "meta")
MANIFEST = "asyncpatch_checksums.json"
# orbax's suffix of a step being written (`<step>.orbax-checkpoint-tmp...`).
TMP_SUFFIX = ".orbax-checkpoint-tmp"
# Written by orbax's commit after the manifest (checked for being readable JSON/text).
_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")
DAMAGED_SUFFIX = ".damaged"

# Settings a resumed training run may change freely: they do not change what the
# remaining steps compute (logging, checkpointing, sampling and evaluation, the mesh
# layout, where the data lives). Anything else (optim.*, train.num_steps,
# train.batch_size, seed, data, timesteps, loss, ...) changes the run's trajectory.
FREE_TO_CHANGE = ("sample.", "eval.", "evaluate.", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.sample_every", "train.progress_bar",
                  "train.fsdp", "train.allow_schedule_change", "train.lock_timeout",
                  "train.skip_memory_check",
                  "data.data_dir",
                  "uncertainty.head_workdir", "uncertainty.model_workdir",
                  "uncertainty.policy", "uncertainty.budget", "uncertainty.speedup",
                  "uncertainty.overlap", "uncertainty.quantile", "uncertainty.look_ahead",
                  "uncertainty.sub_steps", "uncertainty.grid", "uncertainty.ipr_order",
                  "uncertainty.debug")


class DamagedCheckpointError(checks.InputError):
  """No checkpoint of a workdir could be restored; the message lists every step and its damage."""


class SaveError(storage.WriteError):
  """A checkpoint could not be written; the message names the step, the reason, what remains."""


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


def trajectory_differences(saved: dict, current: dict) -> list[str]:
  """The config differences that change what training computes (all but FREE_TO_CHANGE).

  A key that only one side has was added or removed by a newer version of this code,
  not changed by the user, and is not counted.
  """
  return [d for d in config_differences(saved, current)
          if "'<missing>'" not in d
          and not any(d.startswith(p) if p.endswith(".") else d.split(":")[0] == p
                      for p in FREE_TO_CHANGE)]


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

def _files(directory: epath.Path, prefix: str = ""):
  """(relative path, path) of every file under `directory`, sorted, recursively."""
  for p in sorted(directory.iterdir(), key=lambda q: q.name):
    rel = f"{prefix}{p.name}"
    if p.is_dir():
      yield from _files(p, rel + "/")
    else:
      yield rel, p


def _digest(p: epath.Path) -> tuple[int, str]:
  h, size = hashlib.sha256(), 0
  with p.open("rb") as f:
    while chunk := f.read(1 << 22):
      h.update(chunk)
      size += len(chunk)
  return size, h.hexdigest()


def write_manifest(step_dir: epath.Path) -> None:
  """Writes MANIFEST into `step_dir`: {relative path: {size, sha256}} of its files.

  Called by process 0 after every process finished writing the step, before orbax
  commits it, so a committed step always carries its manifest.
  """
  files = {}
  for rel, p in _files(step_dir):
    if rel == MANIFEST or rel in _COMMIT_FILES:
      continue
    size, sha = _digest(p)
    files[rel] = {"size": size, "sha256": sha}
  storage.write_text_atomic(step_dir / MANIFEST, json.dumps(
      {"format": "asyncpatch_checksums/1", "algorithm": "sha256", "files": files}, indent=1,
      sort_keys=True))


def check_step(step_dir: epath.Path) -> tuple[str, str]:
  """('ok' | 'unverified' | 'damaged', what is wrong) for a step directory.

  'unverified': the step has no manifest (written before checksums existed, or the
  manifest file was removed); only orbax's own checks can judge it.
  """
  manifest = step_dir / MANIFEST
  problems = []
  for name in _COMMIT_FILES[:1]:
    p = step_dir / name
    if p.exists():
      try:
        json.loads(p.read_text())
      except (ValueError, UnicodeDecodeError):
        problems.append(f"file {name} is not valid JSON ({p.stat().st_size} bytes)")
  if not manifest.exists():
    if problems:
      return "damaged", problems[0]
    return "unverified", f"no {MANIFEST}"
  try:
    files = json.loads(manifest.read_text())["files"]
  except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
    return "damaged", f"its checksum file {MANIFEST} is unreadable ({type(e).__name__})"
  for rel, want in sorted(files.items()):
    p = step_dir / rel
    if not p.exists():
      problems.append(f"file {rel} is missing")
      continue
    size, sha = _digest(p)
    if size != want["size"]:
      problems.append(f"file {rel} has {size} bytes, {want['size']} when saved "
                      f"({'truncated' if size < want['size'] else 'grown'})")
    elif sha != want["sha256"]:
      problems.append(f"file {rel} has different bytes than when saved (sha256 mismatch)")
  if not problems:
    return "ok", ""
  more = f" (and {len(problems) - 1} more damaged file{'s' * (len(problems) > 2)})" \
      if len(problems) > 1 else ""
  return "damaged", problems[0] + more


def _one_line(e: BaseException) -> str:
  """An exception (and its causes) as one line of at most ~300 characters.

  The operating system's reason comes first when the chain names one (an OSError's
  errno, or tensorstore's `os_error_code`), e.g. 'No space left on device: ...'.
  """
  texts, code, seen = [], None, e
  while seen is not None and len(texts) < 5:
    text = " ".join(str(seen).split())
    if text:
      texts.append(f"{type(seen).__name__}: {text}")
    if code is None and isinstance(seen, OSError) and seen.errno:
      code = seen.errno
    seen = seen.__cause__ or seen.__context__
  if code is None:
    m = re.search(r"os_error_code='?(\d+)", " ".join(texts))
    code = int(m.group(1)) if m else None
  head = f"{os.strerror(code)}: " if code else ""
  body = texts[0] if texts else type(e).__name__
  return head + (body if len(body) <= 240 else body[:240] + "...")


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


_REPORTED: set[tuple[str, int]] = set()   # (directory, step) of damage already reported


class _StepReader:
  """Picks the newest restorable step of a checkpoints directory (verifying lazily, once).

  Process 0 reads the files and the other processes receive its choice, so a pod
  reads each checkpoint once.
  """

  def __init__(self, directory: epath.Path, manager: ocp.CheckpointManager):
    self.directory = directory
    self.manager = manager
    self.damaged: list[tuple[int, str]] = []   # (step, what is wrong), newest first
    self.verified: set[int] = set()            # steps whose checksums matched
    self._step: int | None = None
    self._done = False

  def step(self) -> int | None:
    """The newest step that verifies (None if there are no steps at all).

    Raises DamagedCheckpointError if there are steps but none verifies.
    """
    if not self._done:
      self._step = self._agree(None)
      self._done = True
    return self._step

  def reject(self, step: int, e: BaseException) -> None:
    """An unverified step that orbax could not restore: count it as damaged, select again."""
    self.damaged.append((step, f"it has no {MANIFEST} and orbax cannot restore it "
                               f"({_one_line(e)})"))
    self._step = self._agree(step)

  def _agree(self, below: int | None) -> int | None:
    step = self._select(below) if jax.process_index() == 0 else -1
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      step = int(multihost_utils.broadcast_one_to_all(step))
    if step == -2:
      raise self._none_restorable()
    return None if step < 0 else step

  def _select(self, below: int | None) -> int:
    """The newest restorable step below `below`; -1: no steps at all, -2: none restorable."""
    steps = sorted((s for s in self.manager.all_steps() if below is None or s < below),
                   reverse=True)
    if not steps and below is None:
      return -1
    for step in steps:
      status, what = check_step(self.directory / str(step))
      if status == "damaged":
        self.damaged.append((step, what))
        continue
      if status == "unverified":
        try:       # at least its meta must read (the state is tried when restored)
          self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # pylint: disable=broad-except
          self.damaged.append((step, f"it has no {MANIFEST} and orbax cannot read it "
                                     f"({_one_line(e)})"))
          continue
        logging.warning("checkpoint step %d in %s has no %s (saved before checksums "
                        "existed); restoring it under orbax's own checks only.", step,
                        self.directory, MANIFEST)
      else:
        self.verified.add(step)
      for bad, what in self.damaged:
        if (str(self.directory), bad) not in _REPORTED:   # once per process and step
          _REPORTED.add((str(self.directory), bad))
          logging.warning("checkpoint step %d in %s is damaged: %s; using step %d instead "
                          "(the damaged step is left in place, nothing is deleted).", bad,
                          self.directory, what, step)
      return step
    return -2

  def _none_restorable(self) -> DamagedCheckpointError:
    if not self.damaged:
      return DamagedCheckpointError(
          f"no checkpoint in {self.directory} can be restored (process 0 found every step "
          "damaged; see its log). Nothing was deleted.")
    listed = "; ".join(f"step {s}: {what}" for s, what in self.damaged)
    return DamagedCheckpointError(
        f"no checkpoint in {self.directory} can be restored, every step is damaged ({listed}). "
        "Nothing was deleted or changed. Restore the files from a copy, or train from scratch "
        "in another --workdir.")


def note_location(workdir, meta: dict) -> None:
  """Logs both places when a checkpoint's meta says it was written in another workdir."""
  written = meta.get("workdir")
  if written and written != os.fspath(workdir):
    logging.info("workdir %s was written as %s (a copy, a moved folder or another path to "
                 "it); reading it here.", os.fspath(workdir), written)


def saved_meta(workdir) -> dict | None:
  """The `meta` item (model config, image shape, config) of the workdir's newest intact checkpoint.

  None if the workdir holds no checkpoint. Reads only JSON (and the checksums of the
  newest steps): no dataset, no arrays. Raises DamagedCheckpointError if no step verifies.
  """
  directory = storage.check_bucket(workdir, "workdir") / "checkpoints"
  if not directory.is_dir():
    return None
  _configure_orbax()
  manager = ocp.CheckpointManager(directory, options=_reading_options(), item_names=ITEMS)
  try:
    step = _StepReader(directory, manager).step()
    if step is None:
      return None
    meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    note_location(directory.parent, meta)
    return meta
  finally:
    manager.close()


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
    self._reader = _StepReader(self.directory, self.manager)

  # -- restoring ---------------------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest step that verifies; None if there is none at all.

    Raises DamagedCheckpointError if there are checkpoints but none verifies.
    """
    return self._reader.step()

  def saved_meta(self, step: int) -> dict:
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

  def check_compatible(self, training: bool = True) -> None:
    """Raises InputError if the newest checkpoint was written for another model.

    training: also refuse changed training settings (trajectory_differences) unless the
    config sets train.allow_schedule_change; then the new config is kept beside the
    original (`write_config_json`).
    """
    step = self.latest_step()
    if step is None:
      return
    saved = self.saved_meta(step)
    note_location(self.workdir, saved)
    diffs = config_differences(saved["model"], self.meta["model"])
    if saved["image_shape"] != self.meta["image_shape"]:
      diffs.append(f"image_shape: {saved['image_shape']} -> {self.meta['image_shape']}")
    if diffs:
      raise checks.InputError(
          f"workdir {str(self.workdir)!r} holds a checkpoint (step {step}) of a different model; "
          "refusing to resume it. Differing keys (checkpoint -> this run):\n  "
          + "\n  ".join(diffs) + "\nUse another --workdir, or the checkpoint's config "
          f"(--config={self.workdir / 'config.json'}).")
    if not training:
      return
    changed = trajectory_differences(saved["config"], self.meta["config"])
    if not changed:
      return
    allowed = bool(self.meta["config"].get("train", {}).get("allow_schedule_change", False))
    listed = "; ".join(changed)
    if not allowed:
      raise checks.InputError(
          f"workdir {str(self.workdir)!r}: resuming step {step} with changed training settings "
          f"({listed}) would change the learning-rate schedule, data or loss mid-run; "
          f"refusing. Rerun with the checkpoint's settings (--config={self.workdir / 'config.json'}"
          "), or accept the change with --config.train.allow_schedule_change=True (the "
          f"workdir then keeps its config.json and records this run's as "
          f"{self._changed_config_name(step)}).")
    self._changed_at = step
    logging.warning("resuming step %d with changed training settings (%s), accepted by "
                    "train.allow_schedule_change; config.json keeps the original config, this "
                    "run's is %s.", step, listed, self._changed_config_name(step))

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

  def restore(self, abstract_state):
    """The newest intact state, restored into the shardings of `abstract_state`, or None.

    Leaves without a sharding are restored replicated over all devices, whatever
    topology wrote the checkpoint (e.g. sampling on one device from a pod run).
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
        restored = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
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
      write_manifest(tmp[0])
    elif (self.directory / str(step)).is_dir():   # commit-file style (GCS): written in place
      write_manifest(self.directory / str(step))
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
        f"saving checkpoint step {step} to {self.directory} failed ({_one_line(e)}); training "
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
