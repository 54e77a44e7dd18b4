"""Guidance against exact scores of Gaussian data (AsyncPatch Eq. 6-8)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.diffusion import gaussian
from asyncpatch_jax.diffusion import guidance

H, W, C = 2, 3, 1
D = H * W * C


def _problem():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(D, D)) / np.sqrt(D)
  cov = a @ a.T + 0.3 * np.eye(D)
  mean = rng.normal(size=(H, W, C)) * 0.3
  return mean, cov, rng


def _score(z, t_pix, mean, cov):
  """Exact score of the per-pixel-time marginal, float64: -Cov_z^-1 (z - A mu)."""
  a = 1 - t_pix
  cov_z = a[:, None] * cov * a[None, :] + np.diag(t_pix ** 2)
  return -np.linalg.solve(cov_z, z - a * mean.reshape(-1))


def test_input_guidance_matches_eq8_on_exact_scores():
  mean, cov, rng = _problem()
  model = gaussian.GaussianVelocity(mean, cov)
  s = np.array([[0.0, 0.0, 0.4], [0.0, 0.7, 0.9]])          # three known pixels
  region = (s == 0).astype(np.float32)                       # guide with the known region
  t_g, w = 0.6, 1.5
  z = rng.normal(size=(H, W, C))
  noise = rng.normal(size=(H, W, C))
  fn = guidance.input_guidance(model)
  got = fn(jnp.asarray(z[None], jnp.float32), jnp.asarray(s[None], jnp.float32),
           jnp.asarray(region[None]), jnp.asarray(noise[None], jnp.float32),
           jnp.float32(w), jnp.float32(t_g))[0]
  # Reference, float64: re-noise the region to t_g, combine scores (Eq. 8), convert to v.
  sp = s.reshape(-1)
  tg = np.where(region.reshape(-1) > 0, np.maximum(sp, t_g), sp)
  ratio = (1 - tg) / (1 - sp)
  zg = np.where(tg > sp, ratio * z.reshape(-1) + np.sqrt(tg ** 2 - ratio ** 2 * sp ** 2)
                * noise.reshape(-1), z.reshape(-1))
  guided = (1 + w) * _score(z.reshape(-1), sp, mean, cov) - w * _score(zg, tg, mean, cov)
  eps_bar = -sp * guided                                      # eps = -sigma * score, sigma = s
  v_ref = (eps_bar - z.reshape(-1)) / (1 - sp)
  np.testing.assert_allclose(np.asarray(got).reshape(-1), v_ref, atol=2e-4)
  # w = 0 is the plain velocity.
  plain = model(jnp.asarray(z[None], jnp.float32), jnp.asarray(s[None], jnp.float32))
  off = fn(jnp.asarray(z[None], jnp.float32), jnp.asarray(s[None], jnp.float32),
           jnp.asarray(region[None]), jnp.asarray(noise[None], jnp.float32), 0.0, t_g)
  np.testing.assert_allclose(off, plain, atol=1e-5)


def test_classifier_free_guidance_combines_conditional_and_null_passes():
  calls = []

  def velocity_fn(z, t, params, y):
    calls.append(y.shape)
    return params * z * (1.0 + y[:, None, None, None].astype(z.dtype)) + t[..., None]

  null = 10
  fn = guidance.classifier_free(velocity_fn, null)
  z = jax.random.normal(jax.random.key(0), (3, 2, 2, 1))
  t = jax.random.uniform(jax.random.key(1), (3, 2, 2))
  y = jnp.array([0, 4, 7])
  w = 2.0
  got = fn(z, t, 0.5, y, w)
  v_c = velocity_fn(z, t, 0.5, y)
  v_u = velocity_fn(z, t, 0.5, jnp.full_like(y, null))
  np.testing.assert_allclose(got, (1 + w) * v_c - w * v_u, rtol=1e-5, atol=1e-5)
  assert calls[0] == (6,)                  # one batched pass of 2B


def test_renoise_has_the_forward_transition_moments():
  s = jnp.full((20000, 1, 1), 0.3)
  t = jnp.full((20000, 1, 1), 0.8)
  z = jnp.full((20000, 1, 1, 1), 0.5)
  out = np.asarray(guidance.renoise(z, s, t, jax.random.normal(jax.random.key(2), z.shape)))
  # From z_s to z_t of z = (1-t) x + t eps: mean (1-t)/(1-s) z_s, variance t^2 - ((1-t)/(1-s))^2 s^2.
  r = 0.2 / 0.7
  assert abs(out.mean() - r * 0.5) < 0.01
  assert abs(out.var() - (0.64 - r ** 2 * 0.09)) < 0.01


def test_generator_refuses_a_negative_input_guidance_weight():
  from asyncpatch_jax.generation import generate  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.runtime import checks  # pylint: disable=g-import-not-at-top
  gen = generate.Generator(model=None, mesh=None)       # refused before the model is touched
  with pytest.raises(checks.InputError, match=r"input_guidance=-0.5; expected a number >= 0\. "
                     r"Input guidance \(AsyncPatch Eq. 8\)"):
    gen(None, np.zeros((2, 4, 4)), key=jax.random.key(0), shape=(1, 4, 4, 1),
        input_guidance=-0.5)
