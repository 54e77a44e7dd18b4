"""Iterative Partial Refinement against exact Gibbs moments of Gaussian data.

With the exact velocity field of N(mu, Sigma), one IPR round is a random-scan block
Gibbs update: the selected regions U are redrawn from N(mu_U + G (x_K - mu_K), S_U|K),
G = S_UK S_KK^-1. Its first two moments are linear in the previous ones, so the
moments after R rounds follow in float64 by enumerating every possible selection.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.diffusion import gaussian
from asyncpatch_jax.diffusion import ipr
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.runtime import sharding

H, W, C = 4, 4, 1
D = H * W * C
GRID = (2, 2)                                # N = 4 regions of 2x2 pixels
REGIONS = schedules.grid_regions(H, W, GRID)
N_SAMPLES = 8192
STEPS = 100


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  a = rng.normal(size=(D, D)) / np.sqrt(D)
  return rng.normal(size=D) * 0.5, a @ a.T + 0.2 * np.eye(D)


MEAN, COV = _problem()
# Single device: XLA:CPU can deadlock running the Gaussian field's LAPACK solve inside a
# scan over 8 fake host devices (see test_samplers.py).
REFINER = ipr.Refiner(gaussian.GaussianVelocity(MEAN.reshape(H, W, C), COV), mesh=None)


def _gibbs_moments(m, s2, subsets):
  """E[x'], E[x' x'^T] after one round that redraws a uniformly chosen subset."""
  flat_regions = REGIONS.reshape(-1)
  m_new, s2_new = np.zeros(D), np.zeros((D, D))
  for subset in subsets:
    u = np.isin(flat_regions, subset)
    k = ~u
    g = COV[np.ix_(u, k)] @ np.linalg.inv(COV[np.ix_(k, k)])
    a = np.zeros((D, D))
    a[np.ix_(k, k)] = np.eye(k.sum())
    a[np.ix_(u, k)] = g
    c = np.zeros(D)
    c[u] = MEAN[u] - g @ MEAN[k]
    q = np.zeros((D, D))
    q[np.ix_(u, u)] = COV[np.ix_(u, u)] - g @ COV[np.ix_(k, u)]
    am = a @ m
    m_new += am + c
    s2_new += a @ s2 @ a.T + np.outer(am, c) + np.outer(c, am) + np.outer(c, c) + q
  return m_new / len(subsets), s2_new / len(subsets)


def _reference(m0, s0, rounds, subsets):
  m, s2 = m0, s0 + np.outer(m0, m0)
  for _ in range(rounds):
    m, s2 = _gibbs_moments(m, s2, subsets)
  return m, s2 - np.outer(m, m)


def _assert_moments(x, m_ref, c_ref, free):
  """Sample mean and covariance of the pixels `free` within 5 Monte Carlo standard errors."""
  flat = np.asarray(x, np.float64).reshape(x.shape[0], -1)[:, free]
  m_ref, c_ref = m_ref[free], c_ref[np.ix_(free, free)]
  var = np.diag(c_ref)
  z_mean = (flat.mean(0) - m_ref) / np.sqrt(var / len(flat))
  se_cov = np.sqrt((np.outer(var, var) + c_ref ** 2) / len(flat))
  z_cov = (np.cov(flat, rowvar=False) - c_ref) / se_cov
  assert np.abs(z_mean).max() < 5, np.abs(z_mean).max()
  assert np.abs(z_cov).max() < 5, np.abs(z_cov).max()


def _start(seed=1):
  # x^(0) far from the target: N(1, 0.25^2 I).
  x0 = 1.0 + 0.25 * np.random.default_rng(seed).normal(size=(N_SAMPLES, H, W, C))
  return x0.astype(np.float32), np.ones(D), 0.25 ** 2 * np.eye(D)


@pytest.mark.slow
def test_rounds_are_exact_random_scan_gibbs_updates():
  x0, m0, s0 = _start()
  rounds = 3
  x = REFINER.refine(x0, key=jax.random.key(2), regions=REGIONS, num_rounds=rounds, alpha=0.25,
                     num_steps=STEPS, eta=0.25)
  # alpha = 0.25 of N = 4: one region per round (its complement would be three, so a
  # swapped mask would give other moments).
  m_ref, c_ref = _reference(m0, s0, rounds, [(r,) for r in range(4)])
  assert np.abs(c_ref - COV).max() > 0.5      # not yet mixed: the test sees the rounds
  _assert_moments(x, m_ref, c_ref, np.ones(D, bool))


@pytest.mark.slow
def test_condition_set_is_never_resampled_and_each_round_redraws_floor_alpha_regions():
  x0, m0, s0 = _start(seed=3)
  condition = np.array([True, False, False, False])          # C = {region 0}
  x, history, selected = REFINER.refine(
      x0, key=jax.random.key(4), regions=REGIONS, num_rounds=2, alpha=0.5, num_steps=STEPS,
      eta=0.25, condition=condition, return_history=True)
  history, selected = np.asarray(history), np.asarray(selected)
  np.testing.assert_array_equal(history[-1], np.asarray(x))
  np.testing.assert_array_equal(history[0], x0)
  given = REGIONS == 0
  np.testing.assert_array_equal(np.asarray(x)[:, given], x0[:, given])   # bit-identical
  # floor(0.5 * (4 - 1)) = 1 region per image and round, never region 0; exactly the
  # selected regions change, the others are carried over bit-identically (Eq. 5).
  assert selected.shape == (2, N_SAMPLES, 4)
  np.testing.assert_array_equal(selected.sum(-1), 1)
  assert not selected[..., 0].any()
  for r in range(2):
    changed = np.stack([(history[r + 1] != history[r])[:, REGIONS == k].any(axis=(1, 2))
                        for k in range(4)], axis=1)
    np.testing.assert_array_equal(changed, selected[r])
  # Each free region is chosen uniformly: 1/3 of the images each.
  np.testing.assert_allclose(selected[0].mean(0)[1:], 1 / 3, atol=0.03)
  # Moments of the free pixels: Gibbs given the fixed region-0 content. Region 0 keeps
  # its start law, so it enters the reference exactly as in the unconditioned case.
  m_ref, c_ref = _reference(m0, s0, 2, [(1,), (2,), (3,)])
  _assert_moments(x, m_ref, c_ref, ~given.reshape(-1))


def test_fixed_noise_and_fixed_regions_ablations():
  x0 = _start()[0][:64]
  key = jax.random.key(5)
  common = dict(key=key, regions=REGIONS, num_rounds=3, alpha=0.25, num_steps=8,
                eta=0.25, return_history=True)
  _, hist, sel = REFINER.refine(x0, fixed_noise=True, fixed_regions=True, **common)
  hist, sel = np.asarray(hist), np.asarray(sel)
  # Same regions, same noise, unchanged context: every later round repeats the first.
  np.testing.assert_array_equal(sel[0], sel[1])
  np.testing.assert_array_equal(hist[2], hist[1])
  np.testing.assert_array_equal(hist[3], hist[1])
  assert not np.array_equal(hist[1], hist[0])
  _, hist, sel2 = REFINER.refine(x0, fixed_regions=True, **common)
  np.testing.assert_array_equal(np.asarray(sel2)[0], np.asarray(sel2)[2])
  assert not np.array_equal(np.asarray(hist)[2], np.asarray(hist)[1])     # fresh noise
  _, _, sel3 = REFINER.refine(x0, **common)
  assert not np.array_equal(np.asarray(sel3)[0], np.asarray(sel3)[1])     # fresh regions
  # The first round does not depend on the options: same keys for round 1.
  np.testing.assert_array_equal(np.asarray(sel3)[0], sel[0])


def test_one_compilation_serves_every_alpha_condition_and_key():
  traces = []

  def velocity_fn(z, t, scale):
    traces.append(1)                     # runs only while tracing
    return scale * z

  refiner = ipr.Refiner(velocity_fn)     # 8 host devices: the batch is sharded
  x = jnp.ones((8, H, W, C))
  for alpha, cond, seed in ((0.25, None, 0), (0.5, [1, 0, 0, 0], 1), (1.0, [0, 0, 1, 1], 2)):
    refiner.refine(x, key=jax.random.key(seed), regions=REGIONS, num_rounds=2, alpha=alpha,
                   num_steps=4, condition=cond, scale=jnp.float32(0.5))
  assert len(traces) == 1
  refiner.refine(x, key=jax.random.key(0), regions=REGIONS, num_rounds=3, num_steps=4,
                 scale=jnp.float32(0.5))   # a new round count compiles again
  assert len(traces) == 2


def test_grid_regions_and_num_resampled():
  np.testing.assert_array_equal(schedules.grid_regions(4, 6, (2, 3)),
                                [[0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2],
                                 [3, 3, 4, 4, 5, 5], [3, 3, 4, 4, 5, 5]])
  sudoku = schedules.grid_regions(72, 72, (9, 9))
  assert sudoku[8 * 4 + 3, 8 * 7] == 4 * 9 + 7
  # floor(alpha (N - |C|)) for the paper's alpha = 0.25 and awkward float products.
  for alpha, n, c in ((0.25, 81, 26), (0.25, 81, 0), (0.29, 100, 0), (0.7, 10, 0), (1.0, 5, 2)):
    expected = (round(alpha * 100) * (n - c)) // 100
    assert int(ipr.num_resampled(alpha, n, c)) == expected


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.0), "alpha=0.0"),
    (dict(alpha=1.5), "alpha=1.5"),
    (dict(num_rounds=0), "num_rounds=0"),
    (dict(regions=np.zeros((3, 4), np.int32)), "regions has shape"),
    (dict(regions=np.where(REGIONS == 3, 5, REGIONS)), "every id 0..N-1"),
    (dict(regions=REGIONS.astype(float)), "integer region ids"),
    (dict(condition=[1, 0, 0]), "condition has shape"),
    (dict(condition=[1, 1, 1, 0], alpha=0.5), "no region would be resampled"),
    (dict(condition=[2, 0, 0, 0]), "booleans or 0/1"),
    (dict(eta=-0.1), "eta=-0.1"),
])
def test_bad_input_raises_before_compiling(kwargs, message):
  args = dict(key=jax.random.key(0), regions=REGIONS, num_rounds=1, alpha=0.25, num_steps=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
    REFINER.refine(np.zeros((2, H, W, C), np.float32), **args)
  with pytest.raises(ValueError, match="not divisible"):
    schedules.grid_regions(10, 10, (3, 3))


def test_sharded_refinement_equals_single_device():
  assert jax.device_count() == 8, "tests run with 8 host devices (tests/conftest.py)"

  def velocity_fn(z, t, scale):
    return scale * z + jnp.sin(z)[..., ::-1, :, :]         # couples pixels across regions

  x0 = jax.random.normal(jax.random.key(7), (16, H, W, C))
  args = dict(key=jax.random.key(8), regions=REGIONS, num_rounds=3, alpha=0.5, num_steps=5,
              eta=0.25, condition=np.eye(4, dtype=bool)[np.arange(16) % 4],
              scale=jnp.float32(0.3))
  sharded = ipr.Refiner(velocity_fn, mesh=sharding.sampling_mesh()).refine(x0, **args)
  single = ipr.Refiner(velocity_fn, mesh=None).refine(x0, **args)
  assert len(sharded.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)
