"""Reading Counting Polygons images: the polygons' count and each polygon's number of vertices.

IPR Sec. 4.3 / App. C.3.3 read generated images with the benchmark's fine-tuned ResNet-50
(polygon count, vertex count, uniformity). Offline there is no such classifier; on the
plain background of `data/polygons.py` the polygons are read exactly instead:

  ink        2 (1 - max(R, G, B)) of a pixel in [0, 1], clipped to [0, 1] (images clipped
             to [-1, 1] first): the pixel's darkness against the data's fill colour, whose
             largest channel is 1/2 (HSL, S = 1, L = 1/4). On the data it is the share of the
             pixel a polygon covers, whatever the hue. Bright colours (a channel at 3/4 or
             more: the saturated speckle of an unfinished sample, yellow, white) are no ink;
             black and mid-grey are full ink.
  shape      a pixel belongs to a shape iff its ink is above `threshold` = 1/2 (more than half
             of it covered; for a convex polygon this puts the pixel's centre inside it);
             shapes are the 8-connected components of such pixels (pixels that meet only at
             a corner are joined, so a thin diagonal edge is not cut in two), and a
             component of fewer than `min_area` = 4 pixels is a speck, not a polygon.
  count      the number of shapes. Polygons that overlap or share an edge are one shape;
             two more than sqrt(2) pixels apart are always two (a pixel more than half
             covered by a convex polygon has its centre inside it, and the centres of
             8-adjacent pixels are at most sqrt(2) apart); closer ones, or ones touching at
             one vertex, read as one or two with the sub-pixel position. The data keeps its
             polygons 2 pixels apart, so the count is exact on every data image (tested),
             and a generated image is read as a viewer sees it: one shape per blob.
  vertices   for each shape, the angular harmonics of its ink w over the shape and the
             pixels 8-adjacent to it (the anti-aliased rim; a rim pixel goes to its nearest
             shape), in polar coordinates (r, phi) about the ink centroid:
             h_k = |sum w r^2 e^{i k phi}| / sum w r^2 for k = 3..7. A regular V-gon has
             h_k = 0 unless V divides k, and h_V > h_2V (a triangle's h_3 is about 0.54, its
             h_6 0.32), so V = argmax_k h_k. Exact on single regular polygons of circumradius
             >= 3.5 pixels at any rotation and sub-pixel position (tested); below that a
             heptagon is a disc. Any other blob reads as the V it is closest to.
  uniform    every shape of the image reads the same V (True for 0 or 1 shapes).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from asyncpatch_jax.runtime import checks

THRESHOLD = 0.5
MIN_AREA = 4
VERTEX_RANGE = (3, 7)
# 8-connectivity: the 3x3 structuring element.
EIGHT = np.ones((3, 3), bool)


def ink(images: np.ndarray) -> np.ndarray:
  """[B, H, W, 3] RGB in [-1, 1] -> [B, H, W] ink 2 (1 - max(R, G, B)) in [0, 1]."""
  images = np.asarray(images, np.float64)
  checks.check_image(images, "polygon images")
  if images.shape[-1] != 3:
    raise checks.InputError(f"polygon images must be RGB [B, H, W, 3], got shape {images.shape}.")
  value = (np.clip(images, -1.0, 1.0).max(axis=-1) + 1.0) / 2.0      # HSV V in [0, 1]
  return np.clip(2.0 * (1.0 - value), 0.0, 1.0)


def shapes(ink_map: np.ndarray, threshold: float = THRESHOLD,
           min_area: int = MIN_AREA) -> tuple[np.ndarray, int]:
  """One image's shapes: labels [H, W] (0 = background, 1..n), and n.

  A shape is an 8-connected component of pixels with ink > threshold holding at least
  min_area pixels; smaller components are dropped (label 0).
  """
  labels, n = ndimage.label(ink_map > threshold, structure=EIGHT)
  if n == 0:
    return labels, 0
  areas = np.bincount(labels.ravel(), minlength=n + 1)
  keep = areas >= min_area
  keep[0] = False
  relabel = np.zeros(n + 1, np.int64)
  relabel[keep] = np.arange(1, keep.sum() + 1)
  return relabel[labels], int(keep.sum())


def count_polygons(images: np.ndarray, threshold: float = THRESHOLD,
                   min_area: int = MIN_AREA) -> np.ndarray:
  """[B] int64: the number of shapes (polygons) in each image [B, H, W, 3] in [-1, 1]."""
  return np.array([shapes(m, threshold, min_area)[1] for m in ink(images)], np.int64)


def harmonics(ink_map: np.ndarray, support: np.ndarray, ks) -> np.ndarray:
  """h_k = |sum w r^2 e^{i k phi}| / sum w r^2 over `support` [H, W] bool, w = ink, about the
  ink centroid (pixel centres at +0.5); [len(ks)]."""
  rows, cols = np.nonzero(support)
  w = ink_map[rows, cols]
  x, y = cols + 0.5, rows + 0.5
  dx, dy = x - (w * x).sum() / w.sum(), y - (w * y).sum() / w.sum()
  wr2 = w * (dx * dx + dy * dy)
  phi = np.arctan2(dy, dx)
  ks = np.asarray(ks)
  return np.abs((wr2[None] * np.exp(1j * ks[:, None] * phi[None])).sum(axis=1)) / wr2.sum()


def read_image(ink_map: np.ndarray, threshold: float = THRESHOLD, min_area: int = MIN_AREA,
               vertex_range=VERTEX_RANGE) -> tuple[int, np.ndarray]:
  """One image [H, W] of ink: (count, vertices [count] int64 read for each shape)."""
  labels, n = shapes(ink_map, threshold, min_area)
  if n == 0:
    return 0, np.zeros(0, np.int64)
  # Each pixel's nearest shape and its distance: the rim is the 8-neighbourhood (<= sqrt 2).
  dist, (ri, ci) = ndimage.distance_transform_edt(labels == 0, return_indices=True)
  nearest = labels[ri, ci]
  near = dist <= 1.5
  ks = np.arange(vertex_range[0], vertex_range[1] + 1)
  vertices = np.array([ks[np.argmax(harmonics(ink_map, near & (nearest == j), ks))]
                       for j in range(1, n + 1)], np.int64)
  return n, vertices


def read_polygons(images: np.ndarray, threshold: float = THRESHOLD, min_area: int = MIN_AREA,
                  vertex_range=VERTEX_RANGE) -> dict:
  """Reads images [B, H, W, 3] in [-1, 1] (see the module docstring).

  Returns dict: `count` [B] int64, `vertices` (a list of B int64 arrays, one entry per
  shape), `uniform` [B] bool (all shapes read the same V), `vertex_mode` [B] int64 (the
  most frequent V read, 0 for an image without shapes).
  """
  lo, hi = (int(v) for v in vertex_range)
  if not 3 <= lo <= hi:
    raise checks.InputError(f"vertex_range must satisfy 3 <= low <= high, got {vertex_range}.")
  if min_area < 1:
    raise checks.InputError(f"min_area must be >= 1 pixel, got {min_area}.")
  reads = [read_image(m, threshold, min_area, (lo, hi)) for m in ink(images)]
  vertices = [v for _, v in reads]
  return {
      "count": np.array([c for c, _ in reads], np.int64),
      "vertices": vertices,
      "uniform": np.array([len(set(v.tolist())) <= 1 for v in vertices]),
      "vertex_mode": np.array([np.bincount(v).argmax() if len(v) else 0 for v in vertices],
                              np.int64),
  }
