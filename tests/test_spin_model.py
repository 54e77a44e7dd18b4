"""Block Blume-Capel chain: mu_Delta (Eq. 12) and the energy (Eq. 2) vs independent references."""

import itertools

import jax
import numpy as np
import pytest
from scipy.special import softmax

from asyncpatch_jax import spin

SPINS = np.array([-1.0, 0.0, 1.0])


def brute_energy(config, num_blocks, j_intra, j_inter, delta, fields):
  """Eq. 2 by an explicit loop over unordered pairs of distinct spins (float64)."""
  n = config.size // num_blocks
  s = config.reshape(num_blocks, n)
  delta = np.broadcast_to(np.asarray(delta, float), (num_blocks,))
  fields = np.broadcast_to(np.asarray(fields, float).reshape(num_blocks, -1), (num_blocks, n))
  sites = [(l, i) for l in range(num_blocks) for i in range(n)]
  pair = 0.0
  for a, b in itertools.combinations(sites, 2):
    gap = abs(a[0] - b[0])
    coupling = j_intra if gap == 0 else (j_inter if gap == 1 else 0.0)
    pair += coupling * s[a] * s[b]
  return -pair / n + np.sum(delta[:, None] * s ** 2) - np.sum(fields * s)


def test_response_matches_closed_form_and_exact_conditional_mean():
  u = np.linspace(-6.0, 6.0, 41)
  with jax.enable_x64(True):
    for delta in (-1.0, 0.0, 0.5, 3.0):
      closed = 2 * np.sinh(u) / (np.exp(delta) + 2 * np.cosh(u))
      # Exact conditional mean of one spin with weights exp(u s - Delta s^2).
      probs = softmax(u[:, None] * SPINS - delta * SPINS ** 2, axis=1)
      exact = probs @ SPINS
      got = np.asarray(spin.blume_capel_response(u, delta))
      np.testing.assert_allclose(got, closed, rtol=1e-13, atol=1e-15)
      np.testing.assert_allclose(got, exact, rtol=1e-13, atol=1e-15)
      log_z, _ = spin.log_partition_and_mean(u, delta)
      np.testing.assert_allclose(np.asarray(log_z), np.log(1 + 2 * np.exp(-delta) * np.cosh(u)),
                                 rtol=1e-13)
  # float32 and extreme arguments: no overflow, the right limits.
  big = np.asarray(spin.blume_capel_response(np.array([-300.0, 300.0, 1.0, 1.0]),
                                             np.array([0.5, 0.5, 200.0, -200.0])))
  np.testing.assert_allclose(big, [-1.0, 1.0, 0.0, np.tanh(1.0)], rtol=1e-6, atol=1e-30)


def test_response_slope_at_zero():
  # mu_Delta'(0) = 2 / (e^Delta + 2): the linear stability of the no-signal state.
  with jax.enable_x64(True):
    slope = jax.grad(lambda u: spin.blume_capel_response(u, 0.5))(0.0)
    np.testing.assert_allclose(float(slope), 2 / (np.exp(0.5) + 2), rtol=1e-12)


def test_energy_matches_pair_enumeration():
  rng = np.random.default_rng(0)
  num_blocks, n = 3, 3
  delta = rng.normal(size=num_blocks)
  fields = rng.normal(size=(num_blocks, n))
  chain = spin.BlockChain(num_blocks, n, j_intra=1.3, j_inter=-0.7, delta=delta, fields=fields)
  configs = rng.choice(SPINS, size=(50, num_blocks, n))
  with jax.enable_x64(True):
    got = np.asarray(spin.energy(configs, chain))
  want = [brute_energy(c, num_blocks, 1.3, -0.7, delta, fields) for c in configs]
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_coupling_matrix_and_clamps():
  chain = spin.BlockChain(4, 2, j_intra=1.0, j_inter=0.6, clamped={0: 1.0, 3: -1.0})
  np.testing.assert_array_equal(chain.coupling_matrix(), [[1, .6, 0, 0], [.6, 1, .6, 0],
                                                          [0, .6, 1, .6], [0, 0, .6, 1]])
  assert chain.hidden == (1, 2)
  np.testing.assert_array_equal(chain.clamp_values, [1, 0, 0, -1])


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_blocks=0), "num_blocks"),
    (dict(num_blocks=3, block_size=0), "block_size"),
    (dict(num_blocks=3, block_size=-2), "block_size"),
    (dict(num_blocks=3, clamped={3: 1.0}), "out of range"),
    (dict(num_blocks=3, clamped={-1: 1.0}), "out of range"),
    (dict(num_blocks=3, clamped={0: 1.5}), r"\[-1, 1\]"),
    (dict(num_blocks=2, clamped={0: 1.0, 1: 1.0}), "hidden block"),
    (dict(num_blocks=3, delta=[0.5, 0.5]), "delta"),
    (dict(num_blocks=3, block_size=2, fields=np.zeros((3, 3))), "fields"),
])
def test_bad_chain_raises(kwargs, message):
  with pytest.raises(ValueError, match=message):
    spin.BlockChain(**kwargs)


def test_energy_rejects_wrong_shape():
  chain = spin.BlockChain(3, 2)
  with pytest.raises(ValueError, match="spins has shape"):
    spin.energy(np.zeros((2, 2)), chain)
