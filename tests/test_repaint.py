"""RePaint: the original jump schedule, convergence to the exact conditional Gaussian, compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.diffusion import gaussian
from asyncpatch_jax.diffusion import repaint
from asyncpatch_jax.runtime import sharding


def get_schedule_jump_reference(t_T, n_sample, jump_length, jump_n_sample, jump2_length=1,
                                jump2_n_sample=1, jump3_length=1, jump3_n_sample=1,
                                start_resampling=100000000):
  """RePaint's guided_diffusion/scheduler.py get_schedule_jump (andreas128/RePaint), all levels."""
  def fresh(length, n):
    return {j: n - 1 for j in range(0, t_T - length, length)}
  jumps, jumps2, jumps3 = (fresh(jump_length, jump_n_sample), fresh(jump2_length, jump2_n_sample),
                           fresh(jump3_length, jump3_n_sample))
  t, ts = t_T, []
  while t >= 1:
    t = t - 1
    ts.append(t)
    if t + 1 < t_T - 1 and t <= start_resampling:
      for _ in range(n_sample - 1):
        t = t + 1
        ts.append(t)
        if t >= 0:
          t = t - 1
          ts.append(t)
    if jumps3.get(t, 0) > 0 and t <= start_resampling - jump3_length:
      jumps3[t] -= 1
      for _ in range(jump3_length):
        t = t + 1
        ts.append(t)
    if jumps2.get(t, 0) > 0 and t <= start_resampling - jump2_length:
      jumps2[t] -= 1
      for _ in range(jump2_length):
        t = t + 1
        ts.append(t)
      jumps3 = fresh(jump3_length, jump3_n_sample)
    if jumps.get(t, 0) > 0 and t <= start_resampling - jump_length:
      jumps[t] -= 1
      for _ in range(jump_length):
        t = t + 1
        ts.append(t)
      jumps2 = fresh(jump2_length, jump2_n_sample)
      jumps3 = fresh(jump3_length, jump3_n_sample)
  ts.append(-1)
  return ts


@pytest.mark.parametrize("params", [(250, 10, 10), (20, 5, 3), (30, 10, 1), (12, 4, 2),
                                    (10, 10, 5), (100, 25, 4), (8, 1, 3)])
def test_jump_schedule_equals_the_original_algorithm(params):
  num_steps, jump_length, jump_n_sample = params
  ours = repaint.jump_schedule(num_steps, jump_length, jump_n_sample)
  ref = get_schedule_jump_reference(num_steps, 1, jump_length, jump_n_sample)
  assert ours.tolist() == ref


def test_default_schedule_counts():
  ts = repaint.jump_schedule()
  assert repaint.num_model_steps(ts) == 2410
  assert int(np.sum(ts[1:] > ts[:-1])) == 2160
  t = repaint.schedule_times(ts, 250)
  assert t[0] == 1.0 and t[-1] == 0.0
  np.testing.assert_allclose(np.abs(np.diff(t)), 1 / 250, rtol=1e-4)


def test_params_for_budget_spend_exactly_the_budget_with_the_most_steps():
  """For every budget up to 120 and jump length: the schedule, counted by jump_schedule,
  spends exactly the budget with a resampling, and no schedule at that jump length with
  more steps does (enumeration); 50 at jump length 5 is 20 / 5 / 3."""
  assert repaint.params_for_budget(50, 5) == (20, 5, 3)
  for jl in (1, 2, 5, 10):
    for budget in range(2, 121):
      spends = set()
      for ns in range(2 * jl, budget + 1, jl):
        for jn in range(2, budget + 2):         # the cost grows with jn: stop past the budget
          nfe = repaint.num_model_steps(repaint.jump_schedule(ns, jl, jn))
          spends |= {(ns, jn)} if nfe == budget else set()
          if nfe >= budget:
            break
      if not spends:
        with pytest.raises(checks.InputError, match="spends exactly"):
          repaint.params_for_budget(budget, jl)
        continue
      ns, got_jl, jn = repaint.params_for_budget(budget, jl)
      assert got_jl == jl and (ns, jn) in spends and ns == max(s for s, _ in spends)


H, W, C = 2, 2, 1
D = H * W * C


def _gaussian_problem():
  """Correlated unit-variance Gaussian pixels, left column known; the exact conditional in float64."""
  rng = np.random.default_rng(0)
  a = rng.normal(size=(D, D))
  cov = a @ a.T / D + 0.05 * np.eye(D)
  cov = cov / np.sqrt(np.outer(np.diag(cov), np.diag(cov)))    # correlations up to 0.58
  mean = rng.normal(size=(H, W, C)) * 0.5
  mask = np.zeros((H, W), np.float32)
  mask[:, 0] = 1.0
  known = mask.reshape(-1).astype(bool)
  x_ref = (mean.reshape(-1) + np.linalg.cholesky(cov) @ rng.normal(size=D)).reshape(H, W, C)
  mu = mean.reshape(-1)
  s_kk, s_uk = cov[np.ix_(known, known)], cov[np.ix_(~known, known)]
  cond_mean = mu[~known] + s_uk @ np.linalg.solve(s_kk, x_ref.reshape(-1)[known] - mu[known])
  cond_cov = cov[np.ix_(~known, ~known)] - s_uk @ np.linalg.solve(s_kk, s_uk.T)
  return gaussian.GaussianVelocity(mean, cov), mask, x_ref.astype(np.float32), known, cond_mean, cond_cov


def _w2_squared(m1, c1, m2, c2):
  """Squared 2-Wasserstein distance of two Gaussians, by scipy's sqrtm (independent of metrics.py)."""
  root = scipy.linalg.sqrtm(scipy.linalg.sqrtm(c2) @ c1 @ scipy.linalg.sqrtm(c2)).real
  return float(np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * root))


def test_resampling_approaches_the_exact_conditional_gaussian():
  """RePaint with the exact velocity field of N(mu, Sigma) vs the exact conditional.

  60 steps, jumps of 6, r = 1, 2, 4 resamplings: the W2 distance between the law of the
  inpainted pixels (Gaussian fit of 4096 samples) and the exact conditional falls at
  each doubling (measured 0.028, 0.013, 0.003). At a fixed step count the resampling
  chain has a discretisation fixed point (the covariance error stops falling near
  r = 8 here, and shrinks with more steps), so the test stops at r = 4.
  """
  model, mask, x_ref, known, cond_mean, cond_cov = _gaussian_problem()
  n = 4096
  x = np.broadcast_to(x_ref, (n, H, W, C))
  inpaint = repaint.RePaint(model)
  w2, mean_err = [], []
  for r in (1, 2, 4):
    out = np.asarray(inpaint(x, mask, key=jax.random.key(r), num_steps=60, jump_length=6,
                             jump_n_sample=r))
    np.testing.assert_array_equal(out[:, mask == 1], x[:, mask == 1])   # known pixels exact
    u = out.reshape(n, -1)[:, ~known].astype(np.float64)
    w2.append(_w2_squared(u.mean(0), np.cov(u, rowvar=False), cond_mean, cond_cov))
    mean_err.append(np.abs(u.mean(0) - cond_mean).max())
  # Monte Carlo floor of the W2^2 estimate at n = 4096: ~6e-4.
  assert w2[1] < 0.7 * w2[0] and w2[2] < 0.7 * w2[1] and w2[2] < 0.006, w2
  assert mean_err[0] > 0.1 and mean_err[2] < 0.07, mean_err


def _probe_run(velocity_fn, times, n=8192):
  """repaint_loop on [n, 1, 2, 1] images, pixel 0 known (= 0.8), with eta = 0."""
  x = jnp.full((n, 1, 2, 1), 0.8)
  mask = jnp.asarray(np.broadcast_to(np.array([[1.0, 0.0]]), (n, 1, 2)))
  key = jax.random.key(11)
  run = jax.jit(lambda t: repaint.repaint_loop(velocity_fn, t, x, mask, key, 0.0))
  out = np.asarray(run(jnp.asarray(times, jnp.float32)))[:, 0, :, 0]
  z0 = np.asarray(jax.random.normal(jax.random.fold_in(key, 0), x.shape))[:, 0, :, 0]
  return out, z0


def test_known_region_is_renoised_with_fresh_noise_at_every_model_step():
  # The velocity makes x_hat of the unknown pixel equal to the known pixel the model is
  # shown, so after the last step (t = 0.5 -> 0, eta = 0) the unknown pixel holds the
  # known one as injected at t = 0.5: (1 - t) x + t eps = N(0.4, 0.5^2), eps fresh.
  def copy_known(z, t):
    v_unknown = (z[:, :, 1:] - z[:, :, :1]) / t[:, :, 1:, None]
    return jnp.concatenate([jnp.zeros_like(v_unknown), v_unknown], axis=2)

  out, z0 = _probe_run(copy_known, [1.0, 0.5, 0.0])
  np.testing.assert_array_equal(out[:, 0], np.float32(0.8))
  assert out[:, 1].mean() == pytest.approx(0.4, abs=0.02)
  assert out[:, 1].std() == pytest.approx(0.5, abs=0.01)
  assert abs(np.corrcoef(out[:, 1], z0[:, 0])[0, 1]) < 0.04      # not the start noise
  assert abs(np.corrcoef(out[:, 1], z0[:, 1])[0, 1]) < 0.04


def test_steps_back_up_are_the_forward_transition():
  # v = 0 and eta = 0: a step down leaves z as is, so the unknown pixel after
  # 1 -> 0.5 (down), 0.5 -> 0.75 (up), 0.75 -> 0 (down) is the forward transition of its
  # start noise: ((1 - 0.75) / (1 - 0.5)) z0 + sqrt(0.75^2 - 0.5^2 0.5^2) xi.
  out, z0 = _probe_run(lambda z, t: jnp.zeros_like(z), [1.0, 0.5, 0.75, 0.0])
  slope, intercept = np.polyfit(z0[:, 1], out[:, 1], 1)
  assert slope == pytest.approx(0.5, abs=0.02) and abs(intercept) < 0.02
  assert np.std(out[:, 1] - slope * z0[:, 1]) == pytest.approx(np.sqrt(0.5), abs=0.015)


def test_one_compilation_per_schedule_length():
  traces = []

  def velocity_fn(z, t, scale):
    traces.append(1)                      # runs only while tracing
    return scale * z * t[..., None]

  inpaint = repaint.RePaint(velocity_fn)
  x = jnp.ones((4, 4, 4, 1))
  mask = np.zeros((4, 4)); mask[:, :2] = 1
  # (20, 5, 3) and (20, 10, 4) differ but both have 50 model steps and 30 steps up.
  assert len(repaint.jump_schedule(20, 5, 3)) == len(repaint.jump_schedule(20, 10, 4)) == 81
  assert repaint.jump_schedule(20, 5, 3).tolist() != repaint.jump_schedule(20, 10, 4).tolist()
  a = inpaint(x, mask, key=jax.random.key(0), num_steps=20, jump_length=5, jump_n_sample=3,
              scale=jnp.float32(0.5))
  inpaint(x, mask, key=jax.random.key(1), num_steps=20, jump_length=10, jump_n_sample=4,
          eta=0.3, scale=jnp.float32(0.2))
  assert len(traces) == 1
  inpaint(x, mask, key=jax.random.key(0), num_steps=20, jump_length=5, jump_n_sample=2,
          scale=jnp.float32(0.5))
  assert len(traces) == 2
  np.testing.assert_array_equal(np.asarray(a)[:, :, :2], 1.0)


def test_sharded_repaint_equals_single_device():
  velocity_fn = lambda z, t, y: jnp.tanh(z) * t[..., None] + y[:, None, None, None]
  x = jax.random.normal(jax.random.key(3), (16, 4, 4, 1))
  mask = np.zeros((16, 4, 4)); mask[:, :, 0] = 1
  kwargs = dict(key=jax.random.key(4), num_steps=6, jump_length=2, jump_n_sample=2,
                y=jnp.arange(16.0))
  a = repaint.RePaint(velocity_fn, mesh=sharding.sampling_mesh())(x, mask, **kwargs)
  b = repaint.RePaint(velocity_fn)(x, mask, **kwargs)
  assert len(a.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_bad_parameters_raise_before_compiling():
  with pytest.raises(checks.InputError, match="jump_length=3 must divide num_steps=10"):
    repaint.jump_schedule(10, 3, 2)
  with pytest.raises(checks.InputError, match="jump_n_sample=0; expected a positive integer"):
    repaint.jump_schedule(10, 5, 0)
  with pytest.raises(checks.InputError, match="num_steps=-4"):
    repaint.jump_schedule(-4, 2, 2)
  with pytest.raises(checks.InputError, match="jump_length=20 must divide num_steps=10"):
    repaint.jump_schedule(10, 20, 2)
  inpaint = repaint.RePaint(lambda z, t: z)
  with pytest.raises(checks.InputError, match="mask has shape"):
    inpaint(np.zeros((2, 4, 4, 1)), np.zeros((3, 3)), key=jax.random.key(0), num_steps=4,
            jump_length=2, jump_n_sample=1)
  with pytest.raises(checks.InputError, match="only 0 and 1"):
    inpaint(np.zeros((2, 4, 4, 1)), np.full((4, 4), 0.5), key=jax.random.key(0), num_steps=4,
            jump_length=2, jump_n_sample=1)
