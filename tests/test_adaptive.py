"""Schedule policies in the sampler (AsyncPatch Sec. 5.5, SRM, Patch Forcing) against
tensor schedules built independently in NumPy and the exact velocity field of Gaussian data."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.diffusion import gaussian
from asyncpatch_jax.diffusion import ipr
from asyncpatch_jax.diffusion import policies
from asyncpatch_jax.diffusion import samplers
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.runtime import sharding

H, W, C = 4, 4, 1
D = H * W * C


def _gaussian(h, w, seed=0):
  d = h * w
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(d, d)) / np.sqrt(d)
  return rng.normal(size=(h, w, 1)) * 0.5, a @ a.T + 0.2 * np.eye(d)


MEAN, COV = _gaussian(H, W)
MODEL = gaussian.GaussianVelocity(MEAN, COV)
# mesh=None: XLA:CPU can deadlock running the Gaussian field's LAPACK solve inside a loop
# over 8 fake host devices (tests/test_samplers.py).
SAMPLER = samplers.Sampler(MODEL)


def srm_schedule(groups: np.ndarray, order, budget: int, overlap: float) -> np.ndarray:
  """SRM's sequential schedule (Wewer et al. 2025) in NumPy: [budget + 1, H, W].

  Region order[j] starts at floor(j L (1 - overlap)) and goes 1 -> 0 in ceil(L) equal
  steps, L = budget / ((n - 1)(1 - overlap) + 1); the budget's last slice is 0.
  Times are computed as float32 1 - m / ceil(L), the value a float32 sampler holds.
  """
  n = len(order)
  length = budget / ((n - 1) * (1 - overlap) + 1)
  ramp = math.ceil(length - 1e-4)
  tau = np.ones((budget + 1, *groups.shape), np.float32)
  for j, region in enumerate(order):
    start = math.floor(j * length * (1 - overlap))
    for k in range(budget + 1):
      m = min(max(k - start, 0), ramp)
      tau[k][groups == region] = np.float32(1.0) - np.float32(m) / np.float32(ramp)
  tau[-1] = 0.0
  return tau


def test_srm_order_with_constant_uncertainty_is_the_tensor_schedule():
  # No uncertainty head: u = 0 everywhere, so SRM's choice "lowest mean sigma" is a tie
  # every time and goes to the lowest region id: the raster order of the 2x2 grid.
  budget, overlap = 9, 0.5                  # L = 9 / 2.5 = 3.6: 4 steps a region, starts 0,1,3,5
  groups = schedules.grid_regions(H, W, (2, 2))
  tau = srm_schedule(groups, [0, 1, 2, 3], budget, overlap)
  key = jax.random.key(3)
  ref = SAMPLER(tau, key=key, shape=(64, H, W, C), eta=0.25)
  out = SAMPLER(policies.uncertainty_ordered((2, 2), overlap), key=key, shape=(64, H, W, C),
                budget=budget, eta=0.25, return_history=True)
  times = np.asarray(out.history["times"])
  np.testing.assert_array_equal(times, np.broadcast_to(tau[:, None], times.shape))
  np.testing.assert_allclose(np.asarray(out.samples), np.asarray(ref), atol=1e-6)
  np.testing.assert_array_equal(out.steps, np.broadcast_to((np.diff(tau, axis=0) < 0).sum(0),
                                                           (64, H, W)))
  assert (np.asarray(out.evaluations) == budget).all()


def test_schedule_policy_with_known_pixels_is_the_tensor_sampler():
  mask = np.zeros((H, W), np.float32)
  mask[:, 0] = 1.0
  tau = schedules.progressive(mask, 3, 3)                  # 9 steps, known column at 0
  rng = np.random.default_rng(1)
  x = rng.normal(size=(64, H, W, C)).astype(np.float32)
  key = jax.random.key(4)
  ref = np.asarray(SAMPLER(tau, key=key, x=x, eta=0.25))
  out = SAMPLER(policies.schedule(tau), key=key, x=x, known=mask, budget=9, eta=0.25)
  np.testing.assert_allclose(np.asarray(out.samples), ref, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(out.samples)[:, mask == 1], x[:, mask == 1])
  np.testing.assert_array_equal(out.steps[0], (np.diff(tau, axis=0) < 0).sum(0))


def test_region_statistics_against_numpy():
  rng = np.random.default_rng(3)
  regions = schedules.grid_regions(4, 6, (2, 3))
  values = rng.normal(size=(5, 4, 6))
  weight = (rng.uniform(size=(5, 4, 6)) < 0.7).astype(np.float32)
  mean, wsum = policies.region_mean(jnp.asarray(values, jnp.float32), jnp.asarray(weight),
                                    jnp.asarray(regions))
  for b in range(5):
    for r in range(6):
      sel = (regions == r) & (weight[b] > 0)
      assert wsum[b, r] == sel.sum()
      if sel.any():
        np.testing.assert_allclose(mean[b, r], values[b][sel].mean(), rtol=1e-5)
  score = rng.normal(size=(5, 7))
  valid = rng.uniform(size=(5, 7)) < 0.6
  valid[0] = True
  for q in (0.0, 0.4, 0.5, 1.0):
    got = np.asarray(policies.region_quantile(jnp.asarray(score, jnp.float32), jnp.asarray(valid), q))
    for b in range(5):
      if valid[b].any():
        np.testing.assert_allclose(got[b], np.quantile(score[b][valid[b]], q), rtol=1e-5)
  ranks, count = policies.region_ranks(jnp.asarray(score), jnp.asarray(valid))
  for b in range(5):
    order = np.argsort(np.where(valid[b], score[b], np.inf), kind="stable")
    np.testing.assert_array_equal(np.asarray(ranks)[b][order], np.arange(7))
    assert count[b] == valid[b].sum()


# ------------------------------------------------------------------ synchronous limits


HS, WS = 3, 3
MEAN_S, COV_S = _gaussian(HS, WS, seed=1)
MODEL_S = gaussian.GaussianVelocity(MEAN_S, COV_S)


def _clean_content_uncertainty(z, t, v):
  """A sample-dependent uncertainty that reads only the already clean pixels (t = 0):
  each column gets a different weight, so which column is 'certain' depends on the sample."""
  clean = jnp.sum(jnp.where(t[..., None] == 0, z, 0.0), axis=(1, 2, 3))      # [B]
  col = jnp.arange(t.shape[2], dtype=jnp.float32)
  return jnp.exp(jnp.sin(clean[:, None, None] * (1.0 + col)[None, None, :]) + 0 * t)


def _noisy_uncertainty(z, t, v):
  """A sample-dependent uncertainty that reads the current noisy sample itself."""
  return jnp.exp(jnp.tanh(z[..., 0] + v[..., 0]))


N_MC = 4096


def _assert_gaussian(x, mean, cov, discretisation=0.03):
  """Sample moments of x against N(mean, cov), per entry within 4 Monte Carlo standard
  errors (se(mean_i) = sqrt(C_ii / n), se(C_ij) = sqrt((C_ii C_jj + C_ij^2) / n)) plus a
  relative allowance for the discretisation error of ~100 DDIM steps a pixel (~3 %)."""
  flat = np.asarray(x, np.float64).reshape(x.shape[0], -1)
  n, d = flat.shape
  var = np.diag(cov)
  scale = np.sqrt(np.outer(var, var))
  mean_err = np.abs(flat.mean(0) - mean.reshape(-1))
  assert (mean_err <= 4 * np.sqrt(var / n) + discretisation * np.sqrt(var)).all(), mean_err
  err = np.abs(np.cov(flat, rowvar=False) - cov)
  tol = 4 * np.sqrt((scale ** 2 + cov ** 2) / n) + discretisation * scale
  assert (err <= tol).all(), (err / tol).max()


@pytest.mark.parametrize("policy", [policies.uncertainty_accelerated(speedup=1.0),
                                    policies.look_ahead(factor=1.0, quantile=0.4),
                                    policies.dual_loop(sub_steps=1, quantile=0.4)],
                         ids=lambda p: p.name)
def test_sample_dependent_policies_in_the_synchronous_limit_give_the_gaussian(policy):
  sampler = samplers.Sampler(MODEL_S, uncertainty_fn=_noisy_uncertainty)
  budget, key = 100, jax.random.key(5)
  out = sampler(policy, key=key, shape=(N_MC, HS, WS, 1), budget=budget, eta=0.25)
  ref = samplers.Sampler(MODEL_S)(schedules.synchronous(budget, HS, WS), key=key,
                                  shape=(N_MC, HS, WS, 1), eta=0.25)
  # The same steps as the tensor schedule 1 - k/N (to float32 rounding of the times).
  np.testing.assert_allclose(np.asarray(out.samples), np.asarray(ref), atol=2e-5)
  assert (np.asarray(out.steps) == budget).all()
  # And the marginal is N(mu, Sigma).
  _assert_gaussian(out.samples, MEAN_S, COV_S)


def test_sample_dependent_srm_order_gives_the_gaussian():
  # Overlap 0: each column is generated completely before the next one is chosen, and the
  # choice reads only clean pixels, so the chain rule holds for every order: the
  # marginal is exactly N(mu, Sigma) up to the discretisation of 100 steps a column.
  sampler = samplers.Sampler(MODEL_S, uncertainty_fn=_clean_content_uncertainty)
  out = sampler(policies.uncertainty_ordered((1, 3), overlap=0.0), key=jax.random.key(6),
                shape=(N_MC, HS, WS, 1), budget=300, eta=0.25, return_history=True)
  times = np.asarray(out.history["times"])[:, :, 0, :]               # [301, B, columns]
  starts = (times < 1).argmax(axis=0) - 1                             # [B, 3] start steps
  np.testing.assert_array_equal(np.sort(starts, axis=1), np.broadcast_to([0, 100, 200],
                                                                          starts.shape))
  # The first column is a tie (nothing is clean yet: column 0); the others depend on it.
  second = np.argsort(starts, axis=1)[:, 1]
  assert 0.2 < np.mean(second == 1) < 0.8, np.mean(second == 1)
  _assert_gaussian(out.samples, MEAN_S, COV_S)


# -------------------------------------------------------------------------- invariants

TRACES = []
B = 16                                   # divisible by the 8 test devices


def _toy_velocity(z, t, y):
  TRACES.append(1)                       # runs only while tracing, i.e. once per compilation
  return jnp.tanh(z) * (0.5 + t[..., None]) + y[:, None, None, None]


def _toy_uncertainty(z, t, v, u_map, mix):
  """mix = 0: a sample-dependent uncertainty read from the noisy sample; mix = 1: a given map."""
  return mix * u_map + (1.0 - mix) * jnp.exp(jnp.tanh(z[..., 0] + v[..., 0]))


# One sampler and one call signature (batch 16, debug on, a 32-step history buffer) for all
# toy tests, so each policy function compiles once for the whole module (budgets <= 32).
TOY = samplers.Sampler(_toy_velocity, uncertainty_fn=_toy_uncertainty, mesh=None)


def toy(policy, budget, *, key=0, known=None, x=None, u_map=None, eta=0.25,
        sampler=TOY, **kw):
  if x is None:
    x = np.zeros((B, H, W, C), np.float32)
  mix = 0.0 if u_map is None else 1.0
  u_map = np.ones((H, W)) if u_map is None else u_map
  return sampler(policy, key=jax.random.key(key), x=x, known=known, budget=budget, eta=eta,
                 return_history=32, debug=True, y=jnp.linspace(-0.2, 0.2, B),
                 uncertainty_cond={"u_map": jnp.asarray(u_map, jnp.float32),
                                   "mix": jnp.float32(mix)}, **kw)


BUILT_INS = [policies.uncertainty_accelerated(speedup=3.0, grid=(2, 2)),
             policies.uncertainty_ordered(grid=(2, 2), overlap=0.3),
             policies.look_ahead(factor=1.4, quantile=0.4),
             policies.dual_loop(sub_steps=4, quantile=0.4, grid=(4, 2))]


def _known_masks(rng):
  known = np.zeros((B, H, W), np.float32)
  known[1, :2, :2] = 1                                 # a known 2x2 patch
  known[2, :, 0] = 1                                   # a known column
  known[3] = rng.integers(0, 2, (H, W))                # scattered known pixels
  known[4] = 1                                         # nothing to generate
  return known


@pytest.mark.parametrize("policy", BUILT_INS, ids=lambda p: p.name)
def test_policies_keep_the_sampler_invariants(policy):
  rng = np.random.default_rng(7)
  budget = 12
  known = _known_masks(rng)
  x = rng.normal(size=(B, H, W, C)).astype(np.float32)
  out = toy(policy, budget, key=8, x=x, known=known, eta=0.5)
  times = np.asarray(out.history["times"])
  n = int(out.history["num_steps"])
  assert n <= budget and (times[n:] == 0).all()
  assert (np.diff(times[:n + 1], axis=0) <= 0).all()          # times never increase
  assert (times[n] == 0).all()                                # all clean within the budget
  assert (times[:, known == 1] == 0).all()
  samples = np.asarray(out.samples)
  np.testing.assert_array_equal(samples[known == 1], x[known == 1])  # bit-identical
  # Step counts: the steps in which the pixel's time changed.
  np.testing.assert_array_equal(out.steps, (np.diff(times[:n + 1], axis=0) < 0).sum(0))
  assert (np.asarray(out.steps)[known == 0] >= 1).all()
  # Evaluations: steps until the image's last pixel reached 0 (0 if nothing to generate).
  done = [0 if known[i].all() else (times[1:n + 1, i] == 0).all(axis=(1, 2)).argmax() + 1
          for i in range(B)]
  np.testing.assert_array_equal(out.evaluations, done)


def _slow(state, params):
  return state.t * params["factor"]


def test_the_last_step_of_the_budget_finishes_every_pixel():
  # A policy that never reaches 0 by itself (t -> 0.9 t): the budget's last step does.
  out = toy(policies.custom(_slow, factor=0.9), 5)
  times = np.asarray(out.history["times"])[:6, 0, 0, 0]
  np.testing.assert_allclose(times, [1, 0.9, 0.81, 0.729, 0.6561, 0], rtol=1e-6)
  assert (np.asarray(out.steps) == 5).all() and (np.asarray(out.evaluations) == 5).all()


def test_srm_order_follows_the_uncertainty():
  # u decreases with the region id: SRM starts the region with the lowest mean sigma, so
  # the 2x2 grid is generated in reverse raster order (region 3 first, then 2, 1, 0).
  groups = schedules.grid_regions(H, W, (2, 2))
  out = toy(policies.uncertainty_ordered((2, 2), 0.0), 8, u_map=4.0 - groups)
  expected = srm_schedule(groups, [3, 2, 1, 0], 8, 0.0)
  np.testing.assert_array_equal(np.asarray(out.history["times"])[:9, 0], expected)


def test_accelerated_gives_certain_regions_fewer_steps():
  # Left half certain (u = 0.01), right half uncertain (u = 1), budget 12, speedup 3:
  # the certain half moves 3/12 a step (4 steps), the uncertain one 1/12 (12 steps).
  u_map = np.where(np.arange(W) < W // 2, 0.01, 1.0) * np.ones((H, 1))
  out = toy(policies.uncertainty_accelerated(3.0), 12, u_map=u_map)
  steps = np.asarray(out.steps)
  assert (steps[:, :, :2] == 4).all() and (steps[:, :, 2:] == 12).all()


def test_dual_loop_gives_uncertain_regions_sub_steps():
  # 4 regions (columns), u increasing left to right, quantile 0.5 (threshold 2.5): columns
  # 0-1 are certain at every outer step (1 step each), columns 2-3 take 4 sub-steps each.
  out = toy(policies.dual_loop(4, 0.5, grid=(1, 4)), 12,
            u_map=np.ones((H, 1)) * (1.0 + np.arange(W)))
  steps = np.asarray(out.steps)
  assert (steps[:, :, :2] == 3).all() and (steps[:, :, 2:] == 12).all()
  times = np.asarray(out.history["times"])[:, 0, 0]
  np.testing.assert_allclose(times[:5, 0], [1, 2 / 3, 2 / 3, 2 / 3, 2 / 3], atol=1e-6)
  np.testing.assert_allclose(times[:5, 3], [1, 11 / 12, 10 / 12, 9 / 12, 8 / 12], atol=1e-6)


def test_look_ahead_runs_certain_regions_ahead_of_the_clock():
  # Column 0 is certain (below the 0.25-quantile of the 4 columns' uncertainty): its
  # progress is 1.4 times the clock's; the others follow the clock 1 - k/10.
  out = toy(policies.look_ahead(1.4, 0.25, grid=(1, 4)), 10,
            u_map=np.where(np.arange(W) < 1, 0.01, 1.0) * np.ones((H, 1)))
  times = np.asarray(out.history["times"])[:11, 0, 0]
  clock = 1 - np.arange(11) / 10
  np.testing.assert_allclose(times[:, 0], np.maximum(1 - 1.4 * (1 - clock), 0), atol=1e-6)
  np.testing.assert_allclose(times[:, 1:], np.repeat(clock[:, None], 3, 1), atol=1e-6)


def test_one_compilation_serves_every_parameter_value_key_grid_and_budget():
  for policy in BUILT_INS:
    toy(policy, 12)                   # compiled here or by an earlier test
  before = len(TRACES)
  calls = [(policies.uncertainty_ordered((4, 4), 0.5), 20), (policies.uncertainty_ordered((1, 2), 0.9), 11),
           (policies.uncertainty_accelerated(2.0), 8), (policies.uncertainty_accelerated(5.0, (2, 2)), 30),
           (policies.look_ahead(1.2, 0.1, (2, 2)), 8), (policies.look_ahead(2.0, 0.9, (2, 4)), 9),
           (policies.dual_loop(2, 0.1, (4, 1)), 13), (policies.dual_loop(3, 0.7), 7)]
  for i, (policy, budget) in enumerate(calls):
    toy(policy, budget, key=i, eta=0.1 * (i % 3), u_map=np.full((H, W), 0.5 + i))
  assert len(TRACES) == before        # none of these traced (compiled) again


def test_sharded_adaptive_sampling_equals_single_device():
  assert jax.device_count() == 8, "tests run with 8 host devices (tests/conftest.py)"
  known = np.zeros((B, H, W), np.float32)
  known[::3, :, :1] = 1
  x = np.asarray(jax.random.normal(jax.random.key(9), (B, H, W, C)))
  sharded = samplers.Sampler(_toy_velocity, uncertainty_fn=_toy_uncertainty,
                             mesh=sharding.sampling_mesh())
  for policy in (BUILT_INS[0], BUILT_INS[1]):
    a = toy(policy, 12, key=10, x=x, known=known, sampler=sharded)
    s = toy(policy, 12, key=10, x=x, known=known)
    assert len(a.samples.sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(a.samples), np.asarray(s.samples), atol=1e-5)
    np.testing.assert_array_equal(a.steps, s.steps)
    np.testing.assert_array_equal(a.evaluations, s.evaluations)


def test_ipr_regenerates_its_regions_in_srm_order():
  # IPR (Alg. 1) with the sequential backbone's order: each round regenerates
  # floor(alpha (N - |C|)) = 2 of the 3 free 2x2 regions, one after the other in the order
  # of the (given) uncertainty, and leaves the rest bit-identical.
  refiner = ipr.Refiner(_toy_velocity, uncertainty_fn=_toy_uncertainty)
  regions = schedules.grid_regions(H, W, (2, 2))
  x0 = np.asarray(jax.random.normal(jax.random.key(11), (B, H, W, C)))
  kw = dict(key=jax.random.key(12), regions=regions, num_rounds=3, alpha=0.7, num_steps=4,
            condition=[1, 0, 0, 0], eta=0.25, y=jnp.zeros(B),
            policy=policies.uncertainty_ordered(None, overlap=0.5),
            uncertainty_cond={"u_map": jnp.asarray(4.0 - regions, jnp.float32),
                              "mix": jnp.float32(1.0)})
  _, history, selected = refiner.refine(x0, return_history=True, **kw)
  history, selected = np.asarray(history), np.asarray(selected)
  assert (selected.sum(-1) == 2).all() and not selected[..., 0].any()
  for r in range(3):
    changed = np.any(history[r + 1] != history[r], axis=-1)               # [B, H, W]
    np.testing.assert_array_equal(changed, selected[r][:, regions])
  with pytest.raises(checks.InputError, match="budget of 2 steps is smaller than the 3"):
    refiner.refine(x0, **{**kw, "num_steps": 2})


# ------------------------------------------------------------------------- bad input


def _increasing(state, params):
  return jnp.where(state.step > 1, jnp.minimum(state.t + 0.1, 1.0), state.t * 0.5)


def _moves_known(state, params):
  return jnp.full_like(state.t, 0.5) * (1.0 - state.step.astype(jnp.float32) / 8.0)


def test_bad_policies_and_budgets_raise():
  with pytest.raises(checks.InputError, match="returned increasing times at step 2"):
    toy(policies.custom(_increasing), 6)
  known = np.zeros((H, W)); known[0, 0] = 1
  with pytest.raises(checks.InputError, match="moved known pixels .* at step 0"):
    toy(policies.custom(_moves_known), 6, known=known)
  # 16 regions one after another need 16 steps (overlap 0), or 15 + 1/(1 - 0.75) = 19.
  with pytest.raises(checks.InputError, match="budget of 15 steps is smaller than the 16"):
    toy(policies.uncertainty_ordered((4, 4), 0.0), 15)
  with pytest.raises(checks.InputError, match="smaller than the 19 it needs for 16"):
    toy(policies.uncertainty_ordered((4, 4), 0.75), 18)
  # Known regions do not count: 12 unknown regions need 12 steps.
  known = np.zeros((H, W)); known[0] = 1
  toy(policies.uncertainty_ordered((4, 4), 0.0), 12, known=known)
  with pytest.raises(checks.InputError, match="needs for 12 unknown"):
    toy(policies.uncertainty_ordered((4, 4), 0.0), 11, known=known)
  with pytest.raises(checks.InputError, match="smaller than the 4"):
    toy(policies.dual_loop(4), 3)
  with pytest.raises(checks.InputError, match="Unknown policy 'uncertainty_orderd'.*Did you mean"):
    policies.get("uncertainty_orderd")
  with pytest.raises(checks.InputError, match="overlap=1.0"):
    policies.uncertainty_ordered((2, 2), 1.0)
  with pytest.raises(checks.InputError, match="speedup"):
    policies.uncertainty_accelerated(0.5)
  with pytest.raises(checks.InputError, match="not divisible"):
    toy(policies.uncertainty_ordered((3, 3)), 9)
  with pytest.raises(checks.InputError, match="known has shape"):
    toy(policies.look_ahead(), 4, known=np.zeros((3, 3)))
  with pytest.raises(checks.InputError, match="no uncertainty_fn"):
    samplers.Sampler(_toy_velocity)(policies.look_ahead(), key=jax.random.key(0),
                                    shape=(2, H, W, C), budget=4, y=jnp.zeros(2),
                                    uncertainty_cond={"a": 1})
