"""Prop. 3.1: the tilted posterior equals Bayes' rule, by enumerating every configuration."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp

from asyncpatch_jax import spin

SPINS = (-1.0, 0.0, 1.0)


def brute_prior_log_weight(s, j_intra, j_inter, delta, fields):
  """-E(s) of Eq. 2 for s [L, N] by explicit pair loops (float64)."""
  num_blocks, n = s.shape
  total = 0.0
  for l in range(num_blocks):
    for i in range(n):
      for l2 in range(num_blocks):
        for i2 in range(n):
          if (l2, i2) <= (l, i):
            continue
          coupling = j_intra if l2 == l else (j_inter if abs(l2 - l) == 1 else 0.0)
          total += coupling * s[l, i] * s[l2, i2] / n
      total += -delta[l] * s[l, i] ** 2 + fields[l] * s[l, i]
  return total


@pytest.mark.parametrize("num_blocks, n", [(2, 2), (3, 2)])
def test_tilted_posterior_equals_bayes_rule(num_blocks, n):
  rng = np.random.default_rng(num_blocks)
  j_intra, j_inter = 1.0, 0.6
  delta = rng.uniform(0.0, 1.0, num_blocks)
  fields = rng.normal(0.0, 0.5, num_blocks)
  alpha = rng.uniform(0.2, 1.5, num_blocks)       # per-block interpolant, Eq. 3
  sigma = rng.uniform(0.5, 1.5, num_blocks)
  clean = rng.choice(SPINS, size=(num_blocks, n))
  noise = rng.normal(size=(num_blocks, n))
  y = alpha[:, None] * clean + sigma[:, None] * noise

  configs = np.array(list(itertools.product(SPINS, repeat=num_blocks * n)))
  configs = configs.reshape(-1, num_blocks, n)
  # Bayes' rule: prior times the Gaussian likelihood of y given s0 = s, then normalise.
  log_prior = np.array([brute_prior_log_weight(s, j_intra, j_inter, delta, fields)
                        for s in configs])
  log_lik = -0.5 * (((y - alpha[:, None] * configs) / sigma[:, None]) ** 2).sum((1, 2))
  bayes = log_prior + log_lik
  bayes = np.exp(bayes - logsumexp(bayes))

  chain = spin.BlockChain(num_blocks, n, j_intra, j_inter, delta=delta, fields=fields)
  tilted = spin.tilted_posterior(chain, alpha / sigma, clean, noise)
  with jax.enable_x64(True):
    log_w = -np.asarray(spin.energy(configs, tilted))               # exponent of Eq. 6
    # The jittable Eq. 4-5 gives the same fields as the host-side constructor.
    d_eff, h_eff = jax.jit(spin.effective_fields)(
        jnp.asarray(alpha / sigma), jnp.asarray(clean), jnp.asarray(noise), jnp.asarray(delta),
        jnp.asarray(fields))
  formula = np.exp(log_w - logsumexp(log_w))
  np.testing.assert_allclose(formula, bayes, rtol=1e-10, atol=1e-14)
  np.testing.assert_allclose(np.asarray(d_eff), tilted.delta, rtol=1e-14)
  np.testing.assert_allclose(np.asarray(h_eff), tilted.fields, rtol=1e-14)
  # Eq. 4-5 term by term.
  gamma = alpha / sigma
  np.testing.assert_allclose(tilted.delta, delta + gamma ** 2 / 2, rtol=1e-14)
  np.testing.assert_allclose(tilted.fields, fields[:, None] + gamma[:, None] * noise
                             + gamma[:, None] ** 2 * clean, rtol=1e-14)


def test_zero_snr_posterior_is_the_prior():
  chain = spin.BlockChain(2, 3, delta=0.4, fields=0.2)
  rng = np.random.default_rng(1)
  tilted = spin.tilted_posterior(chain, np.zeros(2), rng.choice(SPINS, (2, 3)),
                                 rng.normal(size=(2, 3)))
  np.testing.assert_array_equal(tilted.delta, chain.delta)
  np.testing.assert_array_equal(tilted.fields, np.full((2, 3), 0.2))


@pytest.mark.parametrize("gamma, clean, noise, message", [
    (np.ones(3), np.ones((2, 2)), np.zeros((2, 2)), "gamma has shape"),
    (-np.ones(2), np.ones((2, 2)), np.zeros((2, 2)), "gamma"),
    (np.ones(2), np.full((2, 2), 0.5), np.zeros((2, 2)), "clean"),
    (np.ones(2), np.ones((2, 2)), np.zeros((2, 3)), "noise"),
])
def test_bad_posterior_inputs(gamma, clean, noise, message):
  with pytest.raises(ValueError, match=message):
    spin.tilted_posterior(spin.BlockChain(2, 2), gamma, clean, noise)
