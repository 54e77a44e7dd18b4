"""Single-block free energy f(m) (App. B) and its minima classes (Fig. 3) on known cases."""

import jax
import numpy as np
import pytest
from scipy import integrate
from scipy.optimize import brentq

from asyncpatch_jax import spin


def np_mu(u, delta):
  return 2 * np.sinh(u) / (np.exp(delta) + 2 * np.cosh(u))


def np_f0(m, j, h, delta):
  """gamma = 0: f(m) = J m^2/2 - log(1 + 2 e^-Delta cosh(J m + h))."""
  return 0.5 * j * m ** 2 - np.log1p(2 * np.exp(-delta) * np.cosh(j * m + h))


def np_roots(fun, lo=-1.0, hi=1.0, num=20001):
  """All sign changes of fun on [lo, hi], refined by brentq (plus exact zeros on the grid)."""
  x = np.linspace(lo, hi, num)
  v = fun(x)
  roots = [x[k] for k in np.flatnonzero(v == 0)]
  for k in np.flatnonzero(v[:-1] * v[1:] < 0):
    roots.append(brentq(fun, x[k], x[k + 1], xtol=1e-15))
  return np.sort(roots)


def np_minima0(j, h, delta):
  """Stable stationary points of the gamma = 0 free energy (f'' > 0), and f there."""
  g = lambda m: m - np_mu(j * m + h, delta)
  roots = np_roots(g)
  slope = lambda m: 1 - j * (np_mu(j * m + h + 1e-6, delta) - np_mu(j * m + h - 1e-6, delta)) / 2e-6
  minima = np.array([r for r in roots if slope(r) > 0])
  return minima, np_f0(minima, j, h, delta)


def test_paramagnet_has_one_minimum():
  # J mu'(0) = 2 J / (e^Delta + 2) < 1 and mu concave on u > 0: m = 0 is the only solution.
  with jax.enable_x64(True):
    m = spin.free_energy_minima(j=1.0, h=0.0, delta=0.5, gamma=0.0)
  assert int(m.num_minima) == 1 and int(m.phase_class) == 1
  assert abs(float(m.positions[0])) < 1e-6


def test_ising_limit_minima_and_spinodal():
  """Delta -> -inf: Curie-Weiss Ising, spinodal h_s = J m_s - atanh(m_s) with m_s^2 = 1 - 1/J."""
  j = 2.0
  m_s = np.sqrt(1 - 1 / j)
  h_s = j * m_s - np.arctanh(m_s)
  m_ising = brentq(lambda m: m - np.tanh(j * m), 0.1, 1.0)
  with jax.enable_x64(True):
    zero = spin.free_energy_minima(j=j, h=0.0, delta=-30.0, gamma=0.0)
    assert int(zero.num_minima) == 2
    np.testing.assert_allclose(np.asarray(zero.positions[:2]), [-m_ising, m_ising], atol=1e-9)
    for h, expected in ((0.8 * h_s, 3), (-0.8 * h_s, 2), (1.2 * h_s, 1), (-1.2 * h_s, 1),
                        (0.2, 3), (-0.2, 2)):
      got = spin.free_energy_minima(j=j, h=h, delta=-30.0, gamma=0.0)
      assert int(got.phase_class) == expected, (h, got)
    # The vectorised diagram agrees along the h axis.
    hs = np.array([-1.5, -0.9, -0.5, -0.1, 0.1, 0.5, 0.9, 1.5]) * h_s
    classes = np.asarray(spin.phase_diagram(j=j, hs=hs, deltas=[-30.0], gammas=[0.0]))[0, 0]
  np.testing.assert_array_equal(classes, [1, 2, 2, 2, 3, 3, 3, 1])


@pytest.mark.parametrize("h, delta, expected", [
    (0.0, 1.95, 4),    # three minima (0 and +-0.664), the no-signal state lowest
    (0.01, 1.9, 5),    # three minima, the + state lowest
    (-0.01, 1.9, 6),   # three minima, the - state lowest
])
def test_first_order_region_has_three_minima(h, delta, expected):
  """J = 4 > 3 (first-order regime): 2 J < e^Delta + 2 keeps m = 0 stable beside ordered minima."""
  j = 4.0
  assert 2 * j < np.exp(delta) + 2
  minima, values = np_minima0(j, h, delta)
  assert len(minima) == 3
  assert {1: 6, 2: 4, 3: 5}[int(np.argmin(values)) + 1] == expected     # reference class
  with jax.enable_x64(True):
    got = spin.free_energy_minima(j=j, h=h, delta=delta, gamma=0.0)
  assert int(got.num_minima) == 3 and int(got.phase_class) == expected
  np.testing.assert_allclose(np.asarray(got.positions[:3]), minima, atol=1e-9)
  np.testing.assert_allclose(np.asarray(got.values[:3]), values, atol=1e-12)


def test_tilted_free_energy_matches_quadrature():
  """f(m) at gamma > 0 against scipy quad over xi, with p0 from an independent root solve."""
  j, h, delta, gamma = 6.0, 0.3, 3.0, 0.5
  minima, values = np_minima0(j, h, delta)
  m0 = minima[np.argmin(values)]
  p0 = np.exp((j * m0 + h) * np.array([-1, 0, 1]) - delta * np.array([1, 0, 1]))
  p0 /= p0.sum()

  def reference(m):
    total = 0.0
    for x, p in zip((-1, 0, 1), p0):
      integrand = lambda xi: (np.log1p(2 * np.exp(-delta - gamma ** 2 / 2)
                                       * np.cosh(j * m + h + gamma * xi + gamma ** 2 * x))
                              * np.exp(-xi ** 2 / 2) / np.sqrt(2 * np.pi))
      total += p * integrate.quad(integrand, -12, 12, epsabs=1e-13, epsrel=1e-13)[0]
    return 0.5 * j * m ** 2 - total

  ms = np.array([-0.8, -0.3, 0.0, 0.4, 0.9])
  with jax.enable_x64(True):
    got = np.asarray(spin.single_block_free_energy(ms, j=j, h=h, delta=delta, gamma=gamma))
    p0_got, m0_got = spin.prior_marginal(j=j, h=h, delta=delta)
  np.testing.assert_allclose(np.asarray(p0_got), p0, atol=1e-12)
  assert abs(float(m0_got) - m0) < 1e-12
  np.testing.assert_allclose(got, [reference(m) for m in ms], rtol=1e-10, atol=1e-12)


def test_high_snr_posterior_concentrates_on_the_planted_magnetisation():
  """gamma -> inf: one minimum, at E[s0] = m0 (the prior's magnetisation, Prop. 3.1 discussion)."""
  with jax.enable_x64(True):
    for h, delta in ((0.3, 3.0), (-0.5, 1.0), (0.0, 4.0)):
      _, m0 = spin.prior_marginal(j=6.0, h=h, delta=delta)
      got = spin.free_energy_minima(j=6.0, h=h, delta=delta, gamma=12.0)
      assert int(got.num_minima) == 1
      assert abs(float(got.positions[0]) - float(m0)) < 2e-3, (h, delta, got, m0)


@pytest.mark.parametrize("kwargs, message", [
    (dict(j=0.0, h=0.0, delta=0.5, gamma=0.0), "j must be"),
    (dict(j=1.0, h=0.0, delta=0.5, gamma=-1.0), "gamma"),
    (dict(j=1.0, h=0.0, delta=0.5, gamma=0.0, num_m=2), "num_m"),
])
def test_bad_free_energy_inputs(kwargs, message):
  with pytest.raises(ValueError, match=message):
    spin.free_energy_minima(**kwargs)
