"""The time of a token: how a per-pixel time map meets a model that works on p x p patches.

Definition (used by the DiT, models/dit.py): a token's time is the MEAN of its patch's
pixel times. The library hands a patch model maps that are constant on each patch
(`is_token_aligned`), for which the mean is that constant, so the model sees exactly
the time the sampler gives each of the patch's pixels. The mean (rather than, say, the
top-left pixel) keeps the map's information when a caller passes an unaligned map (a
per-pixel training sampler, an analysis probe), is differentiable in the map, and is
invariant to how the patch is laid out. `align(t, p)` makes a map constant per patch
(each patch takes its largest time: a token is known, time 0, only when all of its
pixels are).
"""

from __future__ import annotations

import einops
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks


def check_patch_size(height: int, width: int, patch_size: int, what: str = "the image") -> None:
  """InputError unless p divides both sides of `what`."""
  if patch_size < 1 or height % patch_size or width % patch_size:
    raise checks.InputError(f"patch size {patch_size} does not divide {what} "
                            f"({height} x {width}); pick a patch size that divides both sides.")


def token_times(t, patch_size: int):
  """Per-token times [B, N] (raster order over the (H/p, W/p) grid) of t: [B] (per image:
  every token gets it) or [B, H, W] (per pixel: each patch's mean)."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 1:
    return t[:, None]
  p = patch_size
  return einops.reduce(t, "b (h p) (w q) -> b (h w)", "mean", p=p, q=p)


def align(t, patch_size: int) -> np.ndarray:
  """A time map [..., H, W] made constant on each p x p patch: each patch's largest time."""
  t = np.asarray(t)
  p = patch_size
  check_patch_size(t.shape[-2], t.shape[-1], p, "the time map")
  pooled = einops.reduce(t, "... (h p) (w q) -> ... h w", "max", p=p, q=p)
  return einops.repeat(pooled, "... h w -> ... (h p) (w q)", p=p, q=p)


def is_token_aligned(t, patch_size: int) -> bool:
  """Whether every p x p patch of the map [..., H, W] has one time."""
  t = np.asarray(t)
  return bool(np.array_equal(align(t, patch_size), t))
