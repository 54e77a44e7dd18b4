"""Inpainting masks: exact geometry of square/extrema/left_half, LaMa's hole statistics, files."""

import json
import os

import numpy as np
import pytest

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.data import image_io
from asyncpatch_jax.data import masks

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.mark.parametrize("h,w", [(16, 16), (64, 48), (7, 10)])
def test_square_is_half_the_side_centred_and_extrema_its_complement(h, w):
  sq = masks.make_masks("square", 3, h, w)
  assert sq.shape == (3, h, w) and sq.dtype == np.float32
  rows, cols = np.nonzero(sq[0] == 0)
  assert rows.max() - rows.min() + 1 == h // 2 and cols.max() - cols.min() + 1 == w // 2
  assert (sq[0] == 0).sum() == (h // 2) * (w // 2)                     # a solid box
  assert rows.min() == (h - h // 2) // 2 and cols.min() == (w - w // 2) // 2
  # Centred: the margins on both sides differ by at most one pixel.
  assert abs(rows.min() - (h - 1 - rows.max())) <= 1 and abs(cols.min() - (w - 1 - cols.max())) <= 1
  np.testing.assert_array_equal(masks.make_masks("extrema", 3, h, w), 1.0 - sq)
  placed = masks.square_mask(h, w, top=0, left=w - w // 2)
  assert (placed[: h // 2, w - w // 2:] == 0).all() and placed.sum() == h * w - (h // 2) * (w // 2)


def test_left_half_is_known():
  m = masks.make_masks("left_half", 2, 6, 9)[0]
  np.testing.assert_array_equal(m[:, :4], 1.0)
  np.testing.assert_array_equal(m[:, 4:], 0.0)


@pytest.mark.parametrize("family", ["thin", "medium", "thick"])
def test_lama_hole_fraction_matches_lamas_generator(family):
  """Mean hole at 256x256 over 1000 masks vs LaMa's own code (OpenCV drawing, 20000 masks).

  The reference (tests/fixtures/lama_mask_reference.json) was made once by
  tests/fixtures/make_lama_mask_reference.py, a port of LaMa's gen_mask_dataset.py
  sampling that draws with cv2.line: thin 0.2876, medium 0.2393, thick 0.2651.
  Tolerance: 4 standard errors of the difference of the two means.
  """
  ref = json.load(open(os.path.join(FIXTURES, "lama_mask_reference.json")))
  mean_ref, std_ref = (ref["families"][family][k] for k in ("mean_hole", "std_hole"))
  m = masks.make_masks(family, 1000, 256, 256, seed=0)
  hole = 1.0 - m.mean(axis=(1, 2))
  assert hole.max() <= 0.5                                    # over-large masks were redrawn
  se = np.sqrt(hole.var(ddof=1) / hole.size + std_ref ** 2 / ref["n_images"])
  assert abs(hole.mean() - mean_ref) < 4 * se, (hole.mean(), mean_ref, se)
  assert abs(hole.std() - std_ref) < 0.1 * std_ref


def test_masks_are_binary_deterministic_per_seed_and_index_at_any_size():
  for family in ("thin", "wide", "medium"):
    for h, w in ((16, 16), (24, 40), (300, 260)):
      a = masks.make_masks(family, 4, h, w, seed=3)
      assert a.shape == (4, h, w) and set(np.unique(a)) <= {0.0, 1.0}
      assert (1 - a.mean(axis=(1, 2))).max() <= 0.5
      b = masks.make_masks(family, 2, h, w, seed=3)
      np.testing.assert_array_equal(a[:2], b)                 # mask i depends on (seed, i) only
      assert not np.array_equal(a, masks.make_masks(family, 4, h, w, seed=4))
  np.testing.assert_array_equal(masks.make_masks("wide", 3, 32, 32, seed=1),
                                masks.make_masks("thick", 3, 32, 32, seed=1))
  # Scaled to the image: at 16x16 the holes keep about the 256x256 fraction.
  small = 1 - masks.make_masks("thick", 200, 16, 16).mean()
  ref = json.load(open(os.path.join(FIXTURES, "lama_mask_reference.json")))
  assert abs(small - ref["families"]["thick"]["mean_hole"]) < 0.05


def test_mask_files_and_bad_input(tmp_path):
  m = masks.make_masks("thin", 2, 20, 12, seed=0)
  paths = []
  for i in range(2):
    paths.append(str(tmp_path / f"m{i}.png"))
    image_io.save_png((m[i][..., None] * 255).astype(np.uint8), paths[-1])
  np.testing.assert_array_equal(masks.load_masks(paths, 20, 12), m)
  with pytest.raises(checks.InputError, match="expected 12x21"):
    masks.load_masks(paths, 21, 12)
  gray = np.full((20, 12, 1), 128, np.uint8)
  image_io.save_png(gray, str(tmp_path / "gray.png"))
  with pytest.raises(checks.InputError, match="must be binary"):
    masks.load_masks(str(tmp_path / "gray.png"), 20, 12)
  with pytest.raises(checks.InputError, match="Unknown mask family 'thik'.*Did you mean 'thick'"):
    masks.make_masks("thik", 1, 16, 16)
  with pytest.raises(checks.InputError, match="num=0"):
    masks.make_masks("square", 0, 16, 16)
