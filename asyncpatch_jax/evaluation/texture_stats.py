"""Texture statistics of a completion: patch-distribution distances and the seam across the boundary.

Used by experiments/asyncpatch/texture_synthesis.py (AsyncPatch Sec. 5.4, App. J: give the top half
of a texture, generate the bottom half with input guidance).

Why these statistics. A texture is a stationary distribution of local neighbourhoods
(Efros & Leung 1999; the patch-based methods AsyncPatch Sec. 5.4 compares with copy
exactly such neighbourhoods), so "the completion reproduces the exemplar's texture"
means: the distribution of its k x k patches matches that of the exemplar's held-out
bottom half, wherever the patches sit. The sliced Wasserstein distance between the two
patch sets (Rabin et al. 2011; the texture loss of Heitz et al. 2021) compares the whole
distributions, not only their first two moments, is 0 iff the projected distributions
agree, and ignores where a patch sits (a completion need not copy pixels). With 1 x 1
patches and the channel axes as directions it is the per-channel Wasserstein-1 distance
of the colour histograms. The seam statistic asks whether the boundary between the
given and the generated rows is as smooth as the rest of the image.

All functions take images in [-1, 1], [B, H, W, C].
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks


def patches(images, size: int) -> jax.Array:
  """All overlapping size x size patches (stride 1, valid): [B, H, W, C] -> [B, P, size*size*C].

  P = (H - size + 1)(W - size + 1), raster order; a patch's vector is its pixels in raster
  order, channels last (patch[i, j, c] at (i * size + j) * C + c).
  """
  x = jnp.asarray(images)
  b, h, w, c = x.shape
  rows, cols = h - size + 1, w - size + 1
  stacked = jnp.stack([x[:, i:i + rows, j:j + cols] for i in range(size) for j in range(size)],
                      axis=3)                                     # [B, rows, cols, size^2, C]
  return stacked.reshape(b, rows * cols, size * size * c)


def random_directions(key: jax.Array, num: int, dim: int) -> jax.Array:
  """`num` directions uniform on the unit sphere of R^dim: [num, dim]."""
  d = jax.random.normal(key, (num, dim))
  return d / jnp.linalg.norm(d, axis=1, keepdims=True)


def sliced_wasserstein(a, b, directions) -> jax.Array:
  """Sliced Wasserstein-1 distance of two equal-size point sets, per batch element.

  SW(a, b) = mean over directions theta of W1(<a, theta>, <b, theta>), with the 1-D
  Wasserstein-1 distance of two n-point empirical distributions = mean |sorted
  difference|. a, b: [..., N, D]; directions: [P, D]. Returns [...].
  """
  pa = jnp.sort(jnp.asarray(a) @ jnp.asarray(directions).T, axis=-2)   # [..., N, P]
  pb = jnp.sort(jnp.asarray(b) @ jnp.asarray(directions).T, axis=-2)
  return jnp.mean(jnp.abs(pa - pb), axis=(-2, -1))


def _check_pair(x, y, name: str) -> None:
  checks.check_image(x, f"{name} x")
  if np.shape(x) != np.shape(y):
    raise checks.InputError(f"{name}: images of shapes {tuple(np.shape(x))} and "
                            f"{tuple(np.shape(y))}; compare two batches of the same shape.")


@functools.partial(jax.jit, static_argnames=("size",))
def _patch_swd(x, y, directions, size):
  return sliced_wasserstein(patches(x, size), patches(y, size), directions)


def patch_swd(x, y, *, size: int = 4, num_directions: int = 128,
              key: jax.Array | None = None) -> jax.Array:
  """Sliced Wasserstein distance between the size x size patch sets of x[i] and y[i]: [B].

  x, y: [B, H, W, C] (e.g. the generated and the held-out halves). The directions are
  drawn from `key` (default key(0), the same for every call, so values compare across
  calls).
  """
  _check_pair(x, y, "patch_swd")
  size = checks.check_positive_int(size, "size")
  if size > min(np.shape(x)[1:3]):
    raise checks.InputError(f"patch size {size} exceeds the images' {np.shape(x)[1:3]}.")
  dim = size * size * np.shape(x)[-1]
  directions = random_directions(jax.random.key(0) if key is None else key,
                                 checks.check_positive_int(num_directions, "num_directions"), dim)
  return _patch_swd(jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32), directions, size)


def colour_w1(x, y) -> jax.Array:
  """Wasserstein-1 distance of the per-channel value histograms, mean over channels: [B]."""
  _check_pair(x, y, "colour_w1")
  c = np.shape(x)[-1]
  flat = lambda z: jnp.asarray(z, jnp.float32).reshape(np.shape(z)[0], -1, c)
  return sliced_wasserstein(flat(x), flat(y), jnp.eye(c))


def seam(images, row: int) -> dict[str, jax.Array]:
  """How visible the boundary above `row` is (the first generated row; rows < row given).

  seam_l1     mean |x[row] - x[row - 1]| over columns and channels: the jump across the seam;
  interior_l1 mean |x[i] - x[i - 1]| over the generated rows' own neighbours, i > row;
  seam_ratio  seam_l1 / interior_l1: about 1 when the seam is no sharper than the
              texture's own row-to-row changes, > 1 for a visible seam.
  images: [B, H, W, C]; 1 <= row <= H - 2. Returns {name: [B]}.
  """
  checks.check_image(images, "images")
  h = np.shape(images)[1]
  if not 1 <= row <= h - 2:
    raise checks.InputError(f"seam row {row} must leave a given row above it and two "
                            f"generated rows (1 <= row <= {h - 2}).")
  x = jnp.asarray(images, jnp.float32)
  diffs = jnp.abs(x[:, 1:] - x[:, :-1])                         # [B, H-1, W, C]; row i -> i+1
  seam_l1 = jnp.mean(diffs[:, row - 1], axis=(1, 2))
  interior = jnp.mean(diffs[:, row:], axis=(1, 2, 3))
  return {"seam_l1": seam_l1, "interior_l1": interior,
          "seam_ratio": seam_l1 / jnp.maximum(interior, 1e-8)}
