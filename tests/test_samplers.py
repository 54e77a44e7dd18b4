"""The jitted per-pixel DDIM sampler against the exact velocity field of Gaussian data."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.diffusion import gaussian
from asyncpatch_jax.diffusion import samplers
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.runtime import sharding

H, W, C = 3, 3, 1
D = H * W * C


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(D, D)) / np.sqrt(D)
  cov = a @ a.T + 0.2 * np.eye(D)        # correlated, not block-diagonal
  mean = rng.normal(size=(H, W, C)) * 0.5
  return mean, cov


MEAN, COV = _problem()
MODEL = gaussian.GaussianVelocity(MEAN, COV)
# Shared: one compilation per shape. Single device: XLA:CPU can deadlock running the
# LAPACK solve of the Gaussian field inside a scan over 8 fake host devices.
SAMPLER = samplers.Sampler(MODEL, mesh=None)
N_SAMPLES = 8192


def _moments(x):
  flat = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  return flat.mean(0), np.cov(flat, rowvar=False)


@pytest.mark.parametrize("eta", [0.0, 0.25])
def test_synchronous_sampling_reaches_the_gaussian(eta):
  tau = schedules.synchronous(100, H, W)
  x = SAMPLER(tau, key=jax.random.key(1), shape=(N_SAMPLES, H, W, C), eta=eta)
  m, c = _moments(x)
  # Monte Carlo error of N=8192 samples: ~0.01 on the mean, ~0.02 on the covariance.
  np.testing.assert_allclose(m, MEAN.reshape(-1), atol=0.05)
  np.testing.assert_allclose(c, COV, atol=0.06)


def test_inpainting_generates_the_exact_conditional_gaussian():
  mask = np.zeros((H, W), np.float32)
  mask[:, 0] = 1.0                                  # left column known
  known = mask.reshape(-1).astype(bool)
  rng = np.random.default_rng(3)
  x_ref = MEAN.reshape(-1) + np.linalg.cholesky(COV) @ rng.normal(size=D)
  x_ref = x_ref.reshape(H, W, C).astype(np.float32)
  tau = schedules.inpainting(mask, 100)
  x = np.broadcast_to(x_ref, (N_SAMPLES, H, W, C))
  out = SAMPLER(tau, key=jax.random.key(4), x=x, eta=0.25)
  out = np.asarray(out)
  # Known pixels are exactly the input.
  np.testing.assert_array_equal(out[:, mask == 1], x[:, mask == 1])
  # Unknown pixels: N(mu_u + S_uk S_kk^-1 (x_k - mu_k), S_uu - S_uk S_kk^-1 S_ku).
  mu = MEAN.reshape(-1)
  s_kk, s_uk, s_uu = COV[np.ix_(known, known)], COV[np.ix_(~known, known)], COV[np.ix_(~known, ~known)]
  cond_mean = mu[~known] + s_uk @ np.linalg.solve(s_kk, x_ref.reshape(-1)[known] - mu[known])
  cond_cov = s_uu - s_uk @ np.linalg.solve(s_kk, s_uk.T)
  m, c = _moments(out.reshape(N_SAMPLES, -1)[:, ~known])
  np.testing.assert_allclose(m, cond_mean, atol=0.05)
  np.testing.assert_allclose(c, cond_cov, atol=0.05)


@pytest.mark.slow
def test_autoregressive_schedule_reaches_the_gaussian():
  # 3 column groups; Euler error of the deterministic step is ~0.1 at 40 steps a group.
  tau = schedules.autoregressive(H, W, (1, 3), steps_per_group=120)
  x = SAMPLER(tau, key=jax.random.key(5), shape=(N_SAMPLES, H, W, C), eta=0.0)
  m, c = _moments(x)
  np.testing.assert_allclose(m, MEAN.reshape(-1), atol=0.05)
  np.testing.assert_allclose(c, COV, atol=0.07)


def test_eta_zero_is_the_euler_step_and_static_pixels_are_bit_identical():
  k = jax.random.split(jax.random.key(6), 5)
  z = jax.random.normal(k[0], (4, 5, 5, 2))
  v = jax.random.normal(k[1], z.shape)
  t = jax.random.uniform(k[2], (4, 5, 5))
  s = t * jax.random.uniform(k[3], t.shape)
  static = jax.random.bernoulli(k[4], 0.4, t.shape)
  s = jnp.where(static, t, s)
  t = t.at[0, 0, 0].set(0.0).at[0, 0, 1].set(1.0)   # edge times, not moving
  s = s.at[0, 0, 0].set(0.0).at[0, 0, 1].set(1.0)
  static = static.at[0, 0, 0].set(True).at[0, 0, 1].set(True)
  out = samplers.ddim_step(z, v, t, s, 0.0, jnp.zeros_like(z))
  euler = z - (t - s)[..., None] * v
  np.testing.assert_allclose(out, euler, atol=2e-6)
  np.testing.assert_array_equal(np.asarray(out)[np.asarray(static)], np.asarray(z)[np.asarray(static)])
  noisy = samplers.ddim_step(z, v, t, s, 0.7, jax.random.normal(k[4], z.shape))
  np.testing.assert_array_equal(np.asarray(noisy)[np.asarray(static)], np.asarray(z)[np.asarray(static)])
  assert np.isfinite(np.asarray(noisy)).all()


def test_untouched_groups_keep_their_start_noise_bitwise():
  tau = schedules.autoregressive(H, W, (3, 1), steps_per_group=4)
  key = jax.random.key(7)
  x = jnp.zeros((2, H, W, C))
  partial = samplers.sample_loop(MODEL, jnp.asarray(tau[:5]), x, key, 0.5)  # stage 1 only
  z0 = jax.random.normal(jax.random.fold_in(key, 0), x.shape)
  np.testing.assert_array_equal(np.asarray(partial)[:, 1:], np.asarray(z0)[:, 1:])
  assert not np.array_equal(np.asarray(partial)[:, 0], np.asarray(z0)[:, 0])


def test_one_compilation_serves_every_schedule_of_a_shape():
  traces = []

  def velocity_fn(z, t, scale):
    traces.append(1)          # runs only while tracing, i.e. once per compilation
    return scale * z

  sampler = samplers.Sampler(velocity_fn)
  mask = np.zeros((4, 4)); mask[:2] = 1
  shape = (8, 4, 4, 1)
  x = jnp.ones(shape)
  for tau in (schedules.synchronous(6, 4, 4), schedules.inpainting(mask, 6),
              schedules.progressive(mask, 2, 3)):
    sampler(tau, key=jax.random.key(0), x=x, eta=0.25, scale=jnp.float32(0.5))
  sampler(schedules.synchronous(6, 4, 4), key=jax.random.key(1), x=x, eta=0.0,
          scale=jnp.float32(0.1))
  assert len(traces) == 1
  sampler(schedules.synchronous(7, 4, 4), key=jax.random.key(0), x=x,
          scale=jnp.float32(0.5))  # a new step count compiles again
  assert len(traces) == 2


def test_sharded_sampling_equals_single_device():
  assert jax.device_count() == 8, "tests run with 8 host devices (tests/conftest.py)"
  mask = np.zeros((16, H, W)); mask[:, :, 0] = 1
  tau = schedules.progressive(mask, 2, 5)                 # batched [N+1, B, H, W]
  x = jax.random.normal(jax.random.key(9), (16, H, W, C))
  velocity_fn = lambda z, t, y: jnp.tanh(z) * t[..., None] + y[:, None, None, None]
  kwargs = dict(key=jax.random.key(8), x=x, eta=0.25, y=jnp.arange(16.0))
  sharded = samplers.Sampler(velocity_fn, mesh=sharding.sampling_mesh())   # 8 devices
  single = samplers.Sampler(velocity_fn, mesh=None)
  a, b = sharded(tau, **kwargs), single(tau, **kwargs)
  assert len(a.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bad_schedules_and_inputs_raise():
  with pytest.raises(ValueError, match="increases in time at step 1 -> 2"):
    schedules.validate_schedule(np.array([[[1.0]], [[0.5]], [[0.7]], [[0.0]]]))
  with pytest.raises(ValueError, match="must end at 0"):
    schedules.validate_schedule(np.array([[[1.0]], [[0.5]]]))
  with pytest.raises(ValueError, match="values in"):
    schedules.validate_schedule(np.array([[[1.5]], [[0.0]]]))
  with pytest.raises(ValueError, match="only 0 and 1"):
    schedules.inpainting(np.full((3, 3), 0.5), 4)
  with pytest.raises(ValueError, match="spatial shape"):
    SAMPLER(schedules.synchronous(4, 4, 4), key=jax.random.key(0), shape=(2, H, W, C))
  with pytest.raises(ValueError, match="pass x"):
    SAMPLER(schedules.inpainting(np.eye(H), 4), key=jax.random.key(0), shape=(2, H, W, C))
  with pytest.raises(ValueError, match="eta"):
    SAMPLER(schedules.synchronous(4, H, W), key=jax.random.key(0), shape=(2, H, W, C), eta=2.0)


def _posterior_float64(x, z_t, t, s):
  """Mean and std of q(z_s | z_t, x) for z_u = (1 - u) x + u eps, by Gaussian conditioning.

  The forward process factorises as z_s = (1 - s) x + s e1 and z_t = a z_s + sd e2 with
  a = (1 - t) / (1 - s) and sd^2 = t^2 - a^2 s^2 (so that z_t has std t); (z_s, z_t) is
  jointly Gaussian given x and the conditional follows from its 2x2 covariance.
  """
  a = (1 - t) / (1 - s)
  var_s, cov_st = s ** 2, a * s ** 2
  var_t = a ** 2 * s ** 2 + (t ** 2 - a ** 2 * s ** 2)
  np.testing.assert_allclose(var_t, t ** 2)
  mean = (1 - s) * x + cov_st / var_t * (z_t - (1 - t) * x)
  return mean, np.sqrt(np.maximum(var_s - cov_st ** 2 / var_t, 0.0))


def test_stochastic_ddim_step_is_the_ddim_family_around_the_ddpm_posterior():
  """samplers.ddim_step at known x and eps against float64 references.

  For eta = 1 the step must be the DDPM posterior q(z_s | z_t, x) itself (mean and noise
  scale). For any eta, the DDIM family (Song et al. 2021, Eq. 12): noise scale
  c = eta * std of the posterior, and the mean alpha_s x + k (z_t - alpha_t x) with k
  fixed by keeping the marginal q(z_s | x) = N(alpha_s x, s^2): k^2 t^2 + c^2 = s^2.
  With the exact velocity v = eps - x the step's x_hat and eps_hat are exact, so the
  step's mean is its output at zero noise and its scale the change per unit noise.
  """
  rng = np.random.default_rng(11)
  ts = np.array([1.0, 1.0, 0.9, 0.9, 0.6, 0.5, 0.5, 0.3, 0.2, 0.05])
  ss = np.array([0.8, 0.0, 0.85, 0.3, 0.59, 0.25, 0.0, 0.1, 0.19, 0.01])
  shape = (2, 1, len(ts), 3)
  x, eps = rng.uniform(-1, 1, shape), rng.normal(size=shape)
  t = np.broadcast_to(ts, shape[:3]).astype(np.float64)
  s = np.broadcast_to(ss, shape[:3]).astype(np.float64)
  t4, s4 = t[..., None], s[..., None]
  z_t = (1 - t4) * x + t4 * eps
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  step = jax.jit(samplers.ddim_step)
  post_mean, post_std = _posterior_float64(x, z_t, t4, s4)
  for eta in (0.0, 0.25, 0.6, 1.0):
    args = (f32(z_t), f32(eps - x), f32(t), f32(s), jnp.float32(eta))
    mean = np.asarray(step(*args, jnp.zeros(shape, jnp.float32)), np.float64)
    scale = np.asarray(step(*args, jnp.ones(shape, jnp.float32)), np.float64) - mean
    c = eta * post_std
    k = np.sqrt(s4 ** 2 - c ** 2) / t4
    np.testing.assert_allclose(scale, np.broadcast_to(c, shape), atol=3e-6, err_msg=f"eta={eta}")
    np.testing.assert_allclose(mean, (1 - s4) * x + k * (z_t - (1 - t4) * x), atol=3e-6,
                               err_msg=f"eta={eta}")
    if eta == 1.0:
      np.testing.assert_allclose(mean, post_mean, atol=3e-6)
      np.testing.assert_allclose(scale, np.broadcast_to(post_std, shape), atol=3e-6)
