"""Finite-N scheduled block heat-bath (Glauber) chain (Growing Images Section 4.2, Prop. 4.1-4.2).

At every step t: (a) draw a block l ~ pi^(t); (b) draw a site i ~ Unif{0..N-1};
(c) resample s_l,i from its Gibbs conditional under Eq. 1-2,

    P(s_l,i = x | rest) proportional to exp(u_l,i x - Delta_l x^2),
    u_l,i = (1/N) [ sum_l' J_ll' sum_j s_l',j - J_ll s_l,i ] + h_l,i,

the unique invariant single-site update (Prop. 4.1(i)). Its block magnetisations
drift as in Prop. 4.2, and approach the mean-field recursion of Eq. 13 as N grows.

Chains are vmapped; time is one `lax.scan` in one `jax.jit`. Randomness: one key,
split into one key per chain, `fold_in(chain_key, t)` at step t.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.spin.model import BlockChain, ChainParams, as_int
from asyncpatch_jax.spin.schedules import (Schedule, check_distribution, check_record_every,
                                           check_schedule, schedule_weights)


class HeatBathResult(NamedTuple):
  """times: [R + 1] host integers; magnetisation: [R + 1, C, L]; spins: [C, L, N] final spins."""
  times: np.ndarray
  magnetisation: jax.Array
  spins: jax.Array


def _conditional(spins, sums, block, site, params: ChainParams):
  """Probabilities of s_block,site in (-1, 0, +1) given the rest: [3]."""
  n = spins.shape[-1]
  own = spins[block, site]
  field = (params.coupling[block] @ sums - params.coupling[block, block] * own) / n
  fields = jnp.broadcast_to(params.fields, spins.shape)
  u = field + fields[block, site]
  logits = jnp.stack([-u, 0.0 * u, u]) - params.delta[block] * jnp.array([1.0, 0.0, 1.0], u.dtype)
  return jax.nn.softmax(logits)


def _step(key, spins, sums, pi, params: ChainParams):
  """One scheduled heat-bath step on one chain: spins [L, N], sums [L] -> (spins, sums)."""
  num_blocks, n = spins.shape
  draws = jax.random.uniform(key, (3,), spins.dtype)
  cumulative = jnp.cumsum(pi)
  total = cumulative[-1]
  block = jnp.minimum(jnp.sum(cumulative <= draws[0] * total), num_blocks - 1)
  site = jnp.minimum((draws[1] * n).astype(jnp.int32), n - 1)
  probs = _conditional(spins, sums, block, site, params)
  value = jnp.minimum(jnp.sum(jnp.cumsum(probs) <= draws[2]), 2).astype(spins.dtype) - 1.0
  value = jnp.where(total > 0, value, spins[block, site])  # an all-zero pi updates nothing
  sums = sums.at[block].add(value - spins[block, site])
  return spins.at[block, site].set(value), sums


def _check_spins(spins, chain: BlockChain, name: str, leading: tuple[int, ...] | None = ()):
  """Spins [*leading, L, N] with values in {-1, 0, +1}; leading=None accepts any batch shape."""
  arr = np.asarray(spins, dtype=np.float64)
  block = (chain.num_blocks, chain.block_size)
  lead = arr.shape[:-2] if leading is None else leading
  expected = tuple(lead) + block
  if arr.shape != expected or not np.all(np.isin(arr, (-1.0, 0.0, 1.0))):
    where = "[..., L, N]" if leading is None else str(list(expected))
    raise checks.InputError(f"{name} has shape {arr.shape}; expected spins {where} with [L, N] = "
                     f"{list(block)} and values in {{-1, 0, +1}}.")
  return arr


def _check_clamps(chain: BlockChain) -> None:
  bad = {l: v for l, v in chain.clamped.items() if v not in (-1.0, 0.0, 1.0)}
  if bad:
    raise checks.InputError(f"clamped values {bad} are not spins; the heat-bath chain clamps whole "
                     "blocks to -1, 0 or +1.")


@jax.jit
def _conditional_batch(spins, block, site, params):
  flat = spins.reshape((-1,) + spins.shape[-2:])
  probs = jax.vmap(lambda s: _conditional(s, s.sum(-1), block, site, params))(flat)
  return probs.reshape(spins.shape[:-2] + (3,))


def site_conditional(spins, block: int, site: int, chain: BlockChain) -> jax.Array:
  """The Gibbs conditional of one spin, P(s_block,site = x | rest), x = -1, 0, +1 (Prop. 4.1(i)).

  The update the heat-bath chain uses: weights exp(u x - Delta_block x^2) with the
  exact finite-N local field u of the module docstring.

  Args:
    spins: [..., L, N] configurations with values in {-1, 0, +1}.
    block, site: the spin to update (0-based).
    chain: the chain (its per-block Delta and per-site fields are used).
  Returns:
    [..., 3] probabilities of -1, 0, +1.
  """
  arr = _check_spins(spins, chain, "spins", leading=None)
  as_int(block, "block", 0)
  as_int(site, "site", 0)
  if not (block < chain.num_blocks and site < chain.block_size):
    raise checks.InputError(f"(block, site) = ({block}, {site}) is out of range for L = "
                     f"{chain.num_blocks}, N = {chain.block_size}.")
  params = chain.params()
  return _conditional_batch(jnp.asarray(arr, params.coupling.dtype), block, site, params)


def heat_bath_step(key, spins, pi, chain: BlockChain) -> jax.Array:
  """One scheduled heat-bath step (Section 4.2 (a)-(c)) on one configuration.

  Args:
    key: a `jax.random` key.
    spins: [L, N] configuration, values in {-1, 0, +1}.
    pi: [L] schedule weights, a probability vector over the hidden blocks.
    chain: the chain.
  Returns:
    [L, N] the configuration after the step (at most one spin changed).
  """
  arr = _check_spins(spins, chain, "spins")
  pi = np.asarray(pi, dtype=np.float64)
  if pi.shape != (chain.num_blocks,):
    raise checks.InputError(f"pi has shape {pi.shape}; expected [L] = [{chain.num_blocks}].")
  check_distribution(pi, chain, "pi")
  params = chain.params()
  dtype = params.coupling.dtype
  spins = jnp.asarray(arr, dtype)
  return _step(key, spins, spins.sum(-1), jnp.asarray(pi, dtype), params)[0]


@functools.partial(jax.jit, static_argnames=("num_steps", "record_every"))
def _run(chain_keys, spins0, params, table, period, num_steps, record_every):
  n = spins0.shape[-1]

  def one_chain(key, spins):
    def step(carry, t):
      spins, sums = carry
      pi = schedule_weights(table, period, t)
      return _step(jax.random.fold_in(key, t), spins, sums, pi, params), None

    def chunk(carry, start):
      carry, _ = lax.scan(step, carry, start + jnp.arange(record_every))
      return carry, carry[1] / n

    starts = jnp.arange(num_steps // record_every) * record_every
    (spins, _), traj = lax.scan(chunk, (spins, spins.sum(-1)), starts)
    return traj, spins

  return jax.vmap(one_chain)(chain_keys, spins0)


def run_heat_bath(key, chain: BlockChain, schedule: Schedule, num_chains: int, *,
                  initial_spins=None, record_every: int | None = None) -> HeatBathResult:
  """Runs `num_chains` independent scheduled heat-bath chains for T = schedule.num_steps steps.

  Args:
    key: root `jax.random` key (split into one key per chain).
    chain: the chain; clamped values must be -1, 0 or +1.
    schedule: from `make_schedule` (the same schedules as the mean-field recursion).
    num_chains: C >= 1.
    initial_spins: [L, N] or [C, L, N] spins in {-1, 0, +1}; default all 0 (the
      noise state m = 0). Clamped blocks are set to their clamped values.
    record_every: record block magnetisations every this many steps (divides T);
      default T.
  Returns:
    `HeatBathResult(times [R + 1], magnetisation [R + 1, C, L], spins [C, L, N])`.
  """
  check_schedule(schedule, chain)
  _check_clamps(chain)
  num_chains = as_int(num_chains, "num_chains", 1)
  num_steps = schedule.num_steps
  record_every = check_record_every(record_every, num_steps)
  shape = (chain.num_blocks, chain.block_size)
  if initial_spins is None:
    spins0 = np.zeros((num_chains,) + shape)
  elif np.ndim(initial_spins) == 2:
    spins0 = np.broadcast_to(_check_spins(initial_spins, chain, "initial_spins"),
                             (num_chains,) + shape).copy()
  else:
    spins0 = _check_spins(initial_spins, chain, "initial_spins", (num_chains,)).copy()
  spins0[:, chain.clamp_mask] = chain.clamp_values[chain.clamp_mask][None, :, None]

  params = chain.params()
  dtype = params.coupling.dtype
  spins0 = jnp.asarray(spins0, dtype)
  chain_keys = jax.random.split(key, num_chains)
  traj, spins = _run(chain_keys, spins0, params, jnp.asarray(schedule.table, dtype),
                     schedule.period, num_steps, int(record_every))
  m0 = spins0.mean(-1)
  magnetisation = jnp.concatenate([m0[None], jnp.swapaxes(traj, 0, 1)], 0)
  return HeatBathResult(np.arange(0, num_steps + 1, record_every), magnetisation, spins)
