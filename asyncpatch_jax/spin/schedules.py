"""Spatial schedules pi^(t) over the blocks of the chain (Growing Images Section 4.2).

A schedule is a probability vector pi^(t) over the L blocks at every step
t = 0..T-1, with zero mass on observed (clamped) blocks. Every schedule here is
stored as a small table and a period,

    pi^(t) = table[(t // period) mod P],          table: [P, L],

which covers the built-ins and any user schedule and keeps the compiled scans
free of [T, L] constants:
  parallel         P = 1: 1/|H| on every hidden block (diffusion default);
  progressive_lr   unit mass on one hidden block at a time, left to right,
                   T_phase = T / |H| steps each (one sweep);
  progressive_rl   the mirror sweep, right to left;
  interleaved      unit mass on one hidden block at a time, round-robin left to
                   right, T_int steps per visit;
  a user vector    [L] (constant in t) or [T, L] (one row per step).
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.spin.model import BlockChain, as_int

SCHEDULE_NAMES = ("parallel", "progressive_lr", "progressive_rl", "interleaved")


@dataclasses.dataclass(frozen=True, eq=False)
class Schedule:
  """pi^(t) = table[(t // period) mod P] for t = 0..num_steps-1.

  Attributes:
    name: a built-in name or "custom".
    table: [P, L] float64 rows, each a probability vector over the hidden blocks.
    period: steps per table row (T_phase, T_int, or 1).
    num_steps: the horizon T.
  """
  name: str
  table: np.ndarray
  period: int
  num_steps: int

  def weights(self, t):
    """pi^(t): [L] for an integer step `t` (traced or concrete)."""
    return schedule_weights(jnp.asarray(self.table), self.period, t)

  def dense(self) -> np.ndarray:
    """The full [T, L] matrix of pi^(t) (for inspection; O(T L) memory)."""
    rows = (np.arange(self.num_steps) // self.period) % self.table.shape[0]
    return self.table[rows]


def schedule_weights(table, period, t):
  """pi^(t) = table[(t // period) mod P]; `table` [P, L], scalars `period`, `t` (jittable)."""
  return table[(t // period) % table.shape[0]]


def check_record_every(record_every, num_steps: int) -> int:
  """The recording stride: a positive integer dividing T (default T: final state only)."""
  if record_every is None:
    return num_steps
  record_every = as_int(record_every, "record_every", 1)
  if num_steps % record_every:
    raise checks.InputError(f"record_every = {record_every} must divide T = {num_steps}.")
  return record_every


def check_distribution(pi: np.ndarray, chain: BlockChain, what: str) -> None:
  """Rows of `pi` ([..., L]) must be probability vectors over the hidden blocks."""
  if not np.all(np.isfinite(pi)):
    raise checks.InputError(f"{what} holds non-finite values; expected probabilities over the "
                     "hidden blocks.")
  if np.any(pi < 0):
    raise checks.InputError(f"{what} has a negative entry (min {pi.min():.4g}); probabilities must "
                     "be >= 0.")
  if chain.clamped:
    observed = list(chain.clamped)
    mass = pi[..., observed]
    if np.any(mass != 0):
      raise checks.InputError(f"{what} puts mass {mass.max():.4g} on a clamped block (clamped blocks "
                       f"{observed}); a schedule only updates hidden blocks {list(chain.hidden)}.")
  sums = pi.sum(-1)
  bad = np.flatnonzero(np.abs(sums - 1.0) > 1e-6)
  if bad.size:
    raise checks.InputError(f"{what} does not sum to 1 (row {bad[0]} sums to "
                     f"{np.ravel(sums)[bad[0]]:.6g}); a schedule is a probability distribution "
                     "over the hidden blocks.")


def make_schedule(spec, chain: BlockChain, num_steps: int, *,
                  interleave_steps: int = 20) -> Schedule:
  """Builds and validates a spatial schedule pi^(t) (Growing Images Section 4.2).

  Args:
    spec: "parallel", "progressive_lr", "progressive_rl", "interleaved", or a user
      schedule: an array [L] (the same pi at every step) or [T, L] (pi^(t) per step),
      each row a probability vector over the hidden blocks.
    chain: the chain; its clamped blocks get zero mass.
    num_steps: horizon T >= 1. The progressive sweeps use T_phase = T / |H| and
      need T divisible by |H|.
    interleave_steps: T_int >= 1, steps per visit of the interleaved schedule.
  Returns:
    A `Schedule`.
  """
  num_steps = as_int(num_steps, "num_steps (T)", 1)
  hidden = list(chain.hidden)
  num_blocks = chain.num_blocks
  if isinstance(spec, str):
    if spec not in SCHEDULE_NAMES:
      raise checks.InputError(f"unknown schedule {spec!r}; expected one of {list(SCHEDULE_NAMES)} or a "
                       "probability vector [L] / [T, L] over the hidden blocks.")
    one_hot = np.eye(num_blocks)[hidden]                               # [|H|, L]
    if spec == "parallel":
      return Schedule(spec, one_hot.mean(0, keepdims=True), 1, num_steps)
    if spec == "interleaved":
      interleave_steps = as_int(interleave_steps, "interleave_steps (T_int)", 1)
      return Schedule(spec, one_hot, interleave_steps, num_steps)
    if num_steps % len(hidden):
      raise checks.InputError(f"schedule {spec!r} splits T = {num_steps} steps into |H| = {len(hidden)} "
                       f"phases of T_phase = T / |H| steps, but {num_steps} is not divisible by "
                       f"{len(hidden)}; choose T as a multiple of {len(hidden)}.")
    table = one_hot if spec == "progressive_lr" else one_hot[::-1]
    return Schedule(spec, np.ascontiguousarray(table), num_steps // len(hidden), num_steps)

  pi = np.asarray(spec, dtype=np.float64)
  if pi.shape == (num_blocks,):
    check_distribution(pi, chain, "schedule vector pi")
    return Schedule("custom", pi[None], 1, num_steps)
  if pi.shape == (num_steps, num_blocks):
    check_distribution(pi, chain, "schedule pi^(t)")
    return Schedule("custom", pi, 1, num_steps)
  raise checks.InputError(f"schedule array has shape {pi.shape}; expected [L] = [{num_blocks}] or "
                   f"[T, L] = [{num_steps}, {num_blocks}].")


def check_schedule(schedule: "Schedule", chain) -> None:
  """A Schedule from make_schedule() over this chain's blocks, valid on its hidden blocks."""
  if not isinstance(schedule, Schedule):
    raise checks.InputError("schedule must be a Schedule from make_schedule(); "
                     f"got {type(schedule).__name__}.")
  if schedule.table.shape[1] != chain.num_blocks:
    raise checks.InputError(f"schedule is over {schedule.table.shape[1]} blocks; the chain has "
                     f"{chain.num_blocks}.")
  check_distribution(schedule.table, chain, f"schedule {schedule.name!r}")
