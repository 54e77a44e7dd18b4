"""Progress bars (tqdm) for the phases a user waits on: training, grids, evaluation, sampling.

Shown on process 0 only, on stderr, and only when `enabled` (the callers pass the
config's `train.progress_bar`, so one switch turns every bar off, e.g. in tests).
"""

from __future__ import annotations

import contextlib

import jax


class _Off:
  """Stands in for a bar that is not shown."""

  def update(self, n: int = 1) -> None:
    del n

  def set_postfix(self, *args, **kwargs) -> None:
    del args, kwargs

  def close(self) -> None:
    pass


@contextlib.contextmanager
def bar(total: int, desc: str, *, enabled: bool = True, unit: str = "it", initial: int = 0):
  """with bar(total, desc) as b: ... b.update(1) ...; a no-op bar when disabled."""
  if not enabled or jax.process_index() != 0:
    yield _Off()
    return
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  b = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, leave=True)
  try:
    yield b
  finally:
    b.close()


def tick(b) -> None:
  """b.update(1) for a bar or None."""
  if b is not None:
    b.update(1)
