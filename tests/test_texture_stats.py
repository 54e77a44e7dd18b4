"""Texture statistics (evaluation/texture_stats.py) against NumPy/SciPy and constructed images."""

import jax
import numpy as np
import pytest
from scipy import stats

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.evaluation import texture_stats


def test_patches_are_the_raster_windows():
  x = np.random.default_rng(0).uniform(-1, 1, (2, 6, 7, 3)).astype(np.float32)
  p = np.asarray(texture_stats.patches(x, 3))
  assert p.shape == (2, 4 * 5, 27)
  for b in range(2):
    for i in range(4):
      for j in range(5):
        np.testing.assert_array_equal(p[b, i * 5 + j], x[b, i:i + 3, j:j + 3].reshape(-1))


def test_sliced_wasserstein_is_the_mean_of_scipys_1d_distances():
  rng = np.random.default_rng(1)
  a, b = rng.normal(size=(3, 40, 5)), rng.normal(1.0, 2.0, size=(3, 40, 5))
  d = rng.normal(size=(7, 5))
  d /= np.linalg.norm(d, axis=1, keepdims=True)
  got = np.asarray(texture_stats.sliced_wasserstein(a.astype(np.float32), b.astype(np.float32),
                                                    d.astype(np.float32)))
  ref = [np.mean([stats.wasserstein_distance(a[i] @ t, b[i] @ t) for t in d]) for i in range(3)]
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_patch_swd_known_answers():
  rng = np.random.default_rng(2)
  x = rng.uniform(-0.5, 0.5, (2, 8, 8, 3)).astype(np.float32)
  np.testing.assert_allclose(texture_stats.patch_swd(x, x, size=3), 0.0, atol=1e-7)
  # A constant shift c moves every projection by c * sum(theta): SW = c * mean |sum(theta)|.
  key = jax.random.key(5)
  d = np.asarray(texture_stats.random_directions(key, 64, 3 * 3 * 3))
  got = texture_stats.patch_swd(x, x + 0.25, size=3, num_directions=64, key=key)
  np.testing.assert_allclose(got, 0.25 * np.mean(np.abs(d.sum(1))), rtol=1e-5)
  # Position does not matter: stripes of period 2 shifted by one column hold the same
  # patches (10 columns, 3x3 patches: 8 windows a row, 4 starting on each phase).
  cols = np.where(np.arange(10) % 2 == 0, -0.8, 0.6).astype(np.float32)
  stripes = np.broadcast_to(cols[None, None, :, None], (1, 6, 10, 3))
  shifted = np.roll(stripes, 1, axis=2)
  np.testing.assert_allclose(texture_stats.patch_swd(stripes, shifted, size=3), 0.0, atol=1e-7)
  assert float(texture_stats.patch_swd(stripes, -stripes, size=3)[0]) > 0.1


def test_colour_w1_against_scipy_and_a_closed_form():
  rng = np.random.default_rng(3)
  x = rng.uniform(-1, 1, (2, 5, 6, 3)).astype(np.float32)
  y = np.tanh(rng.normal(size=(2, 5, 6, 3))).astype(np.float32)
  ref = [np.mean([stats.wasserstein_distance(x[b, ..., c].ravel(), y[b, ..., c].ravel())
                  for c in range(3)]) for b in range(2)]
  np.testing.assert_allclose(texture_stats.colour_w1(x, y), ref, rtol=1e-5)
  black, white = -np.ones((1, 4, 4, 3), np.float32), np.ones((1, 4, 4, 3), np.float32)
  np.testing.assert_allclose(texture_stats.colour_w1(black, white), [2.0])


def test_seam_against_numpy_and_constructed_images():
  rng = np.random.default_rng(4)
  x = rng.uniform(-1, 1, (3, 8, 5, 2)).astype(np.float32)
  out = {k: np.asarray(v) for k, v in texture_stats.seam(x, 4).items()}
  for b in range(3):
    seam = np.mean(np.abs(x[b, 4] - x[b, 3]))
    interior = np.mean([np.abs(x[b, i] - x[b, i - 1]).mean() for i in range(5, 8)])
    np.testing.assert_allclose(out["seam_l1"][b], seam, rtol=1e-6)
    np.testing.assert_allclose(out["interior_l1"][b], interior, rtol=1e-6)
    np.testing.assert_allclose(out["seam_ratio"][b], seam / interior, rtol=1e-6)
  # A ramp down the rows has no seam (ratio 1); the same ramp with a jump of 0.5 at the
  # seam row has seam_l1 = 0.5 + a and ratio (0.5 + a) / a.
  a = 0.05
  ramp = np.broadcast_to((a * np.arange(8, dtype=np.float32) - 0.5)[None, :, None, None],
                         (1, 8, 4, 3))
  np.testing.assert_allclose(texture_stats.seam(ramp, 4)["seam_ratio"], [1.0], rtol=1e-5)
  jump = ramp + np.where(np.arange(8) >= 4, 0.5, 0.0)[None, :, None, None].astype(np.float32)
  res = texture_stats.seam(jump, 4)
  np.testing.assert_allclose(res["seam_l1"], [0.5 + a], rtol=1e-5)
  np.testing.assert_allclose(res["seam_ratio"], [(0.5 + a) / a], rtol=1e-5)


def test_bad_inputs_are_refused():
  x = np.zeros((1, 8, 8, 3), np.float32)
  with pytest.raises(checks.InputError, match="same shape"):
    texture_stats.patch_swd(x, x[:, :4])
  with pytest.raises(checks.InputError, match="patch size 9"):
    texture_stats.patch_swd(x, x, size=9)
  with pytest.raises(checks.InputError, match="seam row 7"):
    texture_stats.seam(x, 7)
