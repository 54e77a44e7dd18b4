"""Several processes (`jax.distributed`): reading arrays that span them, and who writes files.

On a multi-process mesh (a TPU pod slice, or CPU processes on localhost in the tests) a
`jax.Array` sharded over every device holds, in each process, only the shards of that
process's devices; `np.asarray` on it raises. The library's outputs (samples, features,
metric counts) leave their compiled functions through `gather`, which hands every
process the whole array, so the code after it (grids, scores, files) is the same on one
process and on many. Files shared by the run are written by process 0 only (`is_writer`).
"""

from __future__ import annotations

from typing import Any

import jax
from jax.experimental import multihost_utils


def spans_processes(x: Any) -> bool:
  """True for a jax.Array with shards on devices of other processes (not readable here)."""
  return isinstance(x, jax.Array) and not x.is_fully_addressable


def gather(tree: Any) -> Any:
  """`tree` with every leaf that spans processes gathered into a host array (numpy).

  A collective: on several processes, every process must call it with the same tree.
  Other leaves (one process, or arrays on this process's devices) are returned as they
  are, so on one process this does nothing and keeps the arrays on their devices.
  """
  return jax.tree.map(
      lambda x: multihost_utils.process_allgather(x, tiled=True) if spans_processes(x) else x,
      tree)


def is_writer() -> bool:
  """True in the process that writes the run's shared files (process 0)."""
  return jax.process_index() == 0
