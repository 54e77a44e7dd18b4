"""Rectified flow: conversions, the SiD2 weight against float64 NumPy, the exact-model loss."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.diffusion import flow
from asyncpatch_jax.diffusion import gaussian


def test_noising_and_conversions_roundtrip():
  kx, ke, kt = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (3, 4, 4, 2))
  eps = jax.random.normal(ke, x.shape)
  t = jax.random.uniform(kt, (3, 4, 4), minval=0.05, maxval=0.95)
  z = flow.add_noise(x, eps, t)
  np.testing.assert_allclose(z, (1 - t[..., None]) * x + t[..., None] * eps, rtol=1e-6)
  v = flow.velocity_target(x, eps)
  np.testing.assert_allclose(flow.x0_from_v(z, v, t), x, atol=1e-5)
  np.testing.assert_allclose(flow.eps_from_v(z, v, t), eps, atol=1e-5)
  np.testing.assert_allclose(flow.v_from_x0(z, x, t), v, atol=1e-4)
  np.testing.assert_allclose(flow.v_from_eps(z, eps, t), v, atol=1e-4)
  # Per-image time gives exactly the constant map.
  tb = t[:, 0, 0]
  np.testing.assert_array_equal(flow.add_noise(x, eps, tb),
                                flow.add_noise(x, eps, jnp.broadcast_to(tb[:, None, None], t.shape)))


def test_sigmoid_weight_matches_float64_sid2_formula():
  # Reference evaluated at the float32-rounded times the library sees.
  t = np.linspace(1e-4, 1 - 1e-4, 999).astype(np.float32).astype(np.float64)
  for b in (-3.0, 0.0, 2.0):
    lam = 2 * np.log((1 - t) / t)
    w = 1.0 / (1.0 + np.exp(lam - b))        # sigmoid(b - lambda)
    dlam = 2.0 / (t * (1 - t))               # -d lambda / dt
    ref = w * dlam * (1 - t) ** 2 / 2.0      # eps-loss -> v-loss, constant 2 dropped
    got = np.asarray(flow.sigmoid_loss_weight(jnp.asarray(t, jnp.float32), b))
    np.testing.assert_allclose(got, ref, rtol=2e-5)
  assert float(flow.sigmoid_loss_weight(jnp.float32(0.0), -3.0)) == 0.0
  assert float(flow.loss_weight(jnp.float32(0.0), "mse")) == 0.0
  np.testing.assert_allclose(flow.logsnr(jnp.float32(0.25)), 2 * np.log(3), rtol=1e-6)


def _gaussian_problem(seed, h=2, w=2, c=2):
  rng = np.random.default_rng(seed)
  d = h * w * c
  a = rng.normal(size=(d, d)) / np.sqrt(d)
  cov = a @ a.T + 0.3 * np.eye(d)
  mean = rng.normal(size=(h, w, c)) * 0.5
  return mean, cov


def test_loss_of_exact_velocity_equals_analytic_expectation():
  mean, cov = _gaussian_problem(1)
  h, w, c = mean.shape
  d = mean.size
  t_map = np.array([[0.0, 0.3], [0.7, 0.95]])     # includes a clean pixel
  bias = -1.0
  # Analytic, float64: E|v - E[v|z]|^2 per dim = diag Cov(v | z).
  tt = np.repeat(t_map.reshape(-1), c)
  A, S = np.diag(1 - tt), np.diag(tt)
  cov_z = A @ cov @ A + S @ S
  cov_vz = S - cov @ A
  cov_v = cov + np.eye(d)
  post = np.diag(cov_v - cov_vz @ np.linalg.solve(cov_z, cov_vz.T)).reshape(h * w, c)
  wt = tt.reshape(h * w, c)[:, 0] * (1 - tt.reshape(h * w, c)[:, 0])
  wt = wt / (t_map.reshape(-1) ** 2 + np.exp(-bias) * (1 - t_map.reshape(-1)) ** 2)
  expected = np.mean(wt * post.mean(-1))
  # Monte Carlo with the library's exact field.
  n = 40000
  model = gaussian.GaussianVelocity(mean, cov)
  kx, ke = jax.random.split(jax.random.key(2))
  chol = np.linalg.cholesky(cov)
  x = (jax.random.normal(kx, (n, d)) @ chol.T).reshape(n, h, w, c) + mean
  eps = jax.random.normal(ke, x.shape)
  t = jnp.broadcast_to(jnp.asarray(t_map, jnp.float32), (n, h, w))
  got = float(flow.rectified_flow_loss(model, x.astype(jnp.float32), t, eps, "sigmoid", bias))
  assert abs(got - expected) < 0.02 * expected, (got, expected)


def test_bad_time_inputs_raise():
  x = jnp.zeros((2, 4, 4, 1))
  with pytest.raises(ValueError, match=r"per-pixel time map \[2, 4, 4\]"):
    flow.rectified_flow_loss(lambda z, t: z, x, jnp.zeros((2, 4, 3)), x)
  with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
    flow.rectified_flow_loss(lambda z, t: z, x, jnp.full((2,), 1.5), x)
  with pytest.raises(ValueError, match="weighting"):
    flow.loss_weight(jnp.zeros(2), "l1")


class NoisingWithAndWithoutJitTest(chex.TestCase):
  """add_noise, velocity_target and per_pixel_loss give the float64 formulas, jitted or not,
  and refuse mismatched shapes at their boundary (chex)."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_against_float64(self):
    rng = np.random.default_rng(0)
    x, eps = rng.normal(size=(2, 4, 6, 3)), rng.normal(size=(2, 4, 6, 3))
    t = rng.uniform(size=(2, 4, 6))
    z = self.variant(flow.add_noise)(*(jnp.asarray(a, jnp.float32) for a in (x, eps, t)))
    np.testing.assert_allclose(z, (1 - t[..., None]) * x + t[..., None] * eps, rtol=1e-5,
                               atol=1e-6)
    v = self.variant(flow.velocity_target)(jnp.asarray(x, jnp.float32),
                                           jnp.asarray(eps, jnp.float32))
    np.testing.assert_allclose(v, eps - x, rtol=1e-5, atol=1e-6)
    loss = self.variant(lambda a, b, tt: flow.per_pixel_loss(a, b, tt, "mse"))(
        jnp.asarray(v), jnp.zeros_like(v), jnp.asarray(t, jnp.float32))
    np.testing.assert_allclose(loss, ((eps - x) ** 2).mean(-1), rtol=1e-5)

  def test_mismatched_shapes_are_refused(self):
    x = jnp.zeros((2, 4, 6, 3))
    with self.assertRaises(AssertionError):
      flow.add_noise(x, jnp.zeros((2, 4, 6, 1)), jnp.zeros((2,)))
    with self.assertRaises(AssertionError):
      flow.add_noise(x, x, jnp.zeros((3,)))
    with self.assertRaises(AssertionError):
      flow.per_pixel_loss(x, x[..., :1], jnp.zeros((2, 4, 6)))
