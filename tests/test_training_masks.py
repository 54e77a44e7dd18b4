"""Training masks of the localized autoencoder (data/training_masks.py), against exact references.

References: box_mask's hole-area distribution enumerated exactly over every union of its
documented boxes (1-3 boxes, sides uniform in [H/8, H/2], uniform positions); its
per-pixel hole probability in closed form; stroke_mask's holes against the analytic
distance to the documented polylines (independent of Pillow's rasterizer); the share of
masked samples against Binomial(num, fraction).
"""

import numpy as np
import pytest

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.data import training_masks as tm


def _side_law(n: int) -> tuple[np.ndarray, np.ndarray]:
  """Documented box side law on an axis of n pixels: sides uniform in [max(n//8, 1), max(n//2, 1)]."""
  sides = np.arange(max(n // 8, 1), max(n // 2, 1) + 1)
  return sides, np.full(sides.size, 1.0 / sides.size)


def _boxes_1d(n: int) -> list[tuple[int, int, float]]:
  """(start, side, probability) of every interval a box can cover on an axis of n pixels."""
  sides, p = _side_law(n)
  return [(s, b, pb / (n - b + 1)) for b, pb in zip(sides, p) for s in range(n - b + 1)]


def _exact_hole_area_law(h: int, w: int) -> np.ndarray:
  """P(hole area = a), a = 0..h*w, by enumeration of every 1-, 2- and 3-box union."""
  bits, probs = [], []
  for top, bh, ph in _boxes_1d(h):
    for left, bw, pw in _boxes_1d(w):
      m = np.zeros((h, w), bool)
      m[top:top + bh, left:left + bw] = True
      bits.append(int(np.packbits(m.ravel(), bitorder="little").view(np.uint16)[0]))
      probs.append(ph * pw)
  bits, probs = np.asarray(bits, np.int64), np.asarray(probs)
  assert abs(probs.sum() - 1.0) < 1e-12
  popcount = np.array([bin(i).count("1") for i in range(2 ** (h * w))])
  law = np.zeros(h * w + 1)
  for k in (1, 2, 3):                       # number of boxes, uniform on {1, 2, 3}
    union, p = bits, probs
    for _ in range(k - 1):
      union = (union[:, None] | bits[None, :]).ravel()
      p = (p[:, None] * probs[None, :]).ravel()
    law += np.bincount(popcount[union], weights=p, minlength=h * w + 1) / 3.0
  return law


def test_box_hole_area_distribution_matches_exact_enumeration():
  """4x4 (sides 1-2, 49 boxes, 49^3 triples): 20000 draws vs the exact law, 5 s.e. per bin."""
  h = w = 4
  law = _exact_hole_area_law(h, w)
  assert abs(law.sum() - 1.0) < 1e-12 and law[0] == 0.0
  n = 20000
  areas = np.array([(tm.box_mask(np.random.default_rng(s), h, w) == 0).sum() for s in range(n)])
  freq = np.bincount(areas, minlength=h * w + 1) / n
  se = np.sqrt(law * (1 - law) / n)
  np.testing.assert_array_less(np.abs(freq - law), 5 * se + 1e-9)
  assert abs(areas.mean() - (np.arange(h * w + 1) * law).sum()) < 0.05
  # The largest union: three 2x2 boxes cover at most 12 of the 16 pixels.
  assert law[13:].sum() == 0.0 and areas.max() <= 12


def test_box_per_pixel_hole_probability_matches_closed_form():
  """16x8 (not square: catches swapped axes): P(pixel hidden) = 1 - E_K (1 - p_row p_col)^K."""
  h, w, n = 16, 8, 4000

  def cover(size):                          # P(one box's interval covers index r), per r
    return np.array([sum(p for s, b, p in _boxes_1d(size) if s <= r < s + b) for r in range(size)])

  p1 = cover(h)[:, None] * cover(w)[None, :]
  expected = 1.0 - sum((1.0 - p1) ** k for k in (1, 2, 3)) / 3.0
  masks = np.stack([tm.box_mask(np.random.default_rng([7, s]), h, w) for s in range(n)])
  assert masks.dtype == np.float32 and set(np.unique(masks)) == {0.0, 1.0}
  freq = (masks == 0).mean(axis=0)
  se = np.sqrt(expected * (1 - expected) / n)
  np.testing.assert_array_less(np.abs(freq - expected), 5 * se)
  # Every hole spans at least the smallest documented side in each direction.
  for m in masks[:400]:
    rows, cols = np.nonzero(m == 0)
    assert rows.max() - rows.min() + 1 >= h // 8 and cols.max() - cols.min() + 1 >= w // 8


def _segment_distances(px: np.ndarray, a, b):
  """(distance to the closed segment ab, projection parameter, perpendicular distance)."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  d = b - a
  length2 = max(d @ d, 1e-12)
  u = ((px - a) @ d) / length2
  perp = np.linalg.norm(px - a - np.outer(u, d), axis=1)
  closest = a + np.outer(np.clip(u, 0.0, 1.0), d)
  return np.linalg.norm(px - closest, axis=1), u, perp


def _documented_strokes(rng: np.random.Generator, height: int, width: int):
  """The strokes of the module docstring, drawn in stroke_mask's order: [(points, width)]."""
  side, strokes = min(height, width), []
  for _ in range(int(rng.integers(1, 5))):                    # 1-4 strokes
    pts = [np.array([rng.uniform(0, width), rng.uniform(0, height)])]
    for _ in range(int(rng.integers(1, 5))):                  # 1-4 segments
      angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(side / 8, side / 2)
      step = length * np.array([np.cos(angle), np.sin(angle)])
      pts.append(np.clip(pts[-1] + step, 0, [width - 1, height - 1]))
    strokes.append((pts, int(rng.integers(max(side // 16, 1), max(side // 4, 1) + 1))))
  return strokes


def test_stroke_holes_match_the_analytic_polylines():
  """64x64 (widths 4-16): pixels inside a stroke are hidden, pixels outside known.

  The geometry reference is the Euclidean distance of each pixel centre to the polyline
  segments, drawn the way Pillow's documented wide line is: end points truncated to
  integers, (width - 1) / 2 either side of the centre line, flat ends, round joints
  (joint='curve'). Slack for the rasterization: 1.5 px outside, 1 px inside (measured
  over 60 seeds: 1.29 and 0.61).
  """
  h = w = 64
  yy, xx = np.mgrid[:h, :w]
  px = np.stack([xx.ravel(), yy.ravel()], axis=1).astype(np.float64)
  inside_checked = 0
  for seed in range(30):
    m = tm.stroke_mask(np.random.default_rng(seed), h, w)
    assert m.shape == (h, w) and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0}
    hole = (m == 0).ravel()
    assert 0 < hole.sum() < h * w
    reach = np.zeros(h * w, bool)           # within half a width (+ slack) of a segment
    surely_in = np.zeros(h * w, bool)       # inside a segment's body
    for pts, width in _documented_strokes(np.random.default_rng(seed), h, w):
      assert 4 <= width <= 16
      half = (width - 1) / 2
      for a, b in zip(pts[:-1], pts[1:]):
        a, b = np.floor(a), np.floor(b)
        dist, u, perp = _segment_distances(px, a, b)
        reach |= dist <= half + 1.5
        margin = 1.0 / max(np.linalg.norm(b - a), 1e-9)
        surely_in |= (perp <= half - 1.0) & (u >= margin) & (u <= 1 - margin)
    assert hole[surely_in].all(), seed                   # 1 = known: the strokes are zeros
    assert not hole[~reach].any(), seed
    inside_checked += surely_in.sum()
  assert inside_checked > 1000


def test_sample_masks_fraction_is_binomial_and_the_rest_fully_known():
  num, frac = 3000, 0.3
  out = tm.sample_masks(("box",), num, 8, 8, seed=0, fraction=frac)
  assert out.shape == (num, 8, 8) and out.dtype == np.float32
  assert set(np.unique(out)) == {0.0, 1.0}
  masked = (out == 0).any(axis=(1, 2))        # a box always hides >= 1 pixel
  sd = np.sqrt(num * frac * (1 - frac))
  assert abs(masked.sum() - num * frac) < 4 * sd, masked.sum()
  np.testing.assert_array_equal(out[~masked], 1.0)
  assert not (tm.sample_masks(("box",), 200, 8, 8, seed=1, fraction=0.0) == 0).any()
  assert (tm.sample_masks(("box",), 200, 8, 8, seed=1, fraction=1.0) == 0).any(axis=(1, 2)).all()


def test_sample_masks_chooses_families_uniformly_and_delegates_benchmark_ones():
  """('box', 'left_half'): left_half is data/masks.py's exact left-known mask; share ~ Bin(n, 1/2)."""
  num, h, w = 2000, 16, 16
  out = tm.sample_masks(("box", "left_half"), num, h, w, seed=(3, 11), fraction=1.0)
  left = np.zeros((h, w), np.float32)
  left[:, : w // 2] = 1.0                    # left half known, right half generated
  is_left = (out == left).all(axis=(1, 2))
  assert abs(is_left.sum() - num / 2) < 4 * np.sqrt(num / 4), is_left.sum()
  # The others are box masks: at most three boxes, each at most 8x8 of the 256 pixels.
  holes = (out[~is_left] == 0).sum(axis=(1, 2))
  assert holes.min() >= 4 and holes.max() <= 3 * 64


def test_sample_masks_is_a_function_of_its_seed():
  fams = ("box", "stroke", "thin")
  a = tm.sample_masks(fams, 12, 16, 16, seed=(5, 2), fraction=0.8)
  np.testing.assert_array_equal(a, tm.sample_masks(fams, 12, 16, 16, seed=(5, 2), fraction=0.8))
  b = tm.sample_masks(fams, 12, 16, 16, seed=(5, 3), fraction=0.8)
  assert not np.array_equal(a, b)
  # Every family contributes (12 masks, 3 families, fraction 0.8: a miss has probability < 1e-3).
  assert (a == 0).any()


@pytest.mark.parametrize("families,hint", [(("bx",), "Did you mean 'box'"),
                                           (("box", "strok"), "Did you mean 'stroke'"),
                                           (("lefthalf",), "Did you mean 'left_half'")])
def test_unknown_family_is_an_input_error_with_a_suggestion(families, hint):
  with pytest.raises(checks.InputError, match=hint) as err:
    tm.sample_masks(families, 2, 8, 8, seed=0)
  assert "\n" not in str(err.value) and "autoencoder.mask_families" in str(err.value)


def test_check_families_and_fraction_bounds():
  assert tm.check_families(["box", "square"]) == ("box", "square")
  with pytest.raises(checks.InputError, match="empty"):
    tm.check_families(())
  for frac in (-0.1, 1.5):
    with pytest.raises(checks.InputError, match=r"mask_fraction=.*\[0, 1\]"):
      tm.sample_masks(("box",), 2, 8, 8, seed=0, fraction=frac)


@pytest.mark.parametrize("num, height, width, name", [
    (0, 8, 8, "number of masks=0"), (2, 0, 8, "mask height=0"), (2, 8, -3, "mask width=-3"),
    (2, 4.5, 8, "mask height=4.5")])
def test_sample_masks_sizes_are_positive_integers(num, height, width, name):
  with pytest.raises(checks.InputError, match=f"{name}; expected a positive integer"):
    tm.sample_masks(("box",), num, height, width, seed=0)
