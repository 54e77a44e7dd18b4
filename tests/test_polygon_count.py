"""The Counting Polygons reader (evaluation/polygon_count.py) and its metric (constraints.py).

References: images drawn here, independently of data/polygons.py: pixel-exact rectangles
whose connectivity is known by construction, and regular polygons filled by Pillow on an
8x finer canvas and box-downsampled (the anti-aliasing the dataset uses, by another
rasteriser). The expected counts are the groups the test built, never ndimage's answer.
"""

import colorsys

import numpy as np
import pytest
from PIL import Image, ImageDraw

from asyncpatch_jax.evaluation import constraints
from asyncpatch_jax.evaluation import polygon_count as pc

WHITE = np.ones(3)
DARK_RED = np.array(colorsys.hls_to_rgb(0.0, 0.25, 1.0))     # the dataset's kind of colour


def _image(ink_map, colour=DARK_RED):
  """[H, W] coverage in [0, 1] -> [H, W, 3] in [-1, 1]: colour over white, as the dataset."""
  a = np.asarray(ink_map, np.float64)[..., None]
  return ((1 - a) * WHITE + a * colour) * 2 - 1


def _rect(ink_map, r0, c0, h, w, value=1.0):
  ink_map[r0:r0 + h, c0:c0 + w] = value


def _pil_polygons(size, polygons, supersample=8):
  """Coverage [size, size] of filled polygons (lists of (x, y) in pixels) drawn by Pillow."""
  canvas = Image.new("L", (size * supersample, size * supersample), 0)
  draw = ImageDraw.Draw(canvas)
  for vertices in polygons:
    draw.polygon([(x * supersample, y * supersample) for x, y in vertices], fill=255)
  return np.asarray(canvas.resize((size, size), Image.BOX), np.float64) / 255.0


def _regular(v, cx, cy, r, angle):
  return [(cx + r * np.cos(angle + 2 * np.pi * k / v), cy + r * np.sin(angle + 2 * np.pi * k / v))
          for k in range(v)]


# ------------------------------------------------------------------------------ counting


def _groups_image(groups, rng):
  """64x64 ink with one group per 16x16 cell: 'single' (one rectangle), 'edge' (two
  rectangles sharing an edge), 'corner' (two meeting only at a corner) or 'apart' (two
  with one background pixel between them, straight or diagonal). Returns (ink, count)."""
  ink_map = np.zeros((64, 64))
  count = 0
  for cell, kind in enumerate(groups):
    r, c = 16 * (cell // 4) + 2, 16 * (cell % 4) + 2
    h, w = rng.integers(3, 6, size=2)
    _rect(ink_map, r, c, h, w)
    if kind == "single":
      count += 1
    elif kind == "edge":                       # below, sharing part of the bottom edge
      _rect(ink_map, r + h, c + 1, 3, w)
      count += 1
    elif kind == "corner":                     # diagonal neighbour of the bottom-right pixel
      _rect(ink_map, r + h, c + w, 3, 3)
      count += 1
    elif kind == "apart_straight":             # one background column between them
      _rect(ink_map, r, c + w + 1, h, 3)
      count += 2
    elif kind == "apart_diagonal":             # one background pixel diagonally between them
      _rect(ink_map, r + h + 1, c + w + 1, 3, 3)
      count += 2
    else:
      raise ValueError(kind)
  return ink_map, count


KINDS = ("single", "edge", "corner", "apart_straight", "apart_diagonal")


@pytest.mark.parametrize("n", range(10))
def test_counts_0_to_9_groups_touching_and_apart(n):
  rng = np.random.default_rng(n)
  images, expected = [], []
  # Every kind of group at every count 0..9 (a touching pair is one shape, an apart pair two).
  for kind in KINDS:
    ink_map, count = _groups_image([kind] * n, rng)
    assert count == n * (2 if kind.startswith("apart") else 1)
    images.append(_image(ink_map)), expected.append(count)
  for _ in range(4):                                     # and random mixtures
    ink_map, count = _groups_image(list(rng.choice(KINDS, n)), rng)
    images.append(_image(ink_map)), expected.append(count)
  np.testing.assert_array_equal(pc.count_polygons(np.stack(images)), expected)


@pytest.mark.parametrize("n", range(10))
def test_counts_0_to_9_antialiased_polygons_by_another_rasteriser(n):
  """n regular polygons, anti-aliased by Pillow, more than 2 pixels apart (the dataset's gap),
  some as close as that: each is one shape."""
  rng = np.random.default_rng(100 + n)
  for trial in range(3):
    polys = []
    for cell in rng.permutation(16)[:n]:
      cy, cx = 16 * (cell // 4) + 8, 16 * (cell % 4) + 8
      polys.append(_regular(int(rng.integers(3, 8)), cx + rng.uniform(-0.5, 0.5),
                            cy + rng.uniform(-0.5, 0.5), rng.uniform(3.5, 5.9), rng.uniform(0, 7)))
    hue = rng.uniform()
    # Circles of radius < 5.9 in cells 16 apart: the polygons are at least 4.2 pixels apart.
    image = _image(_pil_polygons(64, polys), np.array(colorsys.hls_to_rgb(hue, 0.25, 1.0)))
    assert pc.count_polygons(image[None]).tolist() == [n], (n, trial)


def test_polygons_apart_overlapping_and_sharing_an_edge():
  """More than sqrt(2) apart (the dataset keeps 2): two shapes, wherever the pixel grid
  falls; overlapping or sharing an edge: one. (Closer than sqrt(2) without touching, or
  touching at one vertex, reads as one or two with the sub-pixel position: not tested.)"""
  rng = np.random.default_rng(7)
  apothem = 5.0 * np.cos(np.pi / 6)
  for _ in range(20):
    x, y, turn = 16 + rng.uniform(0, 1), 16 + rng.uniform(0, 1), rng.uniform(0, 2 * np.pi)
    def pair(distance, angle):
      return [_regular(6, x, y, 5.0, angle),
              _regular(6, x + distance * np.cos(turn), y + distance * np.sin(turn), 5.0, angle)]
    # Vertices facing each other 2.1 apart (vertex 0 and vertex 3 on the line of centres).
    facing = pc.count_polygons(_image(_pil_polygons(48, pair(12.1, turn)))[None])
    # Flat sides facing each other 2.1 apart, touching (a shared edge), and overlapping.
    flat = [pc.count_polygons(_image(_pil_polygons(48, pair(2 * apothem + gap,
                                                             turn + np.pi / 6)))[None])[0]
            for gap in (2.1, 0.0, -1.5)]
    assert facing.tolist() == [2] and flat == [2, 1, 1]


def test_a_diagonal_stroke_is_one_shape_and_corner_contact_joins():
  """8-connectivity: pixels meeting at a corner belong together (4-connectivity would cut a
  one-pixel diagonal into specks and split corner-touching squares)."""
  ink_map = np.zeros((32, 32))
  for i in range(12):
    ink_map[4 + i, 2 + i] = 1.0                          # a 12-pixel diagonal stroke
  _rect(ink_map, 2, 20, 3, 3)
  _rect(ink_map, 5, 23, 3, 3)                            # meets the first at one corner
  _rect(ink_map, 20, 20, 3, 3)
  _rect(ink_map, 24, 24, 3, 3)                           # one pixel diagonally apart
  labels, n = pc.shapes(pc.ink(_image(ink_map)[None])[0])
  assert n == 4
  assert len(np.unique(labels[4:16, 2:14][ink_map[4:16, 2:14] > 0])) == 1


def test_threshold_half_covered_pixels_and_any_hue():
  ink_map = np.zeros((16, 32))
  _rect(ink_map, 4, 4, 6, 6)
  _rect(ink_map, 4, 11, 6, 6)
  for bridge, expected in ((0.5, 2), (0.49, 2), (0.51, 1), (1.0, 1)):
    ink_map[6, 10] = bridge                              # the only pixel between the squares
    assert pc.count_polygons(_image(ink_map)[None]).tolist() == [expected], bridge
  # Ink is 2 (1 - max(R, G, B)): any hue at S = 1, L = 1/4 (the data's colours, largest
  # channel 1/2), black and grey up to 1/2 fill a pixel fully; a colour whose largest channel
  # is 3/4 is exactly 1/2 (background), and bright ones (yellow, magenta, pastel) are no ink.
  ink_map[6, 10] = 0.0
  for hue in np.linspace(0, 1, 13):
    colour = np.array(colorsys.hls_to_rgb(hue, 0.25, 1.0))
    np.testing.assert_allclose(pc.ink(_image(ink_map, colour)[None])[0], ink_map, atol=1e-12)
    assert pc.count_polygons(_image(ink_map, colour)[None]).tolist() == [2]
  for colour, expected in ((np.zeros(3), 2), (np.full(3, 0.5), 2), (np.full(3, 0.75), 0),
                           (np.array([0.2, 0.74, 0.1]), 2), (np.array([1.0, 1.0, 0.0]), 0),
                           (np.array([1.0, 0.0, 1.0]), 0), (np.array([0.6, 0.9, 0.7]), 0)):
    image = np.where(ink_map[..., None] > 0, colour, WHITE) * 2 - 1
    assert pc.count_polygons(image[None]).tolist() == [expected], colour
  # Generated images leave [-1, 1]; they are clipped first.
  assert pc.count_polygons(3 * _image(ink_map)[None]).tolist() == [2]


def test_minimum_area_four_pixels():
  ink_map = np.zeros((40, 40))
  # Components of 1..8 pixels, far apart: a row of k pixels, an L of 3, a diagonal of 4.
  for k in range(1, 9):
    _rect(ink_map, 3 * k, 2, 1, k)
  ink_map[30, 30] = ink_map[31, 30] = ink_map[31, 31] = 1.0           # 3 pixels
  for i in range(4):
    ink_map[20 + i, 25 + i] = 1.0                                       # 4, diagonal
  assert pc.MIN_AREA == 4
  assert pc.count_polygons(_image(ink_map)[None]).tolist() == [5 + 1]   # rows of 4..8, diagonal
  assert pc.count_polygons(_image(ink_map)[None], min_area=1).tolist() == [10]
  assert pc.count_polygons(_image(ink_map)[None], min_area=5).tolist() == [4]
  # Specks (1-3 pixels) sprinkled around two polygons do not change their count.
  rng = np.random.default_rng(0)
  base = np.zeros((48, 48))
  _rect(base, 5, 5, 6, 6)
  _rect(base, 30, 30, 5, 7)
  for _ in range(20):
    r, c = rng.integers(15, 27, size=2)
    base[r, c:c + rng.integers(1, 4)] = rng.uniform(0.6, 1)
  labels, n = pc.shapes(pc.ink(_image(base)[None])[0])
  assert n >= 2 and pc.count_polygons(_image(base)[None]).tolist() == [n]
  assert np.bincount(labels.ravel())[1:].min() >= 4


# ------------------------------------------------------------------------------- vertices


@pytest.mark.parametrize("radius", [3.5, 4.5, 6.0, 10.0, 20.0])
def test_vertices_of_single_regular_polygons(radius):
  rng = np.random.default_rng(int(radius * 10))
  size = int(2 * radius + 8)
  for v in range(3, 8):
    images = [_image(_pil_polygons(size, [_regular(v, size / 2 + rng.uniform(-0.5, 0.5),
                                                   size / 2 + rng.uniform(-0.5, 0.5), radius,
                                                   rng.uniform(0, 2 * np.pi))]))
              for _ in range(30)]
    read = pc.read_polygons(np.stack(images))
    assert read["count"].tolist() == [1] * 30
    assert [x.tolist() for x in read["vertices"]] == [[v]] * 30, (v, radius)


def test_vertices_of_several_polygons_and_uniformity():
  rng = np.random.default_rng(5)
  centres = [(12, 12), (36, 12), (12, 36), (36, 36)]
  cases = [((3, 4, 5, 7), False), ((6, 6, 6, 6), True), ((5,), True), ((), True),
           ((3, 3, 3, 6), False), ((7, 7), True), ((4, 5), False)]
  images = []
  for vs, _ in cases:
    polys = [_regular(v, x, y, rng.uniform(5, 9), rng.uniform(0, 7))
             for v, (x, y) in zip(vs, centres)]
    images.append(_image(_pil_polygons(48, polys)))
  read = pc.read_polygons(np.stack(images))
  assert read["count"].tolist() == [len(vs) for vs, _ in cases]
  assert [sorted(x.tolist()) for x in read["vertices"]] == [sorted(vs) for vs, _ in cases]
  assert read["uniform"].tolist() == [u for _, u in cases]
  assert read["vertex_mode"].tolist() == [3, 6, 5, 0, 3, 7, 4]


def test_polygons_metrics_on_constructed_batches():
  rng = np.random.default_rng(2)
  images, counts, uniform = [], [], []
  for i in range(12):
    n = i % 5
    vs = [4] * n if i % 3 else [3 + (k % 2) for k in range(n)]
    polys = [_regular(v, 12 + 24 * (k % 2), 12 + 24 * (k // 2), 7.0, rng.uniform(0, 7))
             for k, v in enumerate(vs)]
    images.append(_image(_pil_polygons(48, polys)))
    counts.append(n), uniform.append(len(set(vs)) <= 1)
  labels = np.array(counts) + np.array([0, 0, 1, 0, -1, 0, 0, 3, 0, 0, 0, 1]) * (
      np.array(counts) > 0)
  got = constraints.polygons_metrics(np.stack(images), labels)
  assert got["count_accuracy"] == pytest.approx(np.mean(labels == counts))
  assert got["mean_count_error"] == pytest.approx(np.mean(np.abs(labels - np.array(counts))))
  assert got["vertex_uniformity"] == pytest.approx(np.mean(uniform))
  assert 0 < got["count_accuracy"] < 1 and 0 < got["vertex_uniformity"] < 1
  with pytest.raises(ValueError, match="labels has shape"):
    constraints.polygons_metrics(np.stack(images), labels[:3])
  with pytest.raises(ValueError, match="RGB"):
    pc.count_polygons(np.stack(images)[..., :1])
