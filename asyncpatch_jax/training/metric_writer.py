"""Training metrics to `workdir/metrics.jsonl` and TensorBoard event files, from process 0 only.

The workdir may be a local folder or a gs:// URL (runtime/storage.py). An object store
cannot append, so metrics.jsonl is rewritten whole (atomically) at every write; a run
that resumes from the checkpoint of step k first drops the records after step k, which
the interrupted run logged but did not checkpoint, so every step appears once.
TensorBoard events go through tensorboardX, which writes gs:// URLs itself (with
google-cloud-storage, in the `[tpu]` extra); `purge_step` tells TensorBoard to drop the
same orphaned steps.
"""

from __future__ import annotations

import json

import jax

from asyncpatch_jax.runtime import storage


def _records(text: str, last_step: int | None) -> list[str]:
  """The JSON lines of `text` whose step is at most `last_step` (all if None)."""
  kept = []
  for line in text.splitlines():
    try:
      step = json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
      continue  # a line cut by a kill (older runs appended in place)
    if last_step is None or step <= last_step:
      kept.append(line)
  return kept


class MetricWriter:
  """One JSON line per logged step in metrics.jsonl, mirrored to TensorBoard.

  workdir: a local folder or gs:// URL; start_step: the step training resumes from
  (0 for a fresh run): records after it are dropped; None keeps every record.
  """

  def __init__(self, workdir, start_step: int | None = None):
    self.active = jax.process_index() == 0
    if not self.active:
      return
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top

    workdir = storage.path(workdir)
    self._path = workdir / "metrics.jsonl"
    self._lines = (_records(self._path.read_text(), start_step)
                   if start_step != 0 and self._path.exists() else [])
    self._tb = SummaryWriter(str(workdir / "tensorboard"),
                             purge_step=start_step + 1 if start_step else None)

  def write(self, step: int, scalars: dict[str, float]) -> None:
    if not self.active:
      return
    record = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    self._lines.append(json.dumps(record))
    storage.write_text_atomic(self._path, "\n".join(self._lines) + "\n")
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(v), int(step))
    self._tb.flush()

  def close(self) -> None:
    """Flushes TensorBoard; later writes are dropped (safe to call twice)."""
    if self.active:
      self._tb.close()
      self.active = False
