"""One training run per workdir: the run lock `<workdir>/run.lock`, with a heartbeat.

A training run (the diffusion model, the uncertainty head or the autoencoder: every
`Checkpointer` that may save) takes the lock before it writes anything of its own, and
releases it when it ends. The lock is a small JSON object: the owner's host, pid, start
time, a heartbeat time refreshed every `timeout / 4` seconds by a background thread, and
a random token. A second training on the same workdir stops at once with one line naming
the owner; sampling and evaluation never take it, so they work beside a live run.

Taking the lock is an atomic create-if-absent on the storage itself: `os.link` of a fully
written file on a local disk (it fails when the name exists), and on gs:// an upload with
the generation precondition `ifGenerationMatch=0` (google-cloud-storage), never a read
followed by a write. A lock is stale, and taken over with one warning line, when its owner
is a process of this host that no longer exists (SIGKILL, a crash: no waiting), or when
its heartbeat is older than `timeout` seconds (another host: a preempted or killed pod
job). On gs:// the take-over, the heartbeat and the release are conditional on the
generation last seen, so two runs cannot both win; on a local disk the take-over renames
the stale lock aside first (one rename wins). On several processes only process 0 takes
the lock; the others wait for its answer (`broadcast_one_to_all`) and stop with it.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid

import jax
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import storage

NAME = "run.lock"
# train.lock_timeout's default (seconds): a pod job relaunched on other hosts after a hard
# kill waits at most this long for its old lock.
DEFAULT_TIMEOUT = 300.0


class _LocalFile:
  """The lock on a local disk (or any POSIX file system)."""

  def __init__(self, path: epath.Path):
    self.path = os.fspath(path)

  def read(self) -> tuple[dict | None, object]:
    """(owner, version) of the lock; (None, None) when there is none."""
    try:
      with open(self.path, "rb") as f:
        data = f.read()
    except FileNotFoundError:
      return None, None
    owner = _parse(data)
    return owner, (owner or {}).get("token")

  def create(self, data: bytes) -> object | None:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)   # the run's first write
    tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
      f.write(data)
    try:
      os.link(tmp, self.path)       # atomic; fails if the lock exists
      return json.loads(data)["token"]
    except FileExistsError:
      return None
    finally:
      os.unlink(tmp)

  def replace(self, version, data: bytes) -> object | None:
    """Writes `data` if the lock still holds `version` (the token seen); its new version."""
    if self.read()[1] != version:
      return None
    tmp = f"{self.path}.{uuid.uuid4().hex}.tmp"
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, self.path)
    return json.loads(data)["token"]

  def take_over(self, version, data: bytes) -> object | None:
    aside = f"{self.path}.stale.{uuid.uuid4().hex}"
    try:
      os.rename(self.path, aside)   # of two runs taking over, one rename wins
    except FileNotFoundError:
      return None
    owner = _parse(open(aside, "rb").read())
    os.unlink(aside)
    if (owner or {}).get("token") != version:
      return None                   # it changed since it was judged stale
    return self.create(data)

  def delete(self, version) -> None:
    if self.read()[1] == version:
      os.unlink(self.path)


class _GcsObject:
  """The lock on gs://: generation preconditions make every change a compare-and-swap."""

  def __init__(self, path: epath.Path):
    try:
      from google.api_core import exceptions  # pylint: disable=g-import-not-at-top
      from google.cloud import storage as gcs  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise checks.InputError(f"the run lock of a gs:// workdir ({path}) needs "
                              "google-cloud-storage; install the GCS extra: pip install -e "
                              "'.[tpu]' (or pip install google-cloud-storage).") from None
    bucket, name = os.fspath(path).split("://", 1)[1].split("/", 1)
    self._failed = (exceptions.PreconditionFailed, exceptions.NotFound)
    self.blob = gcs.Client().bucket(bucket).blob(name)

  def read(self) -> tuple[dict | None, object]:
    try:
      data = self.blob.download_as_bytes()
    except self._failed:
      return None, None
    return _parse(data), self.blob.generation

  def _upload(self, data: bytes, generation: int) -> object | None:
    try:
      self.blob.upload_from_string(data, content_type="application/json",
                                   if_generation_match=generation)
      return self.blob.generation
    except self._failed:
      return None

  def create(self, data: bytes) -> object | None:
    return self._upload(data, 0)

  def replace(self, version, data: bytes) -> object | None:
    return self._upload(data, version)

  def take_over(self, version, data: bytes) -> object | None:
    return self._upload(data, version)

  def delete(self, version) -> None:
    try:
      self.blob.delete(if_generation_match=version)
    except self._failed:
      pass


def _parse(data: bytes) -> dict | None:
  try:
    owner = json.loads(data)
    return owner if isinstance(owner, dict) else None
  except ValueError:
    return None


def describe(owner: dict | None, now: float | None = None) -> str:
  """'host H, pid P, started at T, last heartbeat S s ago' of a lock's owner."""
  if owner is None:
    return "an unreadable lock"
  now = time.time() if now is None else now
  started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
  return (f"host {owner.get('host')}, pid {owner.get('pid')}, started at {started}, last "
          f"heartbeat {now - float(owner.get('heartbeat', 0)):.0f} s ago")


def stale_reason(owner: dict | None, timeout: float, now: float | None = None,
                 host: str | None = None) -> str | None:
  """Why the lock of `owner` may be taken over, or None while its owner counts as alive."""
  now = time.time() if now is None else now
  host = socket.gethostname() if host is None else host
  if owner is None:
    return "the lock file cannot be read"
  if owner.get("host") == host:
    try:
      os.kill(int(owner.get("pid")), 0)
    except ProcessLookupError:
      return f"its process {owner.get('pid')} on this host no longer exists"
    except (PermissionError, TypeError, ValueError):
      pass
  age = now - float(owner.get("heartbeat", 0))
  if age > timeout:
    return f"its heartbeat is {age:.0f} s old (train.lock_timeout={timeout:g} s)"
  return None


def check_free(workdir, timeout: float) -> None:
  """Raises InputError naming the owner when another live run holds the workdir's lock.

  Reads only (no lock is taken): the trainers call it before compiling, so a second run
  stops at once; the lock itself is taken later, before the first write (`Checkpointer`).
  Only process 0 reads; the others learn the answer when the lock is taken.
  """
  if jax.process_index() != 0:
    return
  lock_path = storage.path(workdir, "workdir") / NAME
  store = _GcsObject(lock_path) if storage.is_url(lock_path) else _LocalFile(lock_path)
  held, seen = store.read()
  if seen is not None and stale_reason(held, float(timeout)) is None:
    raise checks.InputError(_in_use(storage.path(workdir, "workdir"), held, lock_path, timeout))


def _in_use(workdir, held: dict | None, path, timeout: float) -> str:
  return (f"workdir {workdir} is in use by another training run ({describe(held)}); "
          f"stop it, or wait: its lock ({path}) is taken over once its heartbeat is older "
          f"than train.lock_timeout={timeout:g} s. Sampling and evaluation work beside it.")


class RunLock:
  """The held lock of one training run; `RunLock.acquire(workdir, timeout)` takes it."""

  def __init__(self, store, workdir, version, owner: dict, timeout: float):
    self._store, self.workdir, self._version, self.owner = store, workdir, version, owner
    self.timeout = timeout
    self.lost: str | None = None
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="run_lock_heartbeat", daemon=True)
    self._thread.start()

  @classmethod
  def acquire(cls, workdir, timeout: float) -> RunLock | None:
    """Takes the workdir's lock (process 0), or raises InputError naming its owner.

    On the other processes returns None once process 0 holds it.
    """
    timeout = checks.check_range(timeout, "train.lock_timeout", 0, low_open=True)
    workdir = storage.path(workdir, "workdir")
    lock, error = None, ""
    if jax.process_index() == 0:
      try:
        lock = cls._take(workdir, float(timeout))
      except checks.InputError as e:
        error = str(e)
    if jax.process_count() > 1:
      held = multihost_utils.broadcast_one_to_all(np.int32(lock is not None or not error))
      if not held and not error:
        error = (f"workdir {workdir} is in use by another training run (process 0 says "
                 "which); stop that run or choose another --workdir.")
    if error:
      raise checks.InputError(error)
    return lock

  @classmethod
  def _take(cls, workdir: epath.Path, timeout: float) -> RunLock:
    path = workdir / NAME
    store = _GcsObject(path) if storage.is_url(path) else _LocalFile(path)
    now = time.time()
    owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": now,
             "heartbeat": now, "token": uuid.uuid4().hex}
    data = json.dumps(owner).encode()
    for _ in range(3):            # a lock that vanishes or changes between looks: look again
      version = store.create(data)
      if version is not None:
        return cls(store, workdir, version, owner, timeout)
      held, seen = store.read()
      if seen is None and held is None:
        continue                  # released in between
      why = stale_reason(held, timeout)
      if why is None:
        raise checks.InputError(_in_use(workdir, held, path, timeout))
      version = store.take_over(seen, data)
      if version is not None:
        logging.warning("took over the run lock of workdir %s from %s: %s.", workdir,
                        describe(held), why)
        return cls(store, workdir, version, owner, timeout)
    raise checks.InputError(f"workdir {workdir}: the run lock {path} kept changing while it "
                            "was being taken; another run is starting there. Rerun in a "
                            "moment, or choose another --workdir.")

  def _beat(self) -> None:
    while not self._stop.wait(self.timeout / 4):
      owner = dict(self.owner, heartbeat=time.time())
      try:
        version = self._store.replace(self._version, json.dumps(owner).encode())
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("could not refresh the run lock of %s (%s); retrying.", self.workdir,
                        storage.reason(e))
        continue
      if version is None:
        held, _ = self._store.read()
        self.lost = (f"another run took over workdir {self.workdir} ({describe(held)}) while "
                     "this one was training")
        return
      self._version, self.owner = version, owner

  def poll(self) -> None:
    """Raises InputError if another run took the lock over (the heartbeat found it)."""
    if self.lost:
      raise checks.InputError(f"{self.lost}; this run stopped. Its checkpoints are kept; make "
                              "sure one run trains in a workdir.")

  def release(self) -> None:
    """Stops the heartbeat and removes the lock (if it is still this run's)."""
    self._stop.set()
    self._thread.join()
    if self.lost is None:
      try:
        self._store.delete(self._version)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("could not remove the run lock of %s (%s); the next run takes it "
                        "over.", self.workdir, storage.reason(e))
