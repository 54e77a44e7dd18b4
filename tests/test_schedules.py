"""Spatial schedules against their closed forms (AsyncPatch Sec. 3.2, Growing Images Sec. 2-3)."""

import numpy as np
import pytest

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.diffusion import schedules


def test_synchronous_and_inpainting_closed_forms():
  tau = schedules.synchronous(4, 2, 3)
  np.testing.assert_allclose(tau[:, 0, 0], [1, 0.75, 0.5, 0.25, 0])
  mask = np.array([[1, 0], [0, 1]])
  tau = schedules.inpainting(mask, 5)
  u = np.arange(6) / 5
  np.testing.assert_allclose(tau, (1 - mask)[None] * (1 - u)[:, None, None], atol=1e-7)


def test_autoregressive_matches_the_papers_piecewise_linear_tau():
  h = w = 4
  grid, spg = (2, 2), 3
  tau = schedules.autoregressive(h, w, grid, spg)
  K = 4
  n = K * spg
  assert tau.shape == (n + 1, h, w)
  for i in range(h):
    for j in range(w):
      k = (i // 2) * 2 + j // 2 + 1          # raster order, 1-based
      u = np.arange(n + 1) / n
      ref = np.clip(K * (k / K - u), 0.0, 1.0)  # AsyncPatch Sec. 3.2
      np.testing.assert_allclose(tau[:, i, j], ref, atol=1e-6)


@pytest.mark.parametrize("ph, pw", [(2, 2), (3, 2)])
def test_autoregressive_closed_form_on_a_non_square_grid(ph, pw):
  """A 2 x 3 grid of ph x pw patches (4 x 6 and 6 x 6 images): group k = 1..6 in raster
  order (row-major over the patch grid) follows tau_k(u) = clip(K (k/K - u), 0, 1),
  u = n / N (AsyncPatch Sec. 3.2), against float64."""
  rows, cols, spg = 2, 3, 4
  K = rows * cols
  n = K * spg
  tau = schedules.autoregressive(rows * ph, cols * pw, (rows, cols), spg)
  assert tau.shape == (n + 1, rows * ph, cols * pw) and tau.dtype == np.float32
  u = np.arange(n + 1, dtype=np.float64) / n
  k = (np.arange(rows * ph)[:, None] // ph) * cols + np.arange(cols * pw)[None, :] // pw + 1
  ref = np.clip(K * (k[None] / K - u[:, None, None]), 0.0, 1.0)
  np.testing.assert_allclose(tau, ref, rtol=0, atol=1e-7)
  assert k[ph, 0] == 4 and k[0, pw] == 2                       # raster order over patches


def test_progressive_fills_stripes_from_the_boundary_inward():
  mask = np.zeros((4, 8)); mask[:, :4] = 1     # left half known (Growing Images Sec. 2)
  groups = schedules.stripe_groups(mask, 2)
  np.testing.assert_array_equal(groups[0], [-1, -1, -1, -1, 0, 0, 1, 1])
  tau = schedules.progressive(mask, 2, 3)
  assert tau.shape == (7, 4, 8)
  np.testing.assert_allclose(tau[:, 0, 4], [1, 2 / 3, 1 / 3, 0, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(tau[:, 0, 7], [1, 1, 1, 1, 2 / 3, 1 / 3, 0], atol=1e-6)
  assert np.all(tau[:, :, :4] == 0)
  # K = 1 is plain inpainting.
  np.testing.assert_allclose(schedules.progressive(mask, 1, 5), schedules.inpainting(mask, 5))


def test_interleaved_visits_round_robin():
  mask = np.zeros((2, 6)); mask[:, :2] = 1
  tau = schedules.interleaved(mask, num_stripes=2, num_rounds=2, steps_per_visit=2)
  assert tau.shape == (9, 2, 6)
  near, far = tau[:, 0, 2], tau[:, 0, 5]
  np.testing.assert_allclose(near, [1, .75, .5, .5, .5, .25, 0, 0, 0], atol=1e-6)
  np.testing.assert_allclose(far, [1, 1, 1, .75, .5, .5, .5, .25, 0], atol=1e-6)


def test_outpainting_grows_outward_from_a_box():
  tau, mask = schedules.outpainting(6, 6, (2, 2, 2, 2), num_steps=4, num_bands=2)
  assert mask.sum() == 4 and np.all(tau[:, 2:4, 2:4] == 0)
  assert tau[2, 1, 2] == 0.0 and tau[2, 0, 0] == 1.0   # inner band done before the corner


def test_batched_masks_give_batched_schedules():
  masks = np.zeros((2, 4, 4)); masks[0, :, :2] = 1; masks[1, :2] = 1
  tau = schedules.progressive(masks, 2, 2)
  assert tau.shape == (5, 2, 4, 4)
  np.testing.assert_allclose(tau[:, 0], schedules.progressive(masks[0], 2, 2))


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="grid rows 3"):
    schedules.autoregressive(4, 4, (3, 1), 2)
  with pytest.raises(ValueError, match="no known pixel"):
    schedules.progressive(np.zeros((4, 4)), 2, 2)
  with pytest.raises(ValueError, match="does not fit"):
    schedules.box_mask(4, 4, (3, 3, 2, 2))
  with pytest.raises(ValueError, match="num_steps"):
    schedules.synchronous(0, 4, 4)
  with pytest.raises(ValueError, match=r"expected \[H, W\] or \[B, H, W\]"):
    schedules.inpainting(np.zeros(4), 3)


STUDY_STRIPES = (1, 2, 3, 4, 6, 8, 10)      # Growing Images Sec. 2


def _changing_steps(tau, row, col):
  """The steps k at which pixel (row, col) moves (tau[k+1] != tau[k]), by a plain loop."""
  return [k for k in range(tau.shape[0] - 1) if tau[k + 1, row, col] != tau[k, row, col]]


@pytest.mark.parametrize("steps", [1, 3])
def test_progressive_stripes_get_exactly_the_stated_steps(steps):
  h, w = 4, 32
  mask = np.zeros((h, w)); mask[:, :16] = 1                   # left half known, 16 wide hole
  for k in STUDY_STRIPES:
    tau = schedules.progressive(mask, k, steps)
    assert tau.shape[0] == k * steps + 1                      # K T network evaluations in all
    groups = schedules.stripe_groups(mask, k)[0]              # columns 16..31
    widths = np.bincount(groups[16:], minlength=k)
    assert widths.sum() == 16 and widths.min() >= 1 and widths.max() - widths.min() <= 1
    assert np.all(np.diff(groups[16:]) >= 0)                  # from the boundary inward
    for col in range(16, w):
      j = groups[col]                                         # stripe j moves in stage j only
      assert _changing_steps(tau, 0, col) == list(range(j * steps, (j + 1) * steps))
    counts = schedules.steps_per_pixel(tau)
    np.testing.assert_array_equal(counts[:, 16:], steps)
    np.testing.assert_array_equal(counts[:, :16], 0)
    np.testing.assert_array_equal(schedules.stripe_groups(mask, k), groups[None].repeat(h, 0))


def test_interleaved_stripes_get_rounds_times_visit_steps():
  mask = np.zeros((2, 32)); mask[:, :16] = 1
  rounds, visit = 3, 2
  for k in STUDY_STRIPES:
    tau = schedules.interleaved(mask, k, rounds, visit)
    assert tau.shape[0] == k * rounds * visit + 1
    groups = schedules.stripe_groups(mask, k)[0]
    for col in range(16, 32):
      j = groups[col]                                         # visit r of stripe j: stage r K + j
      ref = [(r * k + j) * visit + i for r in range(rounds) for i in range(visit)]
      assert _changing_steps(tau, 1, col) == ref
    np.testing.assert_array_equal(schedules.steps_per_pixel(tau)[:, 16:], rounds * visit)
    np.testing.assert_array_equal(schedules.steps_per_pixel(tau)[:, :16], 0)


def test_more_stripes_than_the_masked_width_is_refused():
  mask = np.zeros((2, 32)); mask[:, :16] = 1
  groups = schedules.stripe_groups(mask, 16)                  # one column each: allowed
  np.testing.assert_array_equal(groups[0, 16:], np.arange(16))
  for build in (lambda k: schedules.progressive(mask, k, 2),
                lambda k: schedules.interleaved(mask, k, 2, 1)):
    with pytest.raises(checks.InputError, match=r"num_stripes=17 is larger than the masked "
                       r"width.*16 pixel\(s\) deep.*num_stripes <= 16"):
      build(17)
  wide = np.zeros((2, 32)); wide[:, :12] = 1                  # a 20-wide hole takes K = 20
  batch = np.stack([wide, mask])
  assert schedules.stripe_groups(wide, 20).max() == 19
  with pytest.raises(checks.InputError, match=r"mask 1 of the batch: num_stripes=20"):
    schedules.progressive(batch, 20, 1)
  # allow_empty keeps the old behaviour (random masks of a benchmark): an empty stripe.
  tau = schedules.progressive(mask, 17, 2, allow_empty=True)
  assert tau.shape[0] == 35
  assert len(np.unique(schedules.stripe_groups(mask, 17, allow_empty=True)[0, 16:])) == 16


def test_known_regions_by_hand():
  """A 4 x 6 image in a (2, 3) grid of 2 x 2 regions; known: region 0 whole, one pixel of
  region 4, nothing else."""
  regions = schedules.grid_regions(4, 6, (2, 3))
  mask = np.zeros((4, 6))
  mask[:2, :2] = 1
  mask[3, 3] = 1
  full, partly = schedules.known_regions(regions, mask)
  assert full.tolist() == [True, False, False, False, False, False]
  assert partly.tolist() == [True, False, False, False, True, False]
  assert not schedules.known_regions(regions, None)[1].any()
