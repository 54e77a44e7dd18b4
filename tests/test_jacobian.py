"""Jacobian norms against closed forms and exact SVDs of materialised Jacobians.

The model is the exact Gaussian epsilon-predictor (PIFS Thm. 17 proof), whose DDIM
step has the Jacobian `sqrt(abar'/abar) I + b_t sqrt(v) (abar Sigma + v I)^{-1}` at every
x; with block-diagonal isotropic Sigma the diagonal blocks are f_t(lambda_k) I and the
cross blocks vanish.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.analysis import jacobian_norms as jn
from asyncpatch_jax.analysis import norm_method as nm
from asyncpatch_jax.analysis import regimes as rg
from asyncpatch_jax.analysis import pifs
from asyncpatch_jax.analysis import ddim_maps
from asyncpatch_jax.analysis.patch_stats import patch_covariance_spectra, patch_permutation, patchify

SHAPE, P = (4, 4, 2), 2  # M = 4 patches of n_k = 8
N, M, NK = 32, 4, 8
ABAR = pifs.cosine_schedule(1000, 0.0)
STEPS = pifs.chain_steps(ABAR, pifs.ddim_chain(1000, 20))
A_T, A_P = STEPS.abar_t[12], STEPS.abar_prev[12]  # t = 260 -> 240
LAMS = np.array([0.5, 1.3, 3.0, 0.2])


def isotropic_cov(lams):
  d = np.zeros(N)
  d[patch_permutation(SHAPE, P)] = np.repeat(lams, NK)
  return np.diag(d)


def closed_form_phi_jac(sigma, a, ap):
  v = 1.0 - a
  b = pifs.score_coefficient(a, ap)
  return np.sqrt(ap / a) * np.eye(N) + b * np.sqrt(v) * np.linalg.inv(a * sigma + v * np.eye(N))


def blocks_of(j):
  perm = patch_permutation(SHAPE, P)
  return j[perm][:, perm].reshape(M, NK, M, NK).transpose(0, 2, 1, 3)


def spd_with_spectrum(n, lo, hi, seed):
  q, _ = np.linalg.qr(np.random.RandomState(seed).randn(n, n))
  return (q * np.geomspace(lo, hi, n)) @ q.T


@pytest.mark.parametrize("method", ["power", "exact", "auto"])
def test_block_norms_gaussian_isotropic(method):
  """Thm. 17: ||[J Phi_t]_kk|| = f_t(lambda_k), cross blocks 0 (float32)."""
  phi = ddim_maps.ddim_step(ddim_maps.gaussian_eps_fn(isotropic_cov(LAMS)), A_T, A_P)
  x = jax.random.normal(jax.random.key(0), SHAPE)
  norms, info = jn.block_norms(phi, x, patch_size=P, key=jax.random.key(1),
                                method=method, return_info=True)
  norms = np.asarray(norms)
  np.testing.assert_allclose(np.diagonal(norms), pifs.expansion_function(LAMS, A_T, A_P),
                             rtol=1e-4)
  assert np.abs(norms - np.diag(np.diagonal(norms))).max() < 1e-6
  if method == "auto":
    assert info["method"] == "exact"  # n = 32 basis JVPs beat 30 * 16 * 2 passes


def test_block_norms_and_spectral_norm_match_exact_svd():
  """Non-isotropic, non-block-diagonal Sigma: power iteration and the exact mode agree
  with the SVD of every block of the closed-form Jacobian (float64)."""
  sigma = spd_with_spectrum(N, 0.02, 5.0, 0)
  a, ap = ABAR[250], 1.0  # a long last step: well-spread singular values
  with jax.enable_x64(True):
    phi = ddim_maps.ddim_step(ddim_maps.gaussian_eps_fn(sigma), a, ap)
    x = jnp.asarray(np.random.RandomState(1).randn(*SHAPE))
    ref_j = closed_form_phi_jac(sigma, a, ap)
    ref = np.linalg.svd(blocks_of(ref_j), compute_uv=False)[..., 0]
    mat = jn.materialize_jacobian(phi, x, batch_size=7)
    np.testing.assert_allclose(np.asarray(mat), ref_j, rtol=1e-10, atol=1e-12)
    exact = jn.block_norms(phi, x, patch_size=P, method="exact")
    np.testing.assert_allclose(np.asarray(exact), ref, rtol=1e-10)
    power, info = jn.block_norms(phi, x, patch_size=P, key=jax.random.key(2),
                                  method="power", num_iters=3000, tol=1e-12,
                                  return_info=True)
    np.testing.assert_allclose(np.asarray(power), ref, rtol=1e-5)
    assert int(info["num_iters"]) < 3000  # stopped on the tolerance
    out = jn.spectral_norm(phi, x, key=jax.random.key(3), num_iters=3000, tol=1e-13,
                            return_vectors=True)
    assert float(out.sigma) == pytest.approx(np.linalg.norm(ref_j, 2), rel=1e-7)
    # (u, v) are the singular pair: J v = sigma u.
    np.testing.assert_allclose(ref_j @ np.asarray(out.v).reshape(-1),
                               float(out.sigma) * np.asarray(out.u).reshape(-1), atol=1e-5)


def test_block_norm_costs_count_the_linear_map():
  """For the Gaussian step (two n x n matmuls) one JVP costs ~4 n^2 flops."""
  phi = ddim_maps.ddim_step(ddim_maps.gaussian_eps_fn(isotropic_cov(LAMS)), A_T, A_P)
  x = jnp.zeros(SHAPE)
  c = nm.block_norm_costs(phi, x, patch_size=P, num_iters=30)
  assert 4 * N * N <= c.jvp <= 4 * N * N + 40 * N
  assert 4 * N * N <= c.vjp <= 4 * N * N + 40 * N
  assert c.power == pytest.approx(30 * M * M * (c.jvp + c.vjp))
  assert c.exact == pytest.approx(N * c.jvp + M * M * nm.SVD_SLOWDOWN
                                  * nm.SVD_FLOPS_PER_M3 * NK**3)
  assert c.choice == "exact" and c.exact_bytes == N * N * 4


def test_differentiable_spectral_norm_matches_finite_differences():
  rng = np.random.RandomState(0)
  n_in, hidden = 18, 24
  with jax.enable_x64(True):
    params = {"w1": jnp.asarray(rng.randn(hidden, n_in) / np.sqrt(n_in)),
              "b1": jnp.asarray(0.1 * rng.randn(hidden)),
              "w2": jnp.asarray(rng.randn(n_in, hidden) / np.sqrt(hidden))}

    def net(p, x):  # [3, 3, 2] -> [3, 3, 2]
      h = jnp.tanh(p["w1"] @ x.reshape(-1) + p["b1"])
      return (p["w2"] @ h).reshape(x.shape)

    x = jnp.asarray(rng.randn(3, 3, 2))
    sigma_fn = lambda p: jn.differentiable_spectral_norm(
        net, p, x, key=jax.random.key(0), num_iters=5000, tol=1e-14)
    j = np.asarray(jax.jacfwd(lambda z: net(params, z))(x)).reshape(n_in, n_in)
    assert float(sigma_fn(params)) == pytest.approx(np.linalg.norm(j, 2), rel=1e-9)
    grad = jax.grad(sigma_fn)(params)
    d = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.randn(*v.shape)), params)
    h = 1e-6
    shift = lambda s: jax.tree_util.tree_map(lambda p, q: p + s * q, params, d)
    fd = (float(sigma_fn(shift(h))) - float(sigma_fn(shift(-h)))) / (2 * h)
    ad = sum(float(jnp.vdot(g, q)) for g, q in zip(jax.tree_util.tree_leaves(grad),
                                                   jax.tree_util.tree_leaves(d)))
    assert ad == pytest.approx(fd, rel=1e-6)


def test_pc_quantities_from_block_norms():
  norms = np.abs(np.random.RandomState(0).randn(5, 5)) * 0.2
  q = rg.pc_quantities(norms)
  for k in range(5):
    off = sum(norms[k, j] for j in range(5) if j != k)
    assert float(q.coupling[k]) == pytest.approx(off, rel=1e-6)
    assert float(q.slack[k]) == pytest.approx(1 - norms[k, k] - off, rel=1e-6)
  assert float(q.kappa_pc) == pytest.approx(
      np.diagonal(norms).max() + max(norms[k].sum() - norms[k, k] for k in range(5)), rel=1e-6)
  assert bool(q.pc_holds) == (float(q.kappa_pc) < 1)


def test_ec_quantities_gaussian_isotropic():
  """J eps = diag(d), d = sqrt(v) / (abar lambda_k + v): nu = mean(d) exactly (Rademacher
  probes are exact on diagonal matrices) and delta = max |d - nu|."""
  cov = isotropic_cov(LAMS)
  with jax.enable_x64(True):
    eps = ddim_maps.gaussian_eps_fn(cov)
    a, ap = STEPS.abar_t[-1], STEPS.abar_prev[-1]  # the first step, t = 1000 -> 980
    ec = rg.ec_quantities(lambda z: eps(z, a), jnp.zeros(SHAPE, jnp.float64), a, ap,
                           key=jax.random.key(0), num_probes=8, num_iters=500, tol=1e-12)
    d = np.sqrt(1 - a) / (a * np.diag(cov) + 1 - a)
    nu, delta = d.mean(), np.abs(d - d.mean()).max()
    assert float(ec.nu) == pytest.approx(nu, rel=1e-12)
    assert float(ec.delta) == pytest.approx(delta, rel=1e-8)
    l_star = pifs.contraction_threshold(a, ap)
    b = abs(pifs.score_coefficient(a, ap))
    assert ec.l_star == pytest.approx(l_star, rel=1e-12)
    assert bool(ec.ec_holds) == (nu > l_star + delta and b * nu <= math.sqrt(ap / a))
    assert bool(ec.ec_holds)  # Thm. 16: (EC) holds at the highest noise
    assert float(ec.kappa_bound) == pytest.approx(1 - b * (nu - l_star - delta), rel=1e-9)


def test_suppression_field_and_patch_spectra():
  """S_k,t = f_t(lambda_k) - <v_k, [J Phi]_kk v_k> (Eq. 30-32): 0 for the Gaussian model
  of the data itself, f_t(lambda_k) - f_t(2 lambda_k) for the Gaussian of 2 Sigma."""
  rng = np.random.RandomState(0)
  blocks = [spd_with_spectrum(NK, 0.05, 2.0 + k, k) for k in range(M)]
  sig_patch = np.zeros((N, N))
  for k, b in enumerate(blocks):
    sig_patch[k * NK:(k + 1) * NK, k * NK:(k + 1) * NK] = b
  perm = patch_permutation(SHAPE, P)
  inv = np.argsort(perm)
  sigma = sig_patch[inv][:, inv]  # pixel order
  data = rng.multivariate_normal(np.zeros(N), sigma, size=4000).reshape(-1, *SHAPE)
  spectra = patch_covariance_spectra((data[i:i + 500] for i in range(0, 4000, 500)), P)
  pt = patchify(data, P)
  for k in range(M):
    np.testing.assert_allclose(spectra.cov[k], np.cov(pt[:, k].T), rtol=1e-10, atol=1e-12)
  assert spectra.count == 4000
  np.testing.assert_allclose(spectra.lambdas, [np.linalg.eigvalsh(np.cov(pt[:, k].T))[-1]
                                               for k in range(M)], rtol=1e-10)
  # Use the exact patch spectra from here on.
  lam = np.array([np.linalg.eigvalsh(b)[-1] for b in blocks])
  vecs = np.stack([np.linalg.eigh(b)[1][:, -1] for b in blocks])
  with jax.enable_x64(True):
    x = jnp.asarray(rng.randn(*SHAPE))
    for scale, target in ((1.0, lambda: np.zeros(M)),
                          (2.0, lambda: pifs.expansion_function(lam, A_T, A_P)
                           - pifs.expansion_function(2 * lam, A_T, A_P))):
      phi = ddim_maps.ddim_step(ddim_maps.gaussian_eps_fn(scale * sigma), A_T, A_P)
      sup = rg.suppression_field(phi, x, vecs, lam, A_T, A_P, patch_size=P)
      np.testing.assert_allclose(np.asarray(sup.suppression), target(), atol=1e-12)
      np.testing.assert_allclose(np.asarray(sup.rayleigh),
                                 pifs.expansion_function(scale * lam, A_T, A_P), rtol=1e-12)


def test_bad_inputs():
  x = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match=r"output of shape \(4, 4, 1\)"):
    jn.spectral_norm(lambda z: z[..., :1], x, key=jax.random.key(0))
  with pytest.raises(ValueError, match="does not divide"):
    jn.block_norms(lambda z: 2 * z, x, patch_size=3, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"one image \[H, W, C\]"):
    jn.block_norms(lambda z: 2 * z, jnp.zeros((1,) + SHAPE), patch_size=2,
                    key=jax.random.key(0))
  with pytest.raises(ValueError, match="method"):
    jn.block_norms(lambda z: 2 * z, x, patch_size=2, method="svd")
  with pytest.raises(ValueError, match=r"vectors has shape"):
    rg.diagonal_rayleigh(lambda z: 2 * z, x, np.ones((3, 8)), patch_size=2)


def _conv_specs(closed):
  """rhs_spec of every convolution in a jaxpr, nested jaxprs included."""
  from jax.extend import core as jex  # pylint: disable=import-outside-toplevel
  out = []
  todo = [closed.jaxpr]
  while todo:
    jp = todo.pop()
    for eqn in jp.eqns:
      if eqn.primitive.name == "conv_general_dilated":
        out.append(tuple(eqn.params["dimension_numbers"].rhs_spec))
      for v in eqn.params.values():
        for sub in (v if isinstance(v, tuple) else (v,)):
          if isinstance(sub, jex.ClosedJaxpr):
            todo.append(sub.jaxpr)
          elif isinstance(sub, jex.Jaxpr):
            todo.append(sub)
  return out


def test_linearized_maps_have_canonical_convolutions():
  """`jacobian_norms.linearized`: J^T u equals jax.vjp's, and every convolution of the
  transposed map (strided, inside a scan) uses the HWIO kernel layout."""
  import flax.linen as nn  # pylint: disable=import-outside-toplevel

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Conv(8, (3, 3), strides=2)(x[None])
      h = nn.GroupNorm(4)(nn.swish(h))
      h = jnp.repeat(jnp.repeat(h, 2, 1), 2, 2)
      return nn.Conv(x.shape[-1], (3, 3))(h)[0]

  x = jax.random.normal(jax.random.key(0), (8, 8, 2))
  params = Net().init(jax.random.key(1), x)
  step = lambda z: z + 0.1 * Net().apply(params, z)
  fn = lambda z: jax.lax.scan(lambda c, _: (step(c), None), z, None, length=2)[0]
  u = jax.random.normal(jax.random.key(2), x.shape)
  jvp, vjp = jn.linearized(fn, x)
  ref_vjp = jax.vjp(fn, x)[1](u)[0]
  np.testing.assert_allclose(np.asarray(jax.jit(vjp)(u)), np.asarray(ref_vjp), rtol=2e-5,
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(jax.vmap(jvp)(u[None]))[0],
                             np.asarray(jax.jvp(fn, (x,), (u,))[1]), rtol=2e-5, atol=1e-6)
  specs = _conv_specs(jax.make_jaxpr(vjp)(u))
  assert specs and all(s == (3, 2, 0, 1) for s in specs)
  plain = jax.linear_transpose(jax.linearize(fn, x)[1], x)
  assert any(s != (3, 2, 0, 1) for s in _conv_specs(jax.make_jaxpr(plain)(u)))
