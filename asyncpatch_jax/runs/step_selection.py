"""Which checkpoint step to restore: the newest one that verifies, agreed by every process.

Process 0 checks the newest steps against their checksum manifests (runs/manifest.py) and
the other processes receive its choice, so a pod reads each checkpoint once. A damaged
step is reported once, in one line, and left in place; when none is restorable,
DamagedCheckpointError lists every step and what is wrong with it.
"""

from __future__ import annotations

import os
import re

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from asyncpatch_jax.runs import manifest
from asyncpatch_jax.runtime import checks

class DamagedCheckpointError(checks.InputError):
  """No checkpoint of a workdir could be restored; the message lists every step and its damage."""


def one_line(e: BaseException) -> str:
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


_REPORTED: set[tuple[str, int]] = set()   # (directory, step) of damage already reported


class StepReader:
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
    self.damaged.append((step, f"it has no {manifest.MANIFEST} and orbax cannot restore it "
                               f"({one_line(e)})"))
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
      status, what = manifest.check_step(self.directory / str(step))
      if status == "damaged":
        self.damaged.append((step, what))
        continue
      if status == "unverified":
        try:       # at least its meta must read (the state is tried when restored)
          self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        except Exception as e:  # pylint: disable=broad-except
          self.damaged.append((step, f"it has no {manifest.MANIFEST} and orbax cannot read it "
                                     f"({one_line(e)})"))
          continue
        logging.warning("checkpoint step %d in %s has no %s (saved before checksums "
                        "existed); restoring it under orbax's own checks only.", step,
                        self.directory, manifest.MANIFEST)
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


