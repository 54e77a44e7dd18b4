"""Scheduled mean-field block recursion (Growing Images Eq. 13) and the Bayes-optimal profile m*.

    m_l^(t+1) = m_l^(t)
                + (pi_l^(t) / N) [ mean_i mu_Delta_l( sum_l' J_ll' m_l'^(t) + h_l,i ) - m_l^(t) ],

with the local field including the block's own J_intra m_l. With one field per
block (K = 1) the site mean is Eq. 13 exactly; with per-site fields (the tilted
posterior of Prop. 3.1) it is the large-N mean-field response averaged over sites.

All seeds advance together ([S, L] batched arithmetic); the time loop is one
`lax.scan` inside one `jax.jit` per (T, record_every); the schedule enters as
data, so every schedule with the same table shape reuses the compilation.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.spin.model import BlockChain, ChainParams, as_int, blume_capel_response
from asyncpatch_jax.spin.schedules import (Schedule, check_record_every, check_schedule,
                                           make_schedule, schedule_weights)


class Trajectory(NamedTuple):
  """Recorded block magnetisations.

  times: [R + 1] host integers 0, r, 2r, ..., T (r = record_every).
  m: [R + 1, S, L] magnetisations at those times (m[0] is the initial state).
  """
  times: np.ndarray
  m: jax.Array


def mean_field_step(m, params: ChainParams, pi):
  """One step of the scheduled mean-field recursion (Eq. 13).

  Args:
    m: [..., L] block magnetisations.
    params: `ChainParams` of the chain.
    pi: [L] (or [..., L]) schedule weights pi^(t).
  Returns:
    [..., L] the next magnetisations; clamped blocks hold their values.
  """
  u = jnp.einsum("...k,lk->...l", m, params.coupling)                # sum_l' J_ll' m_l'
  response = blume_capel_response(u[..., None] + params.fields,       # [..., L, K]
                                  params.delta[:, None]).mean(-1)
  new = m + pi / params.block_size * (response - m)
  return jnp.where(params.clamp_mask, params.clamp_values, new)


def _scan(m0, params, table, period, stop, num_steps, record_every):
  """[R, S, L] magnetisations after every `record_every` steps; no update for t >= stop."""
  def step(m, t):
    pi = schedule_weights(table, period, t) * (t < stop)
    return mean_field_step(m, params, pi), None

  def chunk(m, start):
    m, _ = lax.scan(step, m, start + jnp.arange(record_every))
    return m, m

  starts = jnp.arange(num_steps // record_every) * record_every
  return lax.scan(chunk, m0, starts)[1]


_scan_jit = jax.jit(_scan, static_argnames=("num_steps", "record_every"))


@functools.partial(jax.jit, static_argnames=("num_steps",))
def _scan_batch(m0, params, tables, periods, stops, num_steps):
  def final(table, period, stop):
    return _scan(m0, params, table, period, stop, num_steps, num_steps)[-1]
  return jax.vmap(final)(tables, periods, stops)


def _check_m0(m0, chain: BlockChain, dtype) -> jax.Array:
  shape = np.shape(m0)
  if len(shape) != 2 or shape[1] != chain.num_blocks:
    raise checks.InputError(f"m0 has shape {shape}; expected initial magnetisations [S, L] with "
                     f"L = {chain.num_blocks} (one row per seed).")
  m0 = jnp.asarray(m0, dtype)
  return jnp.where(jnp.asarray(chain.clamp_mask), jnp.asarray(chain.clamp_values, dtype), m0)


def run_mean_field(m0, chain: BlockChain, schedule: Schedule, *,
                   record_every: int | None = None) -> Trajectory:
  """Runs the scheduled mean-field recursion (Eq. 13) for T = schedule.num_steps steps.

  Args:
    m0: [S, L] initial magnetisations, one row per seed (clamped entries are
      replaced by the clamped values).
    chain: the chain (N = chain.block_size sets the rate pi / N).
    schedule: from `make_schedule`.
    record_every: record m every this many steps (must divide T); default T
      (initial and final state only).
  Returns:
    `Trajectory(times [R + 1], m [R + 1, S, L])`, computed in the default float
    dtype (enable x64 for machine-precision studies).
  """
  check_schedule(schedule, chain)
  num_steps = schedule.num_steps
  record_every = check_record_every(record_every, num_steps)
  params = chain.params()
  m0 = _check_m0(m0, chain, params.coupling.dtype)
  table = jnp.asarray(schedule.table, params.coupling.dtype)
  traj = _scan_jit(m0, params, table, schedule.period, num_steps, num_steps, int(record_every))
  times = np.arange(0, num_steps + 1, record_every)
  return Trajectory(times, jnp.concatenate([m0[None], traj], 0))


def run_mean_field_batch(m0, chain: BlockChain, schedules: Sequence[Schedule]) -> jax.Array:
  """Final magnetisations of several schedules at their own horizons, in one compiled scan.

  The schedules must share a table shape (e.g. one built-in name at several
  horizons T, so T_phase = T / |H| varies); they are vmapped, the scan runs to
  the longest horizon and each schedule stops updating at its own T.

  Args:
    m0: [S, L] initial magnetisations.
    chain: the chain.
    schedules: K schedules from `make_schedule`.
  Returns:
    [K, S, L] magnetisations m^(T_k) at each schedule's horizon.
  """
  if not schedules:
    raise checks.InputError("schedules is empty; expected at least one Schedule.")
  for schedule in schedules:
    check_schedule(schedule, chain)
  shapes = {s.table.shape for s in schedules}
  if len(shapes) != 1:
    raise checks.InputError(f"schedules have different table shapes {sorted(shapes)}; batch schedules "
                     "of one kind (e.g. one name at several horizons).")
  params = chain.params()
  dtype = params.coupling.dtype
  m0 = _check_m0(m0, chain, dtype)
  tables = jnp.asarray(np.stack([s.table for s in schedules]), dtype)
  periods = jnp.asarray([s.period for s in schedules])
  stops = jnp.asarray([s.num_steps for s in schedules])
  return _scan_batch(m0, params, tables, periods, stops, max(s.num_steps for s in schedules))


@functools.partial(jax.jit, static_argnames=("max_steps",))
def _fixed_point(params, pi, max_steps):
  m0 = jnp.where(params.clamp_mask, params.clamp_values, 0.0)

  def cond(state):
    _, change, k = state
    return (change > 0) & (k < max_steps)

  def body(state):
    m, _, k = state
    new = mean_field_step(m, params, pi)
    return new, jnp.max(jnp.abs(new - m)), k + 1

  m, _, steps = lax.while_loop(cond, body, (m0, jnp.asarray(jnp.inf, m0.dtype), 0))
  u = params.coupling @ m
  response = blume_capel_response(u[:, None] + params.fields, params.delta[:, None]).mean(-1)
  residual = jnp.max(jnp.where(params.clamp_mask, 0.0, jnp.abs(response - m)))
  return m, residual, steps


def bayes_optimal_profile(chain: BlockChain, *, tol: float | None = None,
                          max_steps: int = 1_000_000) -> jax.Array:
  """The Bayes-optimal profile m* (Growing Images Section 4.2).

  The fixed point of the infinite-depth parallel recursion (Eq. 13 with
  pi_l = 1/|H|) started from m = 0 on the hidden blocks. Iterates until the
  iterate stops changing (or `max_steps`), then checks the fixed-point residual
  max_l |mu(sum_l' J_ll' m_l' + h_l) - m_l| <= tol.

  Args:
    chain: the chain.
    tol: residual tolerance; default 100 x the machine epsilon of the float dtype.
    max_steps: iteration cap.
  Returns:
    [L] m* (clamped entries hold the clamped values).
  Raises:
    RuntimeError: if the residual exceeds `tol` after `max_steps` steps.
  """
  max_steps = as_int(max_steps, "max_steps", 1)
  params = chain.params()
  dtype = params.coupling.dtype
  tol = 100 * float(jnp.finfo(dtype).eps) if tol is None else float(tol)
  pi = jnp.asarray(make_schedule("parallel", chain, 1).table[0], dtype)
  m, residual, steps = _fixed_point(params, pi, int(max_steps))
  if not float(residual) <= tol:
    raise RuntimeError(f"the parallel recursion did not converge to a fixed point: residual "
                       f"{float(residual):.3g} > tol {tol:.3g} after {int(steps)} steps "
                       f"(max_steps = {max_steps}).")
  return m


def initial_magnetisation(key, chain: BlockChain, num_seeds: int, scale: float = 0.1) -> jax.Array:
  """Initial magnetisations m^(0) ~ N(0, scale^2) on hidden blocks, clamped values elsewhere.

  The noise initialisation of Growing Images Section 4.3 (scale 0.1).

  Args:
    key: a `jax.random` key.
    chain: the chain.
    num_seeds: S >= 1.
    scale: standard deviation, >= 0.
  Returns:
    [S, L] initial magnetisations.
  """
  num_seeds = as_int(num_seeds, "num_seeds", 1)
  if not np.isfinite(scale) or scale < 0:
    raise checks.InputError(f"scale must be finite and >= 0; got {scale!r}.")
  dtype = jnp.asarray(0.0).dtype
  m0 = scale * jax.random.normal(key, (int(num_seeds), chain.num_blocks), dtype)
  return jnp.where(jnp.asarray(chain.clamp_mask), jnp.asarray(chain.clamp_values, dtype), m0)


def l2_bias(m, m_star):
  """||m - m*||_2 over the block axis: [..., L] x [L] -> [...] (Growing Images Fig. 4)."""
  return jnp.linalg.norm(jnp.asarray(m) - jnp.asarray(m_star), axis=-1)
