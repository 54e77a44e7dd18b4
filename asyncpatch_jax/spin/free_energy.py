"""Single-block free energy of the tilted posterior and its phase classes (Growing Images Fig. 3).

One Curie-Weiss Blume-Capel block (coupling J, crystal field Delta, field h)
under the posterior of Prop. 3.1 at signal-to-noise ratio gamma: crystal field
Delta + gamma^2/2 and site fields h + gamma xi + gamma^2 s0 (Eq. 4-5). Its
mean-field free energy per spin, in the Landau (Hubbard-Stratonovich) form,

    f(m) = J m^2 / 2 - E_{s0, xi} log sum_{x in {-1,0,1}} exp[(J m + h + gamma xi + gamma^2 s0) x
                                                                - (Delta + gamma^2/2) x^2],

has f'(m) = J (m - E[mu_{Delta + gamma^2/2}(J m + h~)]): its stationary points are
the self-consistent magnetisations and its minima the locally stable phases
(the values at stationary points equal the mean-field free energies of those
phases). Conventions (the paper leaves them implicit):
  * xi ~ N(0, 1) is averaged by Gauss-Hermite quadrature;
  * the planted spin s0 is drawn from the clean prior's mean-field single-site
    marginal p0(x) ~ exp((J m0 + h) x - Delta x^2), with m0 the prior's
    equilibrium magnetisation (the global minimiser of f at gamma = 0; at an
    exact tie, e.g. h = 0 in the ordered phase, the larger m0, i.e. the +
    state, as the planted state of the chain experiment is +1).

Classes (Fig. 3; minima ordered by m, "lowest" = lowest f):
  1 one minimum; 2 two minima, lower-m lowest; 3 two minima, higher-m lowest;
  4 three minima, central lowest; 5 three minima, high-m lowest;
  6 three minima, low-m lowest (not among the paper's five); 0 more than three.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.spin.model import log_partition_and_mean

PHASE_CLASSES = {
    0: "more than three minima",
    1: "one minimum",
    2: "two minima, lower-m lowest",
    3: "two minima, higher-m lowest",
    4: "three minima, central lowest",
    5: "three minima, high-m lowest",
    6: "three minima, low-m lowest",
}
_MAX_MINIMA = 4


class Minima(NamedTuple):
  """Minima of f(m). positions/values: [4] sorted by m, NaN-padded; num_minima, phase_class: []."""
  num_minima: jax.Array
  phase_class: jax.Array
  positions: jax.Array
  values: jax.Array


def _quadrature(num_quadrature: int, dtype):
  nodes, weights = np.polynomial.hermite_e.hermegauss(num_quadrature)
  return jnp.asarray(nodes, dtype), jnp.asarray(weights / weights.sum(), dtype)


def _landscape(m, j, h, delta, gamma, p0, nodes, weights):
  """f(m) and g(m) = f'(m) / J at magnetisations m [M]; returns ([M], [M])."""
  spins = jnp.array([-1.0, 0.0, 1.0], m.dtype)
  u = (j * m[:, None, None] + h + gamma * nodes[None, :, None]
       + gamma ** 2 * spins[None, None, :])                              # [M, Q, 3]
  log_z, mean = log_partition_and_mean(u, delta + 0.5 * gamma ** 2)
  avg = lambda a: jnp.einsum("mqx,q,x->m", a, weights, p0)
  return 0.5 * j * m ** 2 - avg(log_z), m - avg(mean)


def _minima(m, landscape, newton_steps=4):
  """Minima of f: the - to + sign changes of g = f'/J on the grid m [M].

  Each root is located by linear interpolation in its grid cell, then polished
  by Newton steps on g (kept only while they stay inside the cell); f is
  evaluated at the polished roots. Returns (count, positions [4], values [4]).
  """
  _, g = landscape(m)
  up = (g[:-1] <= 0) & (g[1:] > 0)                                       # [M - 1]
  count = up.sum()
  (idx,) = jnp.nonzero(up, size=_MAX_MINIMA, fill_value=0)
  lo, hi = m[idx], m[idx + 1]
  pos = lo + g[idx] / (g[idx] - g[idx + 1]) * (hi - lo)
  g_at = lambda x: landscape(x)[1]
  for _ in range(newton_steps):
    value, slope = jax.jvp(g_at, (pos,), (jnp.ones_like(pos),))
    new = pos - value / slope
    pos = jnp.where((new >= lo) & (new <= hi) & (slope > 0), new, pos)
  val = landscape(pos)[0]
  valid = jnp.arange(_MAX_MINIMA) < count
  return count, jnp.where(valid, pos, jnp.nan), jnp.where(valid, val, jnp.nan)


def _classify(count, values):
  lowest = jnp.argmin(jnp.where(jnp.isnan(values), jnp.inf, values))
  two = jnp.where(lowest == 0, 2, 3)
  three = jnp.array([6, 4, 5])[jnp.minimum(lowest, 2)]
  return jnp.select([count == 1, count == 2, count == 3], [1, two, three], 0)


def _prior_marginal(m, j, h, delta):
  """(p0 [3], m0) of the clean prior at (J, h, Delta) on the grid m."""
  zero = jnp.zeros((1,), m.dtype)
  one = jnp.ones((1,), m.dtype)
  p_zero = jnp.array([0.0, 1.0, 0.0], m.dtype)     # gamma = 0: s0 plays no role
  _, pos, val = _minima(m, lambda x: _landscape(x, j, h, delta, 0.0, p_zero, zero, one))
  # Global minimum; a tie (within rounding) goes to the larger m (the + state).
  val = jnp.where(jnp.isnan(val), jnp.inf, val)
  tol = 1e3 * jnp.finfo(m.dtype).eps * (1.0 + jnp.abs(val.min()))
  m0 = jnp.max(jnp.where(val <= val.min() + tol, pos, -jnp.inf))
  spins = jnp.array([-1.0, 0.0, 1.0], m.dtype)
  return jax.nn.softmax((j * m0 + h) * spins - delta * spins ** 2), m0


def _analyse(j, h, delta, gamma, m, nodes, weights):
  p0, _ = _prior_marginal(m, j, h, delta)
  count, pos, val = _minima(m, lambda x: _landscape(x, j, h, delta, gamma, p0, nodes, weights))
  return Minima(count, _classify(count, val), pos, val)


@functools.partial(jax.jit, static_argnames=("num_m", "num_quadrature"))
def _analyse_point(j, h, delta, gamma, num_m, num_quadrature):
  m = jnp.linspace(-1.0, 1.0, num_m)
  nodes, weights = _quadrature(num_quadrature, m.dtype)
  return _analyse(j, h, delta, gamma, m, nodes, weights)


@functools.partial(jax.jit, static_argnames=("num_m", "num_quadrature"))
def _diagram(j, hs, deltas, gammas, num_m, num_quadrature):
  m = jnp.linspace(-1.0, 1.0, num_m)
  nodes, weights = _quadrature(num_quadrature, m.dtype)
  over_h = jax.vmap(lambda h, d, g: _analyse(j, h, d, g, m, nodes, weights).phase_class,
                    in_axes=(0, None, None))
  pairs = jnp.stack(jnp.meshgrid(gammas, deltas, indexing="ij"), -1).reshape(-1, 2)
  # One (gamma, Delta) row at a time keeps the [H, M, Q, 3] intermediates small.
  classes = jax.lax.map(lambda gd: over_h(hs, gd[1], gd[0]), pairs)
  return classes.reshape(gammas.shape[0], deltas.shape[0], hs.shape[0])


def _check(j, gamma, num_m, num_quadrature):
  if not np.isfinite(j) or j <= 0:
    raise checks.InputError(f"j must be a finite coupling > 0 (f(m) = J m^2/2 - ...); got {j!r}.")
  gammas = np.atleast_1d(np.asarray(gamma, dtype=np.float64))
  if not np.all(np.isfinite(gammas)) or np.any(gammas < 0):
    raise checks.InputError(f"gamma must be finite and >= 0; got {np.asarray(gamma).tolist()!r}.")
  for name, value, low in (("num_m", num_m, 3), ("num_quadrature", num_quadrature, 1)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
      raise checks.InputError(f"{name} must be an integer >= {low}; got {value!r}.")


def prior_marginal(*, j: float, h: float, delta: float, num_m: int = 2001):
  """Mean-field single-site marginal of the clean single-block prior (planted-spin law of Fig. 3).

  Returns:
    (p0 [3] probabilities of s0 = -1, 0, +1; m0 [] the prior's equilibrium magnetisation).
  """
  _check(j, 0.0, num_m, 1)
  m = jnp.linspace(-1.0, 1.0, num_m)
  return jax.jit(_prior_marginal)(m, j, h, delta)


def single_block_free_energy(m, *, j: float, h: float, delta: float, gamma: float,
                             num_quadrature: int = 32, num_m_prior: int = 2001):
  """Mean-field free energy f(m) of one block under the tilted posterior (App. B, Fig. 3).

  f(m) = J m^2/2 - E_{s0 ~ p0, xi ~ N(0,1)} log sum_x exp[(J m + h + gamma xi + gamma^2 s0) x
                                                         - (Delta + gamma^2/2) x^2].

  Args:
    m: [M] magnetisations in [-1, 1].
    j: block coupling J > 0; h: field; delta: crystal field; gamma: SNR >= 0.
    num_quadrature: Gauss-Hermite nodes for the xi average.
    num_m_prior: grid size used to locate the prior magnetisation m0 of p0.
  Returns:
    [M] f(m).
  """
  _check(j, gamma, num_m_prior, num_quadrature)
  m = jnp.atleast_1d(jnp.asarray(m))
  p0, _ = prior_marginal(j=j, h=h, delta=delta, num_m=num_m_prior)
  nodes, weights = _quadrature(num_quadrature, m.dtype)
  return _landscape(m, j, h, delta, gamma, p0, nodes, weights)[0]


def free_energy_minima(*, j: float, h: float, delta: float, gamma: float, num_m: int = 801,
                       num_quadrature: int = 32) -> Minima:
  """Locally stable phases of the single-block posterior and their Fig. 3 class.

  Minima are the - to + sign changes of f'(m) on a grid of `num_m` points in
  [-1, 1] (linearly interpolated); a basin narrower than the grid spacing is missed.

  Returns:
    `Minima(num_minima, phase_class, positions [4], values [4])` (see PHASE_CLASSES).
  """
  _check(j, gamma, num_m, num_quadrature)
  return _analyse_point(j, h, delta, gamma, int(num_m), int(num_quadrature))


def phase_diagram(*, j: float, hs, deltas, gammas, num_m: int = 401,
                  num_quadrature: int = 24) -> jax.Array:
  """Fig. 3: the class of the single-block posterior over an (h, Delta) grid for several gamma.

  Args:
    j: block coupling J > 0.
    hs: [H] fields; deltas: [D] crystal fields; gammas: [G] SNRs >= 0.
    num_m: grid size in m; num_quadrature: Gauss-Hermite nodes.
  Returns:
    [G, D, H] integer classes (keys of PHASE_CLASSES).
  """
  _check(j, gammas, num_m, num_quadrature)
  hs, deltas, gammas = (jnp.atleast_1d(jnp.asarray(a, jnp.asarray(0.0).dtype))
                        for a in (hs, deltas, gammas))
  for name, arr in (("hs", hs), ("deltas", deltas)):
    if arr.ndim != 1 or not bool(jnp.all(jnp.isfinite(arr))):
      raise checks.InputError(f"{name} must be a finite 1-D grid; got shape {arr.shape}.")
  return _diagram(j, hs, deltas, gammas, int(num_m), int(num_quadrature))
