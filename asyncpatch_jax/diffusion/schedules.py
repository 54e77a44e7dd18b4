"""Spatial noise schedules: the tensor `tau [N+1, H, W]` (or `[N+1, B, H, W]`) and its constructors.

A spatial schedule gives every pixel its own time at every sampler step
(AsyncPatch Sec. 3.2): `tau[0]` are the start times, `tau[N] = 0`, and each
pixel's time is non-increasing in the step index. Step k of the sampler moves
pixel i from `tau[k, i]` to `tau[k + 1, i]`; a pixel whose time does not change
is left untouched, and pixels at 0 throughout are the known ones.

Constructors (NumPy, built once on the host, validated, then fed to the compiled
sampler as data, so every schedule of the same shape reuses one compilation):
  synchronous        all pixels 1 -> 0 together (standard diffusion);
  inpainting         Eq. 4: known pixels (mask = 1) stay at 0, the rest go 1 -> 0;
  outpainting        a known box inside a larger canvas, the border generated
                     (optionally in K bands outward);
  autoregressive     raster-ordered patch groups, each 1 -> 0 in turn (the
                     piecewise-linear tau of Sec. 3.2);
  progressive        K stripes of the unknown region, by distance from the known
                     boundary, filled one after another from the boundary inward
                     (Growing Images Sec. 2);
  interleaved        the same stripes visited round-robin, each visit lowering the
                     stripe's time by 1/R (Growing Images Sec. 4.2, T_int steps a visit);
  from_stages        the general engine behind the last four.
`steps_per_pixel(tau)` counts the network evaluations each pixel receives.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from asyncpatch_jax.runtime import checks

KNOWN = -1  # group id of known pixels in a group map


def validate_schedule(tau, image_hw: Sequence[int] | None = None,
                      batch: int | None = None, name: str = "tau") -> np.ndarray:
  """Checks a user schedule and returns it as float32 `[N+1, (B,) H, W]`.

  Raises ValueError naming the first violation: wrong rank or shape, values outside
  [0, 1], a time that increases from one step to the next, a last step that is not 0.
  """
  tau = np.asarray(tau, dtype=np.float64)
  if tau.ndim not in (3, 4):
    raise checks.InputError(f"{name} has shape {tau.shape}; expected [N+1, H, W] or "
                     "[N+1, B, H, W].")
  if tau.shape[0] < 2:
    raise checks.InputError(f"{name} has {tau.shape[0]} time slices; a schedule needs N+1 >= 2.")
  if image_hw is not None and tuple(tau.shape[-2:]) != tuple(image_hw):
    raise checks.InputError(f"{name} has spatial shape {tau.shape[-2:]}; expected "
                     f"{tuple(image_hw)} to match the image.")
  if batch is not None and tau.ndim == 4 and tau.shape[1] != batch:
    raise checks.InputError(f"{name} has batch size {tau.shape[1]}; expected {batch}.")
  if not np.isfinite(tau).all():
    raise checks.InputError(f"{name} holds non-finite values.")
  if tau.min() < 0.0 or tau.max() > 1.0:
    raise checks.InputError(f"{name} has values in [{tau.min():.4g}, {tau.max():.4g}]; times "
                     "must lie in [0, 1].")
  inc = np.argwhere(tau[1:] > tau[:-1])
  if inc.size:
    k, *pix = inc[0]
    raise checks.InputError(
        f"{name} increases in time at step {k} -> {k + 1}, pixel {tuple(pix)}: "
        f"{tau[(k, *pix)]:.4g} -> {tau[(k + 1, *pix)]:.4g}; each pixel's time must be "
        "non-increasing along the steps.")
  if np.any(tau[-1] != 0.0):
    raise checks.InputError(f"{name}[-1] has values up to {tau[-1].max():.4g}; a schedule must "
                     "end at 0 (clean) for every pixel.")
  return tau.astype(np.float32)


def _check_steps(num_steps: int, name: str = "num_steps") -> None:
  checks.check_positive_int(num_steps, name)


def _ramp(num_steps: int, t_start: float = 1.0) -> np.ndarray:
  """t_start * (1 - k / N) for k = 0..N: [N+1]."""
  return t_start * (1.0 - np.arange(num_steps + 1, dtype=np.float64) / num_steps)


def synchronous(num_steps: int, height: int, width: int,
                t_start: float = 1.0) -> np.ndarray:
  """All pixels go from t_start to 0 together: `[N+1, H, W]`."""
  _check_steps(num_steps)
  if not 0.0 < t_start <= 1.0:
    raise checks.InputError(f"t_start={t_start}; expected 0 < t_start <= 1.")
  tau = _ramp(num_steps, t_start)[:, None, None] * np.ones((1, height, width))
  return validate_schedule(tau)


def _check_mask_2d_or_3d(mask, name="mask") -> np.ndarray:
  arr = np.asarray(mask)
  if arr.ndim not in (2, 3):
    raise checks.InputError(f"{name} has shape {arr.shape}; expected [H, W] or [B, H, W] "
                     "(1 = known pixel, 0 = pixel to generate).")
  return checks.check_mask(arr, arr.shape, name)


def inpainting(mask, num_steps: int) -> np.ndarray:
  """AsyncPatch Eq. 4: tau_i(u) = (1 - m_i)(1 - u); known pixels stay at 0.

  mask: [H, W] or [B, H, W], 1 = known. Returns `[N+1, H, W]` or `[N+1, B, H, W]`.
  """
  _check_steps(num_steps)
  m = _check_mask_2d_or_3d(mask)
  tau = _ramp(num_steps).reshape((-1,) + (1,) * m.ndim) * (1.0 - m)[None]
  return validate_schedule(tau)


def box_mask(height: int, width: int, box: Sequence[int]) -> np.ndarray:
  """A [H, W] mask with 1 inside `box = (top, left, box_height, box_width)`."""
  top, left, bh, bw = (int(v) for v in box)
  if bh < 1 or bw < 1 or top < 0 or left < 0 or top + bh > height or left + bw > width:
    raise checks.InputError(f"box={tuple(box)} (top, left, height, width) does not fit in a "
                     f"{height}x{width} image.")
  m = np.zeros((height, width), np.float32)
  m[top:top + bh, left:left + bw] = 1.0
  return m


def from_stages(groups, stages: Sequence[tuple[int, int, float]]) -> np.ndarray:
  """The general staged schedule: groups move in turn, linearly in the step index.

  Args:
    groups: int [H, W] or [B, H, W]; group ids 0..G-1, or KNOWN (-1) for known pixels.
      All groups start at t = 1.
    stages: (group, steps, t_end) triples, run in order; during a stage only that
      group moves, linearly from its current time to t_end over `steps` steps.
  Returns:
    tau: [N+1, (B,) H, W] with N = sum of steps; validated (ends at 0).
  """
  groups = np.asarray(groups)
  level = np.where(groups == KNOWN, 0.0, 1.0)
  slices = [level.copy()]
  for g, steps, t_end in stages:
    _check_steps(steps, "steps of a stage")
    sel = groups == g
    start = level[sel][0] if sel.any() else t_end
    for k in range(1, steps + 1):
      level = np.where(sel, start + (t_end - start) * k / steps, level)
      slices.append(level.copy())
  return validate_schedule(np.stack(slices))


def grid_regions(height: int, width: int, grid: Sequence[int]) -> np.ndarray:
  """[H, W] int32 region ids of a (rows, cols) grid of equal patches, raster order."""
  if len(grid) != 2 or min(grid) < 1:
    raise checks.InputError(f"grid={tuple(grid)}; expected (rows, cols) of positive ints.")
  rows, cols = (int(g) for g in grid)
  checks.check_divisible(height, rows, "height", f"grid rows {rows}")
  checks.check_divisible(width, cols, "width", f"grid cols {cols}")
  r = np.arange(height) // (height // rows)
  c = np.arange(width) // (width // cols)
  return (r[:, None] * cols + c[None, :]).astype(np.int32)


def known_regions(regions: np.ndarray, mask) -> tuple[np.ndarray, np.ndarray]:
  """(fully known [N], partly known [N]) of each region of `regions` [H, W] under `mask`
  [H, W] (1 = known; None: nothing known)."""
  n = int(np.asarray(regions).max()) + 1
  if mask is None:
    return np.zeros((n,), bool), np.zeros((n,), bool)
  mask = np.asarray(mask)
  full = np.array([mask[regions == k].min() for k in range(n)]) == 1
  partly = np.array([mask[regions == k].max() for k in range(n)]) == 1
  return full, partly


def check_regions(regions, image_hw: Sequence[int]) -> tuple[np.ndarray, int]:
  """A region map [H, W] of ints whose values are exactly 0..N-1; returns it and N."""
  arr = np.asarray(regions)
  if arr.shape != tuple(image_hw):
    raise checks.InputError(f"regions has shape {arr.shape}; expected the image size "
                     f"{tuple(image_hw)} (an int region id per pixel, see schedules.grid_regions).")
  if not np.issubdtype(arr.dtype, np.integer):
    raise checks.InputError(f"regions has dtype {arr.dtype}; expected integer region ids 0..N-1.")
  ids = np.unique(arr)
  if ids[0] != 0 or ids[-1] != len(ids) - 1:
    raise checks.InputError(f"regions must use every id 0..N-1 (got ids {ids.min()}..{ids.max()} "
                     f"with {len(ids)} distinct values).")
  return arr.astype(np.int32), len(ids)


def autoregressive(height: int, width: int, grid: Sequence[int],
                   steps_per_group: int) -> np.ndarray:
  """Raster-ordered generation of a `grid = (rows, cols)` of patches (AsyncPatch Sec. 3.2).

  Group k (raster order, k = 1..K) follows tau(u) = clip(K (k/K - u), 0, 1): fully
  noisy before its stage, linear to 0 during it, clean after. `[K * steps + 1, H, W]`.
  """
  ids = grid_regions(height, width, grid)
  return from_stages(ids, [(k, steps_per_group, 0.0) for k in range(int(ids.max()) + 1)])


def stripe_groups(mask, num_stripes: int, *, allow_empty: bool = False) -> np.ndarray:
  """Splits the unknown pixels of `mask` into K stripes by distance from the known region.

  Stripe 0 touches the known boundary, stripe K-1 is the deepest. For a half-image
  mask these are the K vertical stripes of Growing Images Sec. 2 (as equal in width as
  the masked width allows). Distances are Euclidean (scipy's distance transform),
  binned into K equal-width intervals.
  mask: [H, W] or [B, H, W], 1 = known (at least one known pixel per image).
  allow_empty: keep going when a stripe would hold no pixel (its steps then move
    nothing); by default a K larger than the masked width is refused.
  Returns int [H, W] / [B, H, W] group ids with KNOWN for known pixels.
  """
  checks.check_positive_int(num_stripes, "num_stripes")
  m = _check_mask_2d_or_3d(mask)
  if m.ndim == 3:
    out = []
    for i, mi in enumerate(m):
      try:
        out.append(stripe_groups(mi, num_stripes, allow_empty=allow_empty))
      except checks.InputError as e:
        raise checks.InputError(f"mask {i} of the batch: {e}") from None
    return np.stack(out)
  if not m.any():
    raise checks.InputError("mask has no known pixel; progressive schedules grow from the known "
                     "region (use synchronous for unconditional generation).")
  unknown = m == 0
  dist = ndimage.distance_transform_edt(unknown)  # distance to the nearest known pixel
  groups = np.full(m.shape, KNOWN, np.int64)
  if unknown.any():
    groups[unknown] = _bin_depths(dist[unknown], num_stripes)
    if not allow_empty and len(np.unique(groups[unknown])) < num_stripes:
      most = max(k for k in range(1, num_stripes)
                 if len(np.unique(_bin_depths(dist[unknown], k))) == k)
      raise checks.InputError(
          f"num_stripes={num_stripes} is larger than the masked width: the unknown region is "
          f"{int(np.ceil(dist.max()))} pixel(s) deep from the known boundary, so some stripe "
          f"would hold no pixel; use num_stripes <= {most} for this mask.")
  return groups


def _bin_depths(d: np.ndarray, num_stripes: int) -> np.ndarray:
  """Stripe ids 0..K-1 of depths d: K equal-width intervals of [d.min(), d.max()]."""
  lo, hi = d.min(), d.max()
  frac = (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
  return np.minimum((frac * num_stripes).astype(np.int64), num_stripes - 1)


def steps_per_pixel(tau) -> np.ndarray:
  """Network evaluations each pixel receives: the number of steps at which its time changes.

  tau: [N+1, (B,) H, W]. Returns int [(B,) H, W]; 0 for known pixels. (The sampler
  evaluates the network on the whole image every step; this counts the steps that move
  a pixel, e.g. T for every unknown pixel of progressive(mask, K, T).)
  """
  tau = np.asarray(tau)
  return np.sum(tau[1:] != tau[:-1], axis=0)


def progressive(mask, num_stripes: int, steps_per_stripe: int, *,
                allow_empty: bool = False) -> np.ndarray:
  """K stripes filled one after another from the known boundary inward.

  Each stripe runs 1 -> 0 over `steps_per_stripe` steps while the deeper ones stay
  at 1 (Growing Images Sec. 2: T steps per stripe, K * T in all). K = 1 is inpainting.
  A K larger than the masked width is refused unless allow_empty (stripe_groups).
  """
  groups = stripe_groups(mask, num_stripes, allow_empty=allow_empty)
  return from_stages(groups, [(j, steps_per_stripe, 0.0) for j in range(num_stripes)])


def interleaved(mask, num_stripes: int, num_rounds: int, steps_per_visit: int, *,
                allow_empty: bool = False) -> np.ndarray:
  """The stripes visited round-robin; visit r of a stripe lowers it to 1 - (r+1)/R.

  Growing Images Sec. 4.2: concentrated on one region at a time like progressive, but
  every region is revisited R times, T_int = steps_per_visit steps a visit (R T_int
  steps per pixel, K R T_int in all: progressive's budget when R T_int = T).
  """
  _check_steps(num_rounds, "num_rounds")
  groups = stripe_groups(mask, num_stripes, allow_empty=allow_empty)
  stages = [(j, steps_per_visit, 1.0 - (r + 1) / num_rounds)
            for r in range(num_rounds) for j in range(num_stripes)]
  return from_stages(groups, stages)


def outpainting(height: int, width: int, known_box: Sequence[int], num_steps: int,
                num_bands: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """Generates the canvas around a known box; returns `(tau, mask)`.

  With num_bands = 1 the whole border is generated together (Eq. 4 on the box mask);
  with K > 1 it grows outward in K bands of num_steps // K steps each.
  """
  mask = box_mask(height, width, known_box)
  if num_bands == 1:
    return inpainting(mask, num_steps), mask
  if num_steps % num_bands:
    raise checks.InputError(f"num_steps={num_steps} is not divisible by num_bands={num_bands}.")
  return progressive(mask, num_bands, num_steps // num_bands), mask
