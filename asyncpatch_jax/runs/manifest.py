"""The checksum manifest of a checkpoint step: the size and sha256 of each of its files.

Process 0 writes `asyncpatch_checksums.json` into a step just before orbax commits it;
restoring checks the step against it (runs/checkpointing.py) and reports a damaged file
by name. orbax's own commit records are written after the manifest and are only checked
for being readable.
"""

from __future__ import annotations

import hashlib
import json

from etils import epath

from asyncpatch_jax.runtime import storage

MANIFEST = "asyncpatch_checksums.json"
# Written by orbax's commit after the manifest (checked for being readable JSON/text).
_COMMIT_FILES = ("_CHECKPOINT_METADATA", "commit_success.txt")


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


