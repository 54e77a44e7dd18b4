"""Inpainting mask families of the benchmarks (LaMa strokes, square, extrema, left half) and mask files.

Every mask is `[H, W]` of 0/1 with `1 = known` (docs/conventions.md), deterministic per
(seed, index): mask i of `make_masks(family, num, H, W, seed)` depends only on
(family, H, W, seed, i).

`thin`, `medium` and `thick` (alias `wide`) are LaMa's random evaluation masks
(Suvorov et al. 2022, `configs/data_gen/random_{thin,medium,thick}_256.yaml` with the
mask generator of `saicinpainting/training/data/masks.py`): free-form strokes, and
for medium/thick with probability 0.3 / 1.3 a set of boxes instead; a mask whose hole
covers more than half the image is redrawn (`max_tamper_area: 0.5`). The geometry is
sampled exactly as LaMa's (its integer draws, on a canvas whose shorter side is 256)
and scaled to the image: drawn at the image's size when it is at least 256, else drawn
at 256 and box-filtered down (a pixel is a hole when most of it is).
Strokes are Pillow lines with round end caps, as OpenCV's thick `cv2.line` draws them
(half-width and cap radius ceil(w / 2)).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.data import image_io

FAMILIES = ("thin", "medium", "thick", "wide", "square", "extrema", "left_half")
LAMA_CANVAS = 256          # the published parameters are for 256 x 256
MAX_HOLE_FRACTION = 0.5    # LaMa's max_tamper_area
BOX_WEIGHT = 0.3           # box_proba next to irregular_proba = 1


@dataclasses.dataclass(frozen=True)
class Strokes:
  """LaMa's `irregular_kwargs` (RandomIrregularMaskGenerator without a ramp)."""
  min_times: int
  max_times: int
  max_width: int
  max_angle: int
  max_len: int


@dataclasses.dataclass(frozen=True)
class Boxes:
  """LaMa's `box_kwargs` (RandomRectangleMaskGenerator without a ramp)."""
  margin: int
  bbox_min_size: int
  bbox_max_size: int
  min_times: int
  max_times: int


LAMA_256: dict[str, tuple[Strokes, Boxes | None]] = {
    "thin": (Strokes(min_times=4, max_times=50, max_width=10, max_angle=4, max_len=40), None),
    "medium": (Strokes(min_times=4, max_times=5, max_width=50, max_angle=4, max_len=100),
               Boxes(margin=0, bbox_min_size=10, bbox_max_size=50, min_times=1, max_times=5)),
    "thick": (Strokes(min_times=1, max_times=5, max_width=100, max_angle=4, max_len=200),
              Boxes(margin=10, bbox_min_size=30, bbox_max_size=150, min_times=1, max_times=3)),
}


def _stroke_segments(rng: np.random.Generator, p: Strokes, height: int, width: int):
  """LaMa's make_random_irregular_mask draws: [(x0, y0, x1, y1, brush_width)].

  Without a ramp its generator passes max_times + 1, so the count is uniform on
  [min_times, max_times + 1]; angles are 0.01 + randint(max_angle) radians (2 pi minus
  that for even strokes); end points are truncated to int and clipped to [0, size].
  """
  num = int(rng.integers(p.min_times, p.max_times + 2))
  # All draws of a mask at once (up to 5 segments a stroke; unused ones are discarded).
  starts = rng.integers((width, height), size=(num, 2)).tolist()
  num_segments = (1 + rng.integers(5, size=num)).tolist()
  angles = (0.01 + rng.integers(p.max_angle, size=(num, 5))).tolist()
  lengths = (10 + rng.integers(p.max_len, size=(num, 5))).tolist()
  brushes = (5 + rng.integers(p.max_width, size=(num, 5))).tolist()
  segments = []
  for i in range(num):
    x, y = starts[i]
    for j in range(num_segments[i]):
      angle = 2 * 3.1415926 - angles[i][j] if i % 2 == 0 else angles[i][j]
      x1 = min(max(int(x + lengths[i][j] * math.sin(angle)), 0), width)
      y1 = min(max(int(y + lengths[i][j] * math.cos(angle)), 0), height)
      segments.append((x, y, x1, y1, brushes[i][j]))
      x, y = x1, y1
  return segments


def _boxes(rng: np.random.Generator, p: Boxes, height: int, width: int):
  """LaMa's make_random_rectangle_mask draws: [(x0, y0, box_width, box_height)].

  Without a ramp the generator passes bbox_max_size + 1 (capped by the image minus the
  margins) as the exclusive upper size and the count is uniform on [min, max].
  """
  max_size = min(p.bbox_max_size + 1, height - 2 * p.margin, width - 2 * p.margin)
  boxes = []
  for _ in range(int(rng.integers(p.min_times, p.max_times + 1))):
    bw = int(rng.integers(p.bbox_min_size, max_size))
    bh = int(rng.integers(p.bbox_min_size, max_size))
    x0 = int(rng.integers(p.margin, width - p.margin - bw + 1))
    y0 = int(rng.integers(p.margin, height - p.margin - bh + 1))
    boxes.append((x0, y0, bw, bh))
  return boxes


def _lama_hole(rng: np.random.Generator, family: str, height: int, width: int) -> np.ndarray:
  """One LaMa mask as a bool hole map [H, W] (True = missing), before the area check."""
  scale = min(height, width) / LAMA_CANVAS
  vh, vw = round(height / scale), round(width / scale)    # canvas with shorter side 256
  f = scale if scale >= 1 else 1.0                         # drawing scale on that canvas
  ch, cw = (height, width) if scale >= 1 else (vh, vw)
  img = Image.new("L", (cw, ch), 0)
  draw = ImageDraw.Draw(img)
  strokes, boxes = LAMA_256[family]
  if boxes is not None and rng.random() < BOX_WEIGHT / (1.0 + BOX_WEIGHT):
    for x0, y0, bw, bh in _boxes(rng, boxes, vh, vw):
      draw.rectangle([x0 * f, y0 * f, (x0 + bw) * f - 1, (y0 + bh) * f - 1], fill=255)
  else:
    for x0, y0, x1, y1, brush in _stroke_segments(rng, strokes, vh, vw):
      r = math.ceil(brush / 2) * f                         # OpenCV's thick-line half-width
      draw.line([(x0 * f, y0 * f), (x1 * f, y1 * f)], fill=255, width=round(2 * r + 1))
      for x, y in ((x0, y0), (x1, y1)):                    # round caps, as cv2.line draws
        draw.ellipse([x * f - r, y * f - r, x * f + r, y * f + r], fill=255)
  if scale < 1:   # box filter down to the image: a pixel is a hole when most of it is
    img = img.resize((width, height), Image.Resampling.BOX)
    return np.asarray(img) >= 128
  return np.asarray(img) > 0


def lama_mask(family: str, height: int, width: int, rng: np.random.Generator,
              max_tries: int = 1000) -> np.ndarray:
  """One LaMa `thin`/`medium`/`thick` mask [H, W], 1 = known; redrawn while its hole exceeds half."""
  for _ in range(max_tries):
    hole = _lama_hole(rng, family, height, width)
    if hole.mean() <= MAX_HOLE_FRACTION:
      return (~hole).astype(np.float32)
  raise RuntimeError(f"no {family} mask with a hole of at most half the image in {max_tries} draws.")


def square_mask(height: int, width: int, top: int | None = None,
                left: int | None = None) -> np.ndarray:
  """[H, W]: a missing box of half the image side (H // 2 x W // 2), centred unless placed."""
  bh, bw = height // 2, width // 2
  top = (height - bh) // 2 if top is None else top
  left = (width - bw) // 2 if left is None else left
  if not (0 <= top <= height - bh and 0 <= left <= width - bw):
    raise checks.InputError(f"square box at (top={top}, left={left}) of size {bh}x{bw} does not "
                            f"fit in a {height}x{width} image.")
  m = np.ones((height, width), np.float32)
  m[top:top + bh, left:left + bw] = 0.0
  return m


def make_masks(family: str, num: int, height: int, width: int, seed: int = 0) -> np.ndarray:
  """`num` inpainting masks of a family: np.ndarray [num, H, W] of 0/1 float32, 1 = known.

  Families: `thin`, `medium`, `thick` (= `wide`): LaMa's random strokes/boxes (module
  docstring); `square`: a centred box of half the side missing; `extrema`: its
  complement (only the centre box known); `left_half`: the left half known.
  """
  checks.check_choice(family, FAMILIES, "mask family")
  family = "thick" if family == "wide" else family
  num = checks.check_positive_int(num, "num")
  height, width = checks.check_positive_int(height, "height"), checks.check_positive_int(width, "width")
  if int(seed) != seed or seed < 0:
    raise checks.InputError(f"seed={seed!r}; expected an integer >= 0.")
  if family in LAMA_256:
    if min(height, width) < 8:
      raise checks.InputError(f"{family} masks need images of at least 8x8, got {height}x{width}.")
    # One stream per (seed, family, index): mask i never depends on how many are drawn.
    fam = FAMILIES.index(family)
    out = np.empty((num, height, width), np.float32)
    for i in range(num):
      out[i] = lama_mask(family, height, width, np.random.default_rng([seed, fam, i]))
    return out
  if min(height, width) < 2:
    raise checks.InputError(f"{family} masks need images of at least 2x2, got {height}x{width}.")
  if family == "square":
    m = square_mask(height, width)
  elif family == "extrema":
    m = 1.0 - square_mask(height, width)
  else:  # left_half
    m = np.zeros((height, width), np.float32)
    m[:, : width // 2] = 1.0
  return np.broadcast_to(m, (num, height, width)).copy()


def load_masks(paths, height: int, width: int) -> np.ndarray:
  """Mask PNGs (white or 1 = known, black = missing) as [N, H, W]; each must be HxW and binary."""
  if isinstance(paths, str):
    paths = [paths]
  return np.stack([image_io.load_mask(p, (height, width)) for p in paths])
