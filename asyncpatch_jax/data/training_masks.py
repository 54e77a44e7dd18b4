"""Random masks for training the localized autoencoder on masked images (AsyncPatch Sec. 5.2).

`sample_masks(families, num, H, W, seed, fraction)` gives `[num, H, W]` 0/1 masks
(1 = known): each mask is, with probability `fraction`, drawn from a family chosen
uniformly among `families`, else all ones (the unmasked image, which is what latent
diffusion encodes). Families:
  box     1-3 hidden axis-aligned rectangles, sides uniform in [H/8, H/2];
  stroke  1-4 hidden free-form strokes: polylines of 1-4 segments, width H/16 to H/4,
          drawn with Pillow;
  any family of `data/masks.py` (`thin`, `medium`, `thick`, `wide`, `square`,
          `extrema`, `left_half`: the benchmark families).
Deterministic: the result is a function of (families, num, H, W, seed, fraction).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from asyncpatch_jax.runtime import checks

OWN_FAMILIES = ("box", "stroke")


def _benchmark_families() -> tuple[str, ...]:
  try:
    from asyncpatch_jax.data import masks  # pylint: disable=g-import-not-at-top
  except ImportError:
    return ()
  return tuple(masks.FAMILIES)


def check_families(families) -> tuple[str, ...]:
  """The family names, validated (InputError naming the known ones)."""
  families = tuple(families)
  known = OWN_FAMILIES + _benchmark_families()
  if not families:
    raise checks.InputError(f"autoencoder.mask_families is empty; name at least one of {known}.")
  for f in families:
    checks.check_choice(f, known, "autoencoder.mask_families entry")
  return families


def _hole_image(height: int, width: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
  img = Image.new("L", (width, height), 0)
  return img, ImageDraw.Draw(img)


def box_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """1-3 hidden rectangles: [H, W] float32, 1 = known."""
  hole = np.zeros((height, width), bool)
  for _ in range(int(rng.integers(1, 4))):
    bh = int(rng.integers(max(height // 8, 1), max(height // 2, 1) + 1))
    bw = int(rng.integers(max(width // 8, 1), max(width // 2, 1) + 1))
    top = int(rng.integers(0, height - bh + 1))
    left = int(rng.integers(0, width - bw + 1))
    hole[top:top + bh, left:left + bw] = True
  return (~hole).astype(np.float32)


def stroke_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  """1-4 hidden free-form strokes: [H, W] float32, 1 = known."""
  img, draw = _hole_image(height, width)
  side = min(height, width)
  for _ in range(int(rng.integers(1, 5))):
    points = [(float(rng.uniform(0, width)), float(rng.uniform(0, height)))]
    for _ in range(int(rng.integers(1, 5))):
      angle = rng.uniform(0, 2 * np.pi)
      length = rng.uniform(side / 8, side / 2)
      x, y = points[-1]
      points.append((float(np.clip(x + length * np.cos(angle), 0, width - 1)),
                     float(np.clip(y + length * np.sin(angle), 0, height - 1))))
    w = int(rng.integers(max(side // 16, 1), max(side // 4, 1) + 1))
    draw.line(points, fill=255, width=w, joint="curve")
  return (np.asarray(img) == 0).astype(np.float32)


def sample_masks(families, num: int, height: int, width: int, seed, fraction: float = 1.0
                 ) -> np.ndarray:
  """[num, H, W] float32 masks (1 = known); see the module docstring.

  seed: an int or a sequence of ints (e.g. (run seed, step)) for NumPy's SeedSequence.
  """
  families = check_families(families)
  num = checks.check_positive_int(num, "number of masks")
  height = checks.check_positive_int(height, "mask height")
  width = checks.check_positive_int(width, "mask width")
  if not 0.0 <= fraction <= 1.0:
    raise checks.InputError(f"autoencoder.mask_fraction={fraction}; expected a value in [0, 1].")
  rng = np.random.default_rng(seed)
  out = np.ones((num, height, width), np.float32)
  masked = rng.uniform(size=num) < fraction
  choice = rng.integers(0, len(families), size=num)
  sub_seeds = rng.integers(0, 2 ** 31 - 1, size=num)
  for i in np.flatnonzero(masked):
    family = families[choice[i]]
    r = np.random.default_rng(int(sub_seeds[i]))
    if family == "box":
      out[i] = box_mask(r, height, width)
    elif family == "stroke":
      out[i] = stroke_mask(r, height, width)
    else:
      from asyncpatch_jax.data import masks  # pylint: disable=g-import-not-at-top
      out[i] = masks.make_masks(family, 1, height, width, seed=int(sub_seeds[i]))[0]
  return out
