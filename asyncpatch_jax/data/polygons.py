"""Counting Polygons: filled regular polygons on a white background, labelled by their count.

IPR (Kang, Yoon, Ahn) Sec. 4.3 and App. C.3, after Wewer et al. (2025, SRM):
  * N polygons, N uniform in [min_polygons, max_polygons] (1..9 in SRM), all with the same
    number of vertices V, uniform in [min_vertices, max_vertices] (3..7);
  * each polygon is the regular V-gon inscribed in a circle of random centre and radius,
    turned by a uniform random angle (vertex k at angle + 2 pi k / V); the circles never
    overlap (SRM reads them from a file of non-overlapping circle positions);
  * one fill colour per image.
The paper's images are 128x128 on an FFHQ face, with two more circles holding the digits
N and V in the same colour: the model is unconditional and must make its digits agree with
its polygons. Offline there is no FFHQ, so this is SRM's blank-background variant
(`counting_polygons_blank`: white background, colour HSL(hue ~ U[0, 1), S = 1, L = 0.25)),
and the count is the class label instead of a digit in the image: a class-conditional
model is asked for N polygons and is valid when it draws N (`evaluation/polygon_count.py`
counts them). V is kept in every example (`num_vertices`), for the vertex reading.

Geometry (ours; SRM's circle file is not public): circumradii uniform in `radius` x
image_size (default 0.05..0.1 of 128: 6.4..12.8 pixels), at least MIN_RADIUS = 3.5 pixels;
centres uniform where the circle lies MARGIN = 1 pixel inside the image, redrawn until the
circles are GAP = 2 pixels apart. `configs/polygons.py:cpu` uses 32x32 images with 1..4
polygons of radius 0.11..0.15 (3.5..4.8 pixels).

Rendering (ours, so that the data is read exactly): a pixel takes the colour in proportion
to the share of its area the polygons cover (a box filter over an 8x8 grid of sub-pixel
centres; SRM draws at 512x512 and resizes bicubically). The colour's channels lie between
0 and 2 L = 1/2, so both 2 (1 - max(R, G, B)) and 1 - min(R, G, B) of a pixel in [0, 1] are
that share. Two polygons are more than sqrt(2) pixels apart (the distance of 8-adjacent
pixel centres), so no two share a connected component of the pixels more than half
covered, and the reader counts every data image exactly (tested).

Example `i` of a split is a pure function of `(seed, split, i)`, generated on demand.
"""

from __future__ import annotations

import colorsys

import numpy as np

from asyncpatch_jax.runtime import checks

SPLITS = ("train", "test")
DEFAULT_NUM_EXAMPLES = {"train": 60_000, "test": 10_000}
LIGHTNESS = 0.25            # SRM counting_polygons_blank: HSL lightness and saturation
SATURATION = 1.0
GAP = 2.0                   # pixels between two polygons (> sqrt(2); see the module docstring)
MARGIN = 1.0                # pixels between a polygon's circle and the image border
# Smallest circumradius in pixels: the vertex reader (evaluation/polygon_count.py) is exact
# from here on; a heptagon of radius 2.5 is a disc.
MIN_RADIUS = 3.5
SUPERSAMPLE = 8             # sub-pixel grid per pixel side of the box filter
MAX_PLACEMENT_TRIES = 200   # random centres tried per polygon before starting the image over
MAX_RESTARTS = 200
_SPLIT_ID = {"train": 0, "test": 1}


def regular_polygon(num_vertices: int, center, radius: float, angle: float) -> np.ndarray:
  """Vertices [V, 2] (x, y) of the regular V-gon inscribed in a circle, the first at `angle`.

  As SRM's `_get_unit_polygon_vertices`: vertex k at angle + 2 pi k / V.
  """
  a = angle + 2.0 * np.pi * np.arange(num_vertices) / num_vertices
  return np.stack([center[0] + radius * np.cos(a), center[1] + radius * np.sin(a)], axis=-1)


def coverage(vertices_list, image_size: int, supersample: int = SUPERSAMPLE) -> np.ndarray:
  """[S, S] float64 share of each pixel's area inside the union of convex polygons.

  Pixel (r, c) is the square [c, c + 1) x [r, r + 1) in (x, y); it is sampled at the
  centres of a `supersample` x `supersample` grid (a box filter). Polygons are given as
  counter-clockwise or clockwise convex vertex lists [V, 2] in pixel units.
  """
  s, k = int(image_size), int(supersample)
  inside = np.zeros((s * k, s * k), bool)
  sub = (np.arange(s * k) + 0.5) / k                      # sub-pixel centres, pixel units
  for v in vertices_list:
    v = np.asarray(v, np.float64)
    lo = np.clip(np.floor(v.min(axis=0) * k).astype(int), 0, s * k)
    hi = np.clip(np.ceil(v.max(axis=0) * k).astype(int) + 1, 0, s * k)
    x, y = np.meshgrid(sub[lo[0]:hi[0]], sub[lo[1]:hi[1]])
    edge = np.roll(v, -1, axis=0) - v                     # [V, 2]
    cross = (edge[:, 0, None, None] * (y[None] - v[:, 1, None, None])
             - edge[:, 1, None, None] * (x[None] - v[:, 0, None, None]))   # [V, h, w]
    block = (cross >= 0).all(axis=0) | (cross <= 0).all(axis=0)
    inside[lo[1]:hi[1], lo[0]:hi[0]] |= block
  return inside.reshape(s, k, s, k).mean(axis=(1, 3))


class PolygonsSource:
  """Random-access source of Counting Polygons images (grain `RandomAccessDataSource`).

  Each example is `dict(image=[S, S, 3] float32 in [-1, 1], label=N (int32, the number
  of polygons), num_vertices=V (int32))`. `num_classes = max_polygons + 1`: the label is
  the count itself (classes below min_polygons are never drawn).
  """

  name = "polygons"

  def __init__(self, split: str = "train", image_size: int = 128,
               num_examples: int | None = None, seed: int = 0, min_polygons: int = 1,
               max_polygons: int = 9, min_vertices: int = 3, max_vertices: int = 7,
               radius=(0.05, 0.1)):
    if split not in SPLITS:
      raise checks.InputError(f"Unknown split {split!r} for polygons; expected one of {SPLITS}.")
    if not isinstance(image_size, (int, np.integer)) or image_size < 16:
      raise checks.InputError(f"polygons: image_size must be an int >= 16, got {image_size!r}.")
    num_examples = checks.check_dataset_size("polygons", num_examples, DEFAULT_NUM_EXAMPLES,
                                             split, seed)
    if not 0 <= min_polygons <= max_polygons:
      raise checks.InputError(f"polygons: need 0 <= min_polygons <= max_polygons, got "
                              f"{min_polygons}, {max_polygons}.")
    if not 3 <= min_vertices <= max_vertices:
      raise checks.InputError(f"polygons: need 3 <= min_vertices <= max_vertices, got "
                              f"{min_vertices}, {max_vertices}.")
    if len(radius) != 2:
      raise checks.InputError(f"polygons: radius must be (min, max) fractions of image_size, "
                              f"got {radius!r}.")
    r_min, r_max = (float(r) for r in radius)
    if not 0.0 < r_min <= r_max < 0.5:
      raise checks.InputError(f"polygons: radius (fractions of image_size) must satisfy "
                              f"0 < min <= max < 0.5, got {tuple(radius)}.")
    if r_min * image_size < MIN_RADIUS:
      raise checks.InputError(f"polygons: the smallest radius {r_min} x {image_size} = "
                              f"{r_min * image_size:.2f} pixels is below {MIN_RADIUS} (smaller "
                              "polygons cannot be told apart); raise image_size or radius.")
    # The max_polygons discs (radius + gap / 2) must cover at most 45% of the image, or
    # random placement jams: ask for a larger image or fewer polygons instead of looping.
    rho = (r_max * image_size + GAP / 2) / image_size
    if max_polygons * np.pi * rho ** 2 > 0.45:
      raise checks.InputError(
          f"polygons: {max_polygons} polygons of radius up to {r_max} x {image_size} do not "
          f"fit {image_size}x{image_size} images by random placement; raise image_size or "
          "lower max_polygons or radius.")
    self.split = split
    self.image_size = int(image_size)
    self.image_shape = (self.image_size, self.image_size, 3)
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self.min_polygons, self.max_polygons = int(min_polygons), int(max_polygons)
    self.min_vertices, self.max_vertices = int(min_vertices), int(max_vertices)
    self.radius = (r_min, r_max)
    self.num_classes = self.max_polygons + 1

  def __len__(self) -> int:
    return self.num_examples

  def example_params(self, index: int) -> dict:
    """The drawing of example `index`: count, vertices, hue, circles [N, 3] (x, y, r), angles."""
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], int(index)])
    n = int(rng.integers(self.min_polygons, self.max_polygons + 1))
    v = int(rng.integers(self.min_vertices, self.max_vertices + 1))
    hue = float(rng.uniform(0.0, 1.0))
    s = self.image_size
    for _ in range(MAX_RESTARTS):
      circles = []
      for _ in range(n):
        r = rng.uniform(*self.radius) * s
        for _ in range(MAX_PLACEMENT_TRIES):
          xy = rng.uniform(r + MARGIN, s - r - MARGIN, size=2)
          if all(np.hypot(*(xy - c[:2])) >= r + c[2] + GAP for c in circles):
            circles.append(np.array([xy[0], xy[1], r]))
            break
        else:
          break
      if len(circles) == n:
        break
    else:
      raise RuntimeError(f"polygons: could not place {n} polygons in example {index}.")
    angles = rng.uniform(0.0, 2.0 * np.pi, size=n)
    return {"num_polygons": n, "num_vertices": v, "hue": hue,
            "circles": np.array(circles).reshape(n, 3), "angles": angles}

  def colour(self, hue: float) -> np.ndarray:
    """RGB [3] in [0, 1] of HSL(hue, S = 1, L = 1/4): channels between 0 and 1/2."""
    return np.asarray(colorsys.hls_to_rgb(hue, LIGHTNESS, SATURATION))

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    p = self.example_params(int(index))
    polys = [regular_polygon(p["num_vertices"], c[:2], c[2], a)
             for c, a in zip(p["circles"], p["angles"])]
    a = coverage(polys, self.image_size)[..., None]                  # [S, S, 1]
    rgb = (1.0 - a) + a * self.colour(p["hue"])                      # over white
    return {"image": (rgb * 2.0 - 1.0).astype(np.float32),
            "label": np.int32(p["num_polygons"]),
            "num_vertices": np.int32(p["num_vertices"])}

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self[int(i)] for i in indices]

  def __repr__(self) -> str:
    return (f"PolygonsSource(split={self.split!r}, image_size={self.image_size}, "
            f"num_examples={self.num_examples}, seed={self.seed}, "
            f"polygons={self.min_polygons}..{self.max_polygons}, "
            f"vertices={self.min_vertices}..{self.max_vertices}, radius={self.radius})")
