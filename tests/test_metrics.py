"""Frechet distance, streaming statistics, PRDC, PSNR and SSIM against independent references."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import skimage.metrics

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.evaluation import metrics


def _random_cov(rng, d, rank=None):
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / d + (0.0 if rank else 0.1 * np.eye(d))


# ---------------------------------------------------------------------------- Frechet


def test_frechet_closed_form_for_commuting_covariances():
  # C1 = Q diag(a) Q^T, C2 = Q diag(b) Q^T commute: tr sqrt(C1 C2) = sum sqrt(a b).
  rng = np.random.default_rng(0)
  d = 12
  q, _ = np.linalg.qr(rng.normal(size=(d, d)))
  a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  exact = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2.0 * np.sqrt(a * b))
  got = metrics.frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
  np.testing.assert_allclose(got, exact, rtol=1e-10)
  # 1-d Gaussians: (m1 - m2)^2 + (s1 - s2)^2.
  np.testing.assert_allclose(metrics.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]), 9.0 + 1.0)


def test_frechet_agrees_with_scipy_sqrtm_formula_and_is_symmetric():
  rng = np.random.default_rng(1)
  f1 = rng.normal(size=(400, 32)) @ rng.normal(size=(32, 32))
  f2 = rng.normal(size=(300, 32)) * 1.5 + 0.3
  mu1, cov1 = np.mean(f1, 0), np.cov(f1, rowvar=False)
  mu2, cov2 = np.mean(f2, 0), np.cov(f2, rowvar=False)
  # pytorch-fid's formula (scipy sqrtm of the non-symmetric product).
  covmean = scipy.linalg.sqrtm(cov1 @ cov2).real
  ref = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * np.trace(covmean)
  got = metrics.frechet_distance(mu1, cov1, mu2, cov2)
  np.testing.assert_allclose(got, ref, rtol=1e-8)
  np.testing.assert_allclose(metrics.frechet_distance(mu2, cov2, mu1, cov1), got, rtol=1e-10)
  assert abs(metrics.frechet_distance(mu1, cov1, mu1, cov1)) < 1e-9 * np.trace(cov1)


def test_streaming_statistics_equal_two_pass_numpy():
  rng = np.random.default_rng(2)
  f = rng.normal(size=(1000, 24)) * rng.uniform(0.1, 5, 24) + 100.0   # large offset: Chan merge
  stats = metrics.FeatureStats()
  for chunk in np.array_split(f, [7, 8, 300, 301, 650]):              # uneven, incl. size 1
    stats.update(chunk.astype(np.float32))
  mu, cov = stats.mean_cov()
  f32 = f.astype(np.float32).astype(np.float64)
  np.testing.assert_allclose(mu, f32.mean(0), rtol=1e-12)
  np.testing.assert_allclose(cov, np.cov(f32, rowvar=False), rtol=1e-9, atol=1e-9)
  assert stats.n == 1000


def test_rank_deficient_statistics_warn_and_distance_stays_finite():
  rng = np.random.default_rng(3)
  d = 64
  with pytest.warns(RuntimeWarning, match="rank deficient"):
    mu1, cov1 = metrics.feature_statistics(rng.normal(size=(20, d)))
  with pytest.warns(RuntimeWarning, match="rank deficient"):
    mu2, cov2 = metrics.feature_statistics(rng.normal(size=(30, d)) + 0.5)
  fd = metrics.frechet_distance(mu1, cov1, mu2, cov2)
  # Reference: the trace term as the nuclear norm of sqrt(C1) sqrt(C2) (singular values).
  s1 = scipy.linalg.sqrtm(cov1).real
  s2 = scipy.linalg.sqrtm(cov2).real
  nuclear = np.linalg.svd(s1 @ s2, compute_uv=False).sum()
  ref = np.sum((mu1 - mu2) ** 2) + np.trace(cov1) + np.trace(cov2) - 2 * nuclear
  assert np.isfinite(fd)
  np.testing.assert_allclose(fd, ref, rtol=1e-5)
  with warnings.catch_warnings():
    warnings.simplefilter("error")                  # enough samples: no warning
    metrics.feature_statistics(rng.normal(size=(d + 1, d)))


def test_frechet_and_statistics_bad_input():
  with pytest.raises(checks.InputError, match="feature widths differ: 3 vs 4"):
    metrics.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
  with pytest.raises(checks.InputError, match="expected a mean"):
    metrics.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))
  with pytest.raises(checks.InputError, match="at least 2"):
    metrics.feature_statistics(np.zeros((1, 5)))
  stats = metrics.FeatureStats().update(np.zeros((3, 5)))
  with pytest.raises(checks.InputError, match="width 4 added to statistics of width 5"):
    stats.update(np.zeros((3, 4)))


# ---------------------------------------------------------------------------- PRDC


def _prdc_bruteforce(real, fake, k):
  """Naeem et al. 2020, Eq. 1-4, literally, in float64."""
  dist = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  d_rr, d_ff, d_rf = dist(real, real), dist(fake, fake), dist(real, fake)
  r_real = np.sort(d_rr, 1)[:, k]            # column 0 is the point itself
  r_fake = np.sort(d_ff, 1)[:, k]
  precision = np.mean([any(d_rf[i, j] < r_real[i] for i in range(len(real))) for j in range(len(fake))])
  recall = np.mean([any(d_rf[i, j] < r_fake[j] for j in range(len(fake))) for i in range(len(real))])
  density = np.mean([sum(d_rf[i, j] < r_real[i] for i in range(len(real))) for j in range(len(fake))]) / k
  coverage = np.mean([any(d_rf[i, j] < r_real[i] for j in range(len(fake))) for i in range(len(real))])
  return dict(precision=precision, recall=recall, density=density, coverage=coverage)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prdc_equals_bruteforce_definitions(k):
  rng = np.random.default_rng(10 + k)
  real = rng.normal(size=(120, 6))
  fake = rng.normal(size=(90, 6)) * 1.3 + 0.4
  got = metrics.prdc(real, fake, k=k, block=32)       # several blocks, last one padded
  ref = _prdc_bruteforce(real, fake, k)
  for name in ref:
    assert got[name] == pytest.approx(ref[name], abs=1e-12), name
  _assert_points_equal(metrics.prdc_per_sample(real, fake, k=k, block=32), real, fake, k)


def _assert_points_equal(got, real, fake, k):
  """prdc_per_sample's arrays against Naeem et al.'s definitions per point, in float64."""
  dist = lambda a, b: np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
  d_rf = dist(real, fake)
  r_real, r_fake = np.sort(dist(real, real), 1)[:, k], np.sort(dist(fake, fake), 1)[:, k]
  np.testing.assert_array_equal(got["real_balls"], (d_rf < r_real[:, None]).sum(0))
  np.testing.assert_array_equal(got["in_fake"], (d_rf < r_fake[None, :]).any(1))
  np.testing.assert_array_equal(got["covered"], (d_rf < r_real[:, None]).any(1))
  values = metrics.prdc_values(got, k)
  np.testing.assert_array_equal(values["density"], (d_rf < r_real[:, None]).sum(0) / k)
  np.testing.assert_array_equal(values["precision"], (d_rf < r_real[:, None]).any(0))


def test_prdc_identical_and_far_apart_sets():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(200, 8))
  same = metrics.prdc(x, x, k=5)
  # Every point is the centre of its own ball (distance 0 < radius): all four are 1.
  assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
  ref = _prdc_bruteforce(x, x, 5)
  assert same["density"] == pytest.approx(ref["density"], abs=1e-12)
  far = metrics.prdc(x, x + 1000.0, k=5)
  assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}


def test_prdc_inequalities_are_strict():
  # Lattice 0, 2, ..., 18 (every 1-NN radius is exactly 2) against its shift by 2: the
  # point 20 (fake) and the point 0 (real) sit exactly on a ball's boundary, outside.
  real = 2.0 * np.arange(10)[:, None]
  fake = real + 2.0
  got = metrics.prdc(real, fake, k=1)
  assert got == {"precision": 0.9, "recall": 0.9, "density": 0.9, "coverage": 0.9}
  assert got == pytest.approx(_prdc_bruteforce(real, fake, 1), abs=1e-12)


def test_prdc_bad_input():
  x = np.zeros((6, 3))
  with pytest.raises(checks.InputError, match="k=5 nearest neighbours need more than k samples"):
    metrics.prdc(x, np.zeros((5, 3)), k=5)
  with pytest.raises(checks.InputError, match="feature widths differ: real 3 vs fake 4"):
    metrics.prdc(x, np.zeros((6, 4)), k=2)


# ---------------------------------------------------------------------------- PSNR, SSIM


def test_psnr_and_ssim_against_closed_form_and_skimage():
  rng = np.random.default_rng(5)
  a = rng.uniform(-1, 1, size=(3, 24, 20, 2)).astype(np.float32)
  b = np.clip(a + rng.normal(scale=0.1, size=a.shape), -1, 1).astype(np.float32)
  a01, b01 = (a.astype(np.float64) + 1) / 2, (b.astype(np.float64) + 1) / 2
  mse = ((a01 - b01) ** 2).mean(axis=(1, 2, 3))
  np.testing.assert_allclose(np.asarray(metrics.psnr(a, b)), 10 * np.log10(1 / mse), rtol=1e-5)
  # skimage's mean SSIM already averages over the valid region (its border of 5 cropped),
  # which is what dm-pix's valid filtering computes.
  ref = [skimage.metrics.structural_similarity(
      a01[i], b01[i], channel_axis=-1, data_range=1.0, gaussian_weights=True, sigma=1.5,
      use_sample_covariance=False) for i in range(3)]
  np.testing.assert_allclose(np.asarray(metrics.ssim(a, b)), ref, atol=2e-4)
  assert np.all(np.asarray(metrics.ssim(a, a)) == pytest.approx(1.0, abs=1e-5))
  with pytest.raises(checks.InputError, match="smaller than the SSIM window"):
    metrics.ssim(a[:, :8, :8], b[:, :8, :8])


# ---------------------------------------------------------------------------- PRDC over a mesh


@pytest.mark.parametrize("devices, fsdp", [(8, 1), (3, 1), (8, 2)])
def test_prdc_sharded_over_a_mesh_equals_bruteforce_and_single_device(devices, fsdp):
  # 123 real and 77 fake rows divide neither the mesh (8 or 3 devices; a 4 x 2 mesh) nor
  # the block: the rows are padded per device, and padded rows must hold nothing. The
  # counts are integers: sharded and single-device results must be equal exactly
  # (a flip would need two float32 distances within rounding of each other).
  import jax
  from asyncpatch_jax.runtime import sharding
  rng = np.random.default_rng(21)
  real = rng.normal(size=(123, 6))
  fake = rng.normal(size=(77, 6)) * 1.3 + 0.4
  fake[0] = real.mean(0)        # where the (centred) zero padding rows sit: they must not count
  mesh = sharding.make_mesh(fsdp, jax.devices()[:devices])
  single = metrics.prdc(real, fake, k=3, block=16)
  ref = _prdc_bruteforce(real, fake, 3)
  for block in (16, 1024):                 # several blocks a device; one block a device
    sharded = metrics.prdc(real, fake, k=3, block=block, mesh=mesh)
    assert sharded == single
    _assert_points_equal(metrics.prdc_per_sample(real, fake, k=3, block=block, mesh=mesh),
                         real, fake, 3)
    for name in ref:
      assert sharded[name] == pytest.approx(ref[name], abs=1e-12), name
  # The program really is split over the mesh (one partition per device).
  real32, fake32 = (np.asarray(a, np.float32) for a in (real, fake))
  compiled = metrics._prdc.lower(real32, fake32, k=3, block=16, mesh=mesh).compile()
  assert f"num_partitions={devices}" in compiled.as_text()


def test_prdc_mesh_must_be_a_mesh():
  with pytest.raises(checks.InputError, match="expected a jax.sharding.Mesh"):
    metrics.prdc(np.zeros((6, 2)), np.zeros((6, 2)), k=2, mesh="data")
