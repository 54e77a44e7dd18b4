"""Lyapunov spectra (PIFS Eq. 43) and the Kaplan-Yorke dimension (Eq. 44, Thm. 26).

References: Lambda(lambda_k) (Thm. 25-26) for the Gaussian model with block-diagonal
isotropic covariance; the SVD of the product of closed-form step Jacobians otherwise;
log-determinants for the QR (Benettin) volume identity.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.analysis import lyapunov as ly
from asyncpatch_jax.analysis import pifs
from asyncpatch_jax.analysis import ddim_maps
from asyncpatch_jax.analysis.patch_stats import patch_permutation

SHAPE, P = (4, 4, 1), 2  # M = 4 patches of n_k = 4
N, M, NK = 16, 4, 4
ABAR = pifs.cosine_schedule(1000, 0.0)
DDIM50 = pifs.ddim_chain(1000, 20)
SHORT = pifs.ddim_chain(1000, 200)  # 5 steps


def isotropic_cov(lams):
  d = np.zeros(N)
  d[patch_permutation(SHAPE, P)] = np.repeat(lams, NK)
  return np.diag(d)


def random_spd(seed):
  q, _ = np.linalg.qr(np.random.RandomState(seed).randn(N, N))
  return (q * np.geomspace(0.05, 4.0, N)) @ q.T


def step_jacobians(sigma, chain):
  st = pifs.chain_steps(ABAR, chain)
  out = []
  for a, ap in zip(st.abar_t[::-1], st.abar_prev[::-1]):
    b = pifs.score_coefficient(a, ap)
    out.append(np.sqrt(ap / a) * np.eye(N)
               + b * np.sqrt(1 - a) * np.linalg.inv(a * sigma + (1 - a) * np.eye(N)))
  return out


def test_gaussian_isotropic_spectrum_and_ky_dimension():
  """Exponents = Lambda(lambda_k), n_k times each; d_KY from them = Thm. 26 (Eq. 47)."""
  lams = np.array([1.06, 0.9, 0.5, 0.3])  # condition (46) holds on the 50-step chain
  st = pifs.chain_steps(ABAR, DDIM50)
  expected = np.repeat(pifs.mean_log_expansion(lams, st.abar_t, st.abar_prev), NK)
  theory = pifs.gaussian_ky_dimension(lams, NK, st.abar_t, st.abar_prev)
  assert theory["condition_46"]
  with jax.enable_x64(True):
    eps = ddim_maps.gaussian_eps_fn(isotropic_cov(lams))
    x = jnp.asarray(np.random.RandomState(0).randn(*SHAPE))
    chain = ddim_maps.ddim_chain_fn(eps, ABAR, DDIM50)
    out = ly.lyapunov_spectrum(chain, x, key=jax.random.key(0), num_vectors=N)
    np.testing.assert_allclose(np.asarray(out.exponents), np.sort(expected)[::-1], rtol=1e-8)
    assert float(pifs.kaplan_yorke_dimension(out.exponents)) == pytest.approx(
        theory["value"], rel=1e-6)
    # Top-6 only, with the sequence-of-steps form on a short chain.
    st5 = pifs.chain_steps(ABAR, SHORT)
    out5 = ly.lyapunov_spectrum(ddim_maps.ddim_step_fns(eps, ABAR, SHORT), x,
                                key=jax.random.key(1), num_vectors=6, num_iters=300,
                                tol=1e-13)
    exp5 = np.sort(np.repeat(pifs.mean_log_expansion(lams, st5.abar_t, st5.abar_prev), NK))[::-1]
    np.testing.assert_allclose(np.asarray(out5.exponents), exp5[:6], rtol=1e-8)


def test_spectrum_matches_svd_of_jacobian_product():
  sigma = random_spd(0)
  prod = np.eye(N)
  for j in step_jacobians(sigma, DDIM50):
    prod = j @ prod
  s_ref = np.linalg.svd(prod, compute_uv=False)
  with jax.enable_x64(True):
    chain = ddim_maps.ddim_chain_fn(ddim_maps.gaussian_eps_fn(sigma), ABAR, DDIM50)
    x = jnp.zeros(SHAPE, jnp.float64)
    out = ly.lyapunov_spectrum(chain, x, key=jax.random.key(0), num_vectors=5,
                               num_iters=2000, tol=1e-13)
    np.testing.assert_allclose(np.asarray(out.singular_values), s_ref[:5], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(out.exponents), np.log(s_ref[:5]) / 50, rtol=1e-6)
    # Right singular vectors: ||J v_i|| = s_i.
    v = np.asarray(out.vectors).reshape(5, N)
    np.testing.assert_allclose(np.linalg.norm(prod @ v.T, axis=0), s_ref[:5], rtol=1e-6)


def test_qr_benettin_volume_identity():
  """With k = n vectors, sum_i l_i = (1/T) sum_t log |det J_t| exactly; running[-1] is the
  final estimate."""
  sigma = random_spd(1)
  logdet = sum(np.linalg.slogdet(j)[1] for j in step_jacobians(sigma, SHORT))
  with jax.enable_x64(True):
    eps = ddim_maps.gaussian_eps_fn(sigma)
    x = jnp.asarray(np.random.RandomState(2).randn(*SHAPE))
    for steps in (ddim_maps.ddim_step_fns(eps, ABAR, SHORT), ddim_maps.ddim_chain_fn(eps, ABAR, SHORT)):
      out = ly.lyapunov_qr(steps, x, key=jax.random.key(3), num_vectors=N)
      assert float(jnp.sum(out.exponents)) == pytest.approx(logdet / 5, rel=1e-10)
      assert out.running.shape == (5, N)
      np.testing.assert_allclose(np.asarray(out.running[-1]), np.asarray(out.exponents))
    # The trajectory end is the chain's output.
    np.testing.assert_allclose(np.asarray(out.final), np.asarray(steps(x)), rtol=1e-12)


def test_qr_running_estimate_converges_on_a_repeated_step():
  """Iterating one step T times: the QR exponents approach log |eig(J)| (J symmetric)."""
  sigma = random_spd(4)
  a, ap = 0.5, 0.6
  b = pifs.score_coefficient(a, ap)
  j = np.sqrt(ap / a) * np.eye(N) + b * np.sqrt(0.5) * np.linalg.inv(a * sigma + 0.5 * np.eye(N))
  truth = np.sort(np.log(np.abs(np.linalg.eigvals(j))))[::-1][:3]
  with jax.enable_x64(True):
    eps = ddim_maps.gaussian_eps_fn(sigma)
    steps = 400
    chain = ddim_maps.Chain(step=ddim_maps.ddim_chain_fn(eps, ABAR, SHORT).step, consts=ddim_maps.as_partial(eps),
                     params=(jnp.full(steps, a), jnp.full(steps, ap)))
    out = ly.lyapunov_qr(chain, jnp.zeros(SHAPE, jnp.float64), key=jax.random.key(0),
                         num_vectors=3)
  err = np.abs(np.asarray(out.running) - truth)
  # The O(1/T) bias of the finite-time estimate halves from T = 200 to T = 400.
  assert err[-1].max() < 1e-2
  assert np.all(err[399] < 0.6 * err[199])


def ky_brute(l):
  l = np.sort(l)[::-1]
  cs = np.cumsum(l)
  j = int(np.sum(cs >= 0))
  if j == 0:
    return 0.0
  return float(len(l)) if j == len(l) else j + cs[j - 1] / abs(l[j])


def test_kaplan_yorke_dimension():
  rng = np.random.RandomState(0)
  for _ in range(30):
    l = rng.randn(rng.choice([1, 5, 12])) + rng.randn()
    assert float(pifs.kaplan_yorke_dimension(jnp.asarray(l))) == pytest.approx(
        ky_brute(l), rel=1e-5, abs=1e-6)
  assert float(pifs.kaplan_yorke_dimension(jnp.array([-0.1, -0.2]))) == 0.0
  assert float(pifs.kaplan_yorke_dimension(jnp.array([0.3, 0.1, -0.2]))) == 3.0
  assert float(pifs.kaplan_yorke_dimension(jnp.array([0.3, -0.1, -0.4]))) == pytest.approx(
      2.5, rel=1e-6)


def test_bad_inputs():
  x = jnp.zeros(SHAPE)
  steps = [lambda z: 2 * z, lambda z: 0.5 * z]
  with pytest.raises(ValueError, match=r"num_vectors = 17.*n = H \* W \* C = 16"):
    ly.lyapunov_spectrum(steps, x, key=jax.random.key(0), num_vectors=17)
  with pytest.raises(ValueError, match=r"step_fns\[1\] maps"):
    ly.lyapunov_spectrum([lambda z: z, lambda z: z[:2]], x, key=jax.random.key(0),
                         num_vectors=2)
  with pytest.raises(ValueError, match="non-empty sequence"):
    ly.lyapunov_qr([], x, key=jax.random.key(0), num_vectors=2)
  with pytest.raises(ValueError, match="exponents"):
    pifs.kaplan_yorke_dimension(jnp.zeros((2, 2)))
