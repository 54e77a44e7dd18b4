"""Patch partition of images and per-patch covariance spectra (PIFS Sec. 3.2, 7.1).

An image `[H, W, C]` is cut into `M = (H / p) * (W / p)` square patches of
`p x p x C` pixels, numbered in raster order (row of patches first): patch
`k = i * (W / p) + j` covers rows `i p .. i p + p - 1` and columns `j p .. j p + p - 1`.
A patch is flattened to `n_k = p * p * C` entries in its own `[p, p, C]` row-major
order.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import einops
import numpy as np

from asyncpatch_jax.runtime import checks


def patch_grid(image_shape, patch_size: int) -> tuple[int, int, int]:
  """Checks the partition and returns `(M_h, M_w, n_k)`.

  Args:
    image_shape: `(H, W, C)`.
    patch_size: p, which must divide both H and W.
  """
  if len(image_shape) != 3:
    raise checks.InputError(f"image shape {tuple(image_shape)}; expected [H, W, C].")
  h, w, c = image_shape
  checks.check_positive_int(patch_size, "patch_size")
  patch_size = int(patch_size)
  if h % patch_size or w % patch_size:
    raise checks.InputError(f"patch_size = {patch_size} does not divide the image of shape "
                     f"[H, W, C] = [{h}, {w}, {c}]; H and W must both be multiples of it.")
  return h // patch_size, w // patch_size, patch_size * patch_size * c


def patchify(x, patch_size: int):
  """`[..., H, W, C] -> [..., M, p * p * C]` (raster order). Works on jnp and np arrays."""
  return einops.rearrange(x, "... (m p) (n q) c -> ... (m n) (p q c)", p=patch_size,
                          q=patch_size)


def unpatchify(patches, image_shape, patch_size: int):
  """`[..., M, p * p * C] -> [..., H, W, C]`, the inverse of `patchify`."""
  h, w, c = image_shape
  p = patch_size
  return einops.rearrange(patches, "... (m n) (p q c) -> ... (m p) (n q) c", m=h // p,
                          n=w // p, p=p, q=p, c=c)


def patch_permutation(image_shape, patch_size: int) -> np.ndarray:
  """`perm [n]` such that `x.reshape(-1)[perm] == patchify(x).reshape(-1)`."""
  idx = np.arange(int(np.prod(image_shape))).reshape(image_shape)
  return np.asarray(patchify(idx, patch_size)).reshape(-1)


class PatchSpectra(NamedTuple):
  """Per-patch covariance and its spectrum (PIFS Def. 18: lambda_k, v_k^(1))."""
  mean: np.ndarray  # [M, n_k]
  cov: np.ndarray  # [M, n_k, n_k]
  eigvals: np.ndarray  # [M, n_k], descending
  eigvecs: np.ndarray  # [M, n_k, n_k], column i belongs to eigvals[:, i]
  lambdas: np.ndarray  # [M], the top eigenvalue lambda_k = ||Sigma_k||
  top_vectors: np.ndarray  # [M, n_k], unit top eigenvectors v_k^(1)
  count: int


def patch_covariance_spectra(batches: Iterable, patch_size: int) -> PatchSpectra:
  """Per-patch covariances Sigma_k of a dataset and their spectra (PIFS Sec. 7.1).

  Streams the batches once, accumulating float64 sums; the covariance is the
  unbiased sample covariance (divisor N - 1).

  Args:
    batches: iterable of image batches `[B, H, W, C]` (NumPy or JAX), all the same
      `[H, W, C]`.
    patch_size: p, dividing H and W.

  Returns:
    `PatchSpectra`.
  """
  total = None
  count = 0
  shape = None
  for i, batch in enumerate(batches):
    b = np.asarray(batch, dtype=np.float64)
    if b.ndim != 4:
      raise checks.InputError(f"batch {i} has shape {b.shape}; expected [B, H, W, C].")
    if shape is None:
      shape = b.shape[1:]
      patch_grid(shape, patch_size)
    elif b.shape[1:] != shape:
      raise checks.InputError(f"batch {i} has images {b.shape[1:]}; earlier batches had {shape}.")
    pts = patchify(b, patch_size)  # [B, M, n_k]
    s1 = pts.sum(0)
    s2 = np.einsum("bmi,bmj->mij", pts, pts)
    total = (s1, s2) if total is None else (total[0] + s1, total[1] + s2)
    count += b.shape[0]
  if count < 2:
    raise checks.InputError(f"batches held {count} images; need at least 2 for a covariance.")
  mean = total[0] / count
  cov = (total[1] - count * np.einsum("mi,mj->mij", mean, mean)) / (count - 1)
  cov = 0.5 * (cov + np.swapaxes(cov, 1, 2))
  w, v = np.linalg.eigh(cov)
  w, v = w[:, ::-1], v[:, :, ::-1]
  return PatchSpectra(mean=mean, cov=cov, eigvals=w, eigvecs=v, lambdas=w[:, 0],
                      top_vectors=v[:, :, 0].copy(), count=count)
