"""Finite-N heat-bath chain: exact Gibbs conditional (Prop. 4.1(i)), mean-field limit (Eq. 13)."""

import itertools

import jax
import numpy as np
import pytest
from scipy.special import logsumexp

from asyncpatch_jax import spin

SPINS = np.array([-1.0, 0.0, 1.0])


def brute_log_weight(s, j_intra, j_inter, delta, fields):
  """-E(s) (Eq. 2, per-block delta [L], per-site fields [L, N]) by explicit pair loops."""
  num_blocks, n = s.shape
  sites = [(l, i) for l in range(num_blocks) for i in range(n)]
  pair = 0.0
  for a, b in itertools.combinations(sites, 2):
    gap = abs(a[0] - b[0])
    pair += (j_intra if gap == 0 else (j_inter if gap == 1 else 0.0)) * s[a] * s[b]
  return pair / n - np.sum(delta[:, None] * s ** 2) + np.sum(fields * s)


def tilted_test_chain(clamped=None):
  """A 3 x 2 chain with per-block Delta and per-site fields (a tilted posterior, Prop. 3.1)."""
  rng = np.random.default_rng(0)
  prior = spin.BlockChain(3, 2, j_intra=1.2, j_inter=0.7, delta=0.3, fields=0.1,
                          clamped=clamped or {})
  return spin.tilted_posterior(prior, np.array([0.4, 0.8, 0.6]), rng.choice(SPINS, (3, 2)),
                               rng.normal(size=(3, 2)))


def exact_conditional(s, block, site, chain):
  """p(s_block,site = x | rest) from brute-force weights of the three configurations."""
  logs = []
  for x in SPINS:
    t = s.copy()
    t[block, site] = x
    logs.append(brute_log_weight(t, chain.j_intra, chain.j_inter, chain.delta, chain.fields))
  logs = np.array(logs)
  return np.exp(logs - logsumexp(logs))


def test_site_update_is_the_exact_gibbs_conditional():
  """Prop. 4.1(i) on every configuration of a 3 x 2 chain and every site (729 x 6 cases)."""
  chain = tilted_test_chain()
  configs = np.array(list(itertools.product(SPINS, repeat=6))).reshape(-1, 3, 2)
  with jax.enable_x64(True):
    for block, site in itertools.product(range(3), range(2)):
      got = np.asarray(spin.site_conditional(configs, block, site, chain))
      want = np.array([exact_conditional(s, block, site, chain) for s in configs])
      np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)
    s = configs[123]                                    # a single configuration works too
    np.testing.assert_allclose(np.asarray(spin.site_conditional(s, 2, 1, chain)),
                               exact_conditional(s, 2, 1, chain), rtol=1e-12)


def test_conditional_mean_is_the_blume_capel_response():
  """Eq. 11 at finite N: E[s_li | rest] = mu_Delta(u_li) with the exact local field."""
  chain = tilted_test_chain()
  s = np.array([[1.0, -1.0], [0.0, 1.0], [1.0, 1.0]])
  with jax.enable_x64(True):
    probs = np.asarray(spin.site_conditional(s, 1, 0, chain))
    u = (1.2 * s[1, 1] + 0.7 * (s[0].sum() + s[2].sum())) / 2 + chain.fields[1, 0]
    np.testing.assert_allclose(probs @ SPINS, float(spin.blume_capel_response(u, chain.delta[1])),
                               rtol=1e-12)


def test_heat_bath_step_samples_the_exact_kernel():
  """One scheduled step (block ~ pi, site uniform, Gibbs resample) against the enumerated kernel."""
  chain = tilted_test_chain(clamped={0: 1.0})
  s = np.array([[1.0, 1.0], [0.0, -1.0], [1.0, 0.0]])
  pi = np.array([0.0, 0.3, 0.7])
  # Exact next-state law: sum over (block, site) of pi_l / N times the conditional.
  exact = {}
  for block, site in itertools.product((1, 2), range(2)):
    for x, p in zip(SPINS, exact_conditional(s, block, site, chain)):
      t = s.copy()
      t[block, site] = x
      key = tuple(t.ravel())
      exact[key] = exact.get(key, 0.0) + pi[block] / 2 * p
  num = 40_000
  keys = jax.random.split(jax.random.key(0), num)
  out = np.asarray(jax.jit(jax.vmap(lambda k: spin.heat_bath_step(k, s, pi, chain)))(keys))
  flat = [tuple(row) for row in out.reshape(num, -1)]
  assert set(flat) <= set(exact)
  for state, p in exact.items():
    freq = flat.count(state) / num
    assert abs(freq - p) < 5 * np.sqrt(p * (1 - p) / num) + 1e-3, (state, freq, p)


def test_kernel_leaves_the_target_invariant():
  """The scheduled one-step kernel built from site_conditional has p as a stationary law."""
  chain = spin.BlockChain(2, 2, j_intra=1.1, j_inter=0.6, delta=0.4,
                          fields=np.array([[0.3, -0.2], [0.1, 0.5]]))
  configs = np.array(list(itertools.product(SPINS, repeat=4))).reshape(-1, 2, 2)
  index = {tuple(c.ravel()): k for k, c in enumerate(configs)}
  logs = np.array([brute_log_weight(c, 1.1, 0.6, chain.delta, chain.fields) for c in configs])
  target = np.exp(logs - logsumexp(logs))
  pi = np.array([0.25, 0.75])
  kernel = np.zeros((len(configs), len(configs)))
  with jax.enable_x64(True):
    for block, site in itertools.product(range(2), range(2)):
      probs = np.asarray(spin.site_conditional(configs, block, site, chain))
      for k, c in enumerate(configs):
        for x, p in zip(SPINS, probs[k]):
          t = c.copy()
          t[block, site] = x
          kernel[k, index[tuple(t.ravel())]] += pi[block] / 2 * p
  np.testing.assert_allclose(kernel.sum(1), 1.0, atol=1e-13)
  np.testing.assert_allclose(target @ kernel, target, atol=1e-14)


@pytest.mark.parametrize("name", ["parallel", "progressive_lr"])
def test_heat_bath_approaches_mean_field_as_n_grows(name):
  """E[m_l(t)] of the finite-N chain vs the recursion of Eq. 13 with the same rate pi / N."""
  errors = []
  for n in (4, 16, 64):
    chain = spin.BlockChain(3, n, j_intra=1.0, j_inter=0.6, delta=0.5, clamped={0: 1.0})
    schedule = spin.make_schedule(name, chain, 16 * n)
    result = spin.run_heat_bath(jax.random.key(n), chain, schedule, 1024, record_every=2 * n)
    mean_field = spin.run_mean_field(np.zeros((1, 3)), chain, schedule, record_every=2 * n)
    assert np.all(np.asarray(result.magnetisation[:, :, 0]) == 1.0)   # the clamp never moves
    errors.append(float(np.abs(np.asarray(result.magnetisation.mean(1))
                               - np.asarray(mean_field.m[:, 0])).max()))
  assert errors[0] > errors[1] > errors[2], errors
  assert errors[2] < 0.04 and errors[0] > 3 * errors[2], errors


def test_heat_bath_bad_inputs():
  chain = spin.BlockChain(3, 2, clamped={0: 1.0})
  schedule = spin.make_schedule("parallel", chain, 8)
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="num_chains"):
    spin.run_heat_bath(key, chain, schedule, 0)
  with pytest.raises(ValueError, match="initial_spins"):
    spin.run_heat_bath(key, chain, schedule, 2, initial_spins=np.full((3, 2), 0.5))
  with pytest.raises(ValueError, match="not spins"):
    spin.run_heat_bath(key, chain.replace(clamped={0: 0.5}), schedule, 2)
  with pytest.raises(ValueError, match="clamped block"):
    spin.heat_bath_step(key, np.zeros((3, 2)), np.array([0.5, 0.5, 0.0]), chain)
  with pytest.raises(ValueError, match="out of range"):
    spin.site_conditional(np.zeros((3, 2)), 3, 0, chain)
