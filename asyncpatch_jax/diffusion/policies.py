"""Schedule policies: the next per-pixel time map as a pure function of the sampler's state.

A tensor schedule `tau [N+1, H, W]` fixes every pixel's times before sampling starts. A
*policy* chooses them as the sample forms (AsyncPatch Sec. 5.5, SRM's sequential adaptive
sampler, Patch Forcing's dual-loop and look-ahead samplers): at step k the sampler hands it
the loop state (`LoopState`: current times t, the sample z, the model's velocity v and
predicted error variance u at (z, t), k, the budget N and the known pixels) and it returns
the next time map s. The sampler (samplers.policy_loop) runs it inside one
`lax.while_loop` and enforces the invariants: s is clipped to [0, t] (times never
increase), known pixels stay at 0 (so they are never altered), and the last step of the
budget sends every pixel to 0. Its debug mode reports a policy that needed the clipping.

A policy is a `Policy`: a static function `fn(state, params) -> s [B, H, W]` and traced
parameters, so one compilation serves every parameter value, region map, budget and key.
Every built-in policy works on *regions* (a map [H, W] of ids 0..R-1: raster patches from
a `grid`, or single pixels by default): a region's uncertainty is the mean over its pixels,
and all its pixels share one time. Built-ins (`get(name, ...)`):

  uncertainty_accelerated  AsyncPatch Sec. 5.5: low-uncertainty regions take larger steps;
  uncertainty_ordered      SRM: the unknown region with the lowest mean predicted sigma
                           starts next, consecutive regions overlapping by `overlap`;
  look_ahead               Patch Forcing: certain regions run ahead of the clock (context);
  dual_loop                Patch Forcing: uncertain regions get `sub_steps` sub-steps per
                           outer step, certain ones one full step;
  schedule                 a tensor tau as a policy (the sample-independent special case).

Uncertainty throughout is the variance u of the model's velocity error predicted by an
uncertainty head (models/uncertainty_head.py), 0 where t = 0; without a head it is 0
everywhere and every policy becomes sample-independent (ties go to the lowest region id).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.diffusion import schedules


class LoopState(NamedTuple):
  """What a policy sees at step k (before the step is taken).

  t: [B, H, W] current times; z: [B, H, W, C] current sample; v: [B, H, W, C] the
  model's velocity at (z, t); u: [B, H, W] predicted velocity-error variance at (z, t),
  0 where t = 0; step: int32 k (0-based); budget: int32 N, the steps allowed in all;
  known: [B, H, W] bool, the given pixels (held at t = 0).
  """
  t: jax.Array
  z: jax.Array
  v: jax.Array
  u: jax.Array
  step: jax.Array
  budget: jax.Array
  known: jax.Array


PolicyFn = Callable[[LoopState, dict], jax.Array]


@dataclasses.dataclass(frozen=True)
class Policy:
  """A schedule policy: `fn(state, params) -> next times [B, H, W]` with traced `params`.

  Attributes:
    name: for messages and results.
    fn: the pure policy function (static: one compilation per function).
    params: float/int parameters (traced).
    regions: None (every pixel its own region), a (rows, cols) grid of raster patches, or
      an int map [H, W] of region ids 0..R-1. Resolved to a traced map by `arguments`.
    min_budget: host check, `min_budget(num_unknown_regions, params) -> steps needed`.
  """
  name: str
  fn: PolicyFn
  params: dict = dataclasses.field(default_factory=dict)
  regions: Any = None
  min_budget: Callable[[int, dict], int] | None = None

  def region_map(self, image_hw: Sequence[int]) -> np.ndarray:
    """The [H, W] int32 region ids for images of this size."""
    h, w = (int(s) for s in image_hw)
    if self.regions is None:
      return np.arange(h * w, dtype=np.int32).reshape(h, w)
    if isinstance(self.regions, (tuple, list)) and len(self.regions) == 2 and all(
        np.ndim(g) == 0 for g in self.regions):
      return schedules.grid_regions(h, w, tuple(int(g) for g in self.regions))
    return schedules.check_regions(self.regions, (h, w))[0]

  def arguments(self, image_hw: Sequence[int], known: np.ndarray | None, budget: int,
                num_unknown: int | None = None) -> dict:
    """The traced parameters for images [H, W] with known pixels `known` [B, H, W].

    num_unknown: the most regions any image has to generate, when known is not given
    (e.g. IPR's resampled regions); default: counted from `known`, or all regions.
    Raises InputError when the budget is smaller than the policy needs (e.g. fewer steps
    than the regions a sequential order must start one after another).
    """
    regions = self.region_map(image_hw)
    if self.min_budget is not None:
      if num_unknown is not None:
        n_unknown = int(num_unknown)
      elif known is None:
        n_unknown = int(regions.max()) + 1
      else:
        known = np.asarray(known, bool).reshape(-1, *regions.shape)
        n_unknown = max(len(np.unique(regions[~k])) for k in known)
      need = self.min_budget(n_unknown, self.params)
      if budget < need:
        raise checks.InputError(
            f"policy {self.name!r}: a budget of {budget} steps is smaller than the {need} it "
            f"needs for {n_unknown} unknown regions with {self._describe()}; raise the budget "
            "to at least that, or use fewer regions (a coarser grid).")
    params = {k: jnp.asarray(v, jnp.int32 if isinstance(v, (int, np.integer)) else jnp.float32)
              for k, v in self.params.items()}
    params["regions"] = jnp.asarray(regions, jnp.int32)
    return params

  def _describe(self) -> str:
    return ", ".join(f"{k}={v}" for k, v in self.params.items()) or "no parameters"


# ----------------------------------------------------------------------------- region tools


def region_mean(values: jax.Array, weight: jax.Array, regions: jax.Array
                ) -> tuple[jax.Array, jax.Array]:
  """Weighted mean of `values [B, H, W]` over each region, and the weight per region.

  regions: [H, W] int32 ids. Returns `(mean [B, R], weight [B, R])` with R = H * W
  (ids that no pixel uses get weight 0), so the region count is a traced value.
  """
  b = values.shape[0]
  ids = regions.reshape(-1)
  n = ids.shape[0]

  def seg(a):
    return jax.ops.segment_sum(a.reshape(b, -1).T, ids, num_segments=n).T

  wsum = seg(weight.astype(jnp.float32))
  vsum = seg(values.astype(jnp.float32) * weight)
  return vsum / jnp.where(wsum > 0, wsum, 1.0), wsum


def to_pixels(per_region: jax.Array, regions: jax.Array) -> jax.Array:
  """[B, R] region values -> [B, H, W] pixel values."""
  return jnp.take(per_region, regions, axis=1)


def region_ranks(score: jax.Array, valid: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Per image, the rank of each valid region by increasing score (ties: lower id first).

  score, valid: [B, R]. Returns `(ranks [B, R] int32, count [B] int32)`; invalid regions
  rank after every valid one.
  """
  b, r = score.shape
  order = jnp.argsort(jnp.where(valid, score, jnp.inf), axis=1, stable=True)
  ranks = jnp.zeros((b, r), jnp.int32).at[jnp.arange(b)[:, None], order].set(
      jnp.arange(r, dtype=jnp.int32)[None])
  return ranks, valid.sum(axis=1).astype(jnp.int32)


def region_quantile(score: jax.Array, valid: jax.Array, q) -> jax.Array:
  """Per image, the q-quantile of the valid regions' scores (linear interpolation, as
  numpy/torch `quantile`): score, valid [B, R] -> [B]."""
  srt = jnp.sort(jnp.where(valid, score, jnp.inf), axis=1)
  count = valid.sum(axis=1)
  pos = q * jnp.maximum(count - 1, 0).astype(jnp.float32)
  lo = jnp.floor(pos).astype(jnp.int32)
  hi = jnp.minimum(lo + 1, jnp.maximum(count - 1, 0))
  take = lambda i: jnp.take_along_axis(srt, i[:, None], axis=1)[:, 0]
  a, b = take(lo), take(hi)
  return jnp.where(hi > lo, a + (pos - lo) * (b - a), a)


def _certain_regions(state: LoopState, regions, quantile) -> jax.Array:
  """[B, H, W] bool: pixels whose region's mean uncertainty is strictly below the
  per-image `quantile` of the still-noisy regions (Patch Forcing's split; equal
  uncertainties are all 'uncertain')."""
  moving = (state.t > 0) & ~state.known
  score, weight = region_mean(state.u, moving.astype(jnp.float32), regions)
  valid = weight > 0
  threshold = region_quantile(score, valid, quantile)
  return to_pixels(valid & (score < threshold[:, None]), regions)


# ------------------------------------------------------------------------------ built-ins


def _clock(i, n):
  """1 - i / n, exactly 0 from i = n on (a float32 quotient may leave 1e-8 there)."""
  i = jnp.asarray(i, jnp.float32)
  n = jnp.asarray(n, jnp.float32)
  return jnp.where(i >= n, 0.0, 1.0 - i / n)



def _uncertainty_accelerated(state: LoopState, params: dict) -> jax.Array:
  """AsyncPatch Sec. 5.5 (the heuristic of this project, stated in `uncertainty_accelerated`)."""
  regions = params["regions"]
  moving = (state.t > 0) & ~state.known
  log_u = jnp.log(jnp.maximum(state.u, 1e-20))
  score, weight = region_mean(log_u, moving.astype(jnp.float32), regions)
  valid = weight > 0
  lo = jnp.min(jnp.where(valid, score, jnp.inf), axis=1, keepdims=True)
  hi = jnp.max(jnp.where(valid, score, -jnp.inf), axis=1, keepdims=True)
  # q = 0 for the most certain still-noisy region, 1 for the least certain; when all are
  # equally certain (or one is left) there is nothing to compare: the clock's pace.
  q = jnp.where(hi > lo, (score - lo) / jnp.where(hi > lo, hi - lo, 1.0), 1.0)
  rate = 1.0 + (params["speedup"] - 1.0) * (1.0 - jnp.clip(q, 0.0, 1.0))     # [B, R]
  step = to_pixels(rate, regions) / state.budget.astype(jnp.float32)
  # Snap float32 remainders of the repeated subtraction (~1e-7 per step) to 0.
  nxt = jnp.where(state.t - step < 1e-6, 0.0, state.t - step)
  return jnp.where(moving, nxt, state.t)


def uncertainty_accelerated(speedup: float = 2.0, grid=None) -> Policy:
  """Uncertainty-guided acceleration (AsyncPatch Sec. 5.5, Fig. 7).

  The paper states only the idea ("accelerating sampling where uncertainty is low"); the
  heuristic here: with a budget of N steps the synchronous pace is 1/N per step. At every
  step the mean predicted log-variance of each still-noisy region is scaled to q in [0, 1]
  between the image's most certain (q = 0) and least certain (q = 1) region (all equal:
  q = 1), and a region moves by
  (1 + (speedup - 1)(1 - q)) / N: the most certain at `speedup` times the synchronous
  pace, the least certain at the synchronous pace. No region is slower than the clock, so
  every pixel reaches 0 within the N steps; a certain region needs about N / speedup. The
  scale is recomputed every step from the head's current prediction, so a region that
  becomes uncertain slows down towards the clock's pace. speedup = 1 is the synchronous
  schedule 1 - k/N.

  Args:
    speedup: >= 1, the pace of the most certain region relative to the synchronous one.
    grid: None (per pixel), (rows, cols) raster patches, or a region map [H, W].
  """
  if not float(speedup) >= 1.0:
    raise checks.InputError(f"speedup={speedup}; expected a factor >= 1 (1 = synchronous).")
  return Policy("uncertainty_accelerated", _uncertainty_accelerated,
                {"speedup": float(speedup)}, grid, None)


def _uncertainty_ordered(state: LoopState, params: dict) -> jax.Array:
  """SRM's sequential adaptive order (see `uncertainty_ordered`)."""
  regions, overlap = params["regions"], params["overlap"]
  unknown = ~state.known
  uw = unknown.astype(jnp.float32)
  sigma, weight = region_mean(jnp.sqrt(jnp.maximum(state.u, 0.0)), uw, regions)
  mean_t, _ = region_mean(state.t, uw, regions)
  is_unknown = weight > 0                                          # [B, R]
  started = is_unknown & (mean_t < 1.0)
  n = is_unknown.sum(axis=1).astype(jnp.float32)                   # [B] unknown regions
  budget = state.budget.astype(jnp.float32)
  length = budget / ((n - 1.0) * (1.0 - overlap) + 1.0)            # SRM's ideal block length
  ramp = jnp.ceil(length - 1e-4)                                   # steps per region
  spacing = length * (1.0 - overlap)                               # between starts
  j = jnp.arange(regions.size, dtype=jnp.float32)
  starts = jnp.floor(j[None] * spacing[:, None])                   # [B, R] start steps
  due = ((starts <= state.step.astype(jnp.float32)) & (j[None] < n[:, None])).sum(axis=1)
  need = due - started.sum(axis=1)                                 # regions to start now
  ranks, _ = region_ranks(sigma, is_unknown & ~started)
  new = is_unknown & ~started & (ranks < need[:, None])
  active = to_pixels(started | new, regions) & unknown
  ramp_px = ramp[:, None, None]
  done_steps = jnp.round((1.0 - state.t) * ramp_px)                # steps a region has had
  return jnp.where(active, _clock(done_steps + 1.0, ramp_px), state.t)


def _ordered_min_budget(n_unknown: int, params: dict) -> int:
  overlap = params["overlap"]
  return n_unknown - 1 + math.ceil(1.0 / (1.0 - overlap) - 1e-9)


def uncertainty_ordered(grid=(2, 2), overlap: float = 0.0) -> Policy:
  """SRM's sequential adaptive sampler (Wewer et al. 2025), one region at a time.

  With n unknown regions and a budget of N steps, each region runs 1 -> 0 linearly in
  ceil(L) steps, L = N / ((n - 1)(1 - overlap) + 1), and region j starts at step
  floor(j L (1 - overlap)); which region is j-th is decided when it starts: the unknown,
  not yet started region with the lowest mean predicted sigma (sqrt of the uncertainty).
  overlap = 0: one region after the other; overlap -> 1: all together. The IPR paper
  regenerates its regions with this order (IPR Sec. 2.2, Table 1).

  Needs N >= n - 1 + ceil(1 / (1 - overlap)) so that regions start at distinct steps.
  """
  if not 0.0 <= float(overlap) < 1.0:
    raise checks.InputError(f"overlap={overlap}; expected a value in [0, 1) (0 = strictly "
                            "one region after the other).")
  return Policy("uncertainty_ordered", _uncertainty_ordered, {"overlap": float(overlap)},
                grid, _ordered_min_budget)


def _look_ahead(state: LoopState, params: dict) -> jax.Array:
  """Patch Forcing's look-ahead (see `look_ahead`)."""
  clock = _clock(state.step + 1, state.budget)
  ahead = jnp.maximum(1.0 - params["factor"] * (1.0 - clock), 0.0)
  certain = _certain_regions(state, params["regions"], params["quantile"])
  return jnp.minimum(jnp.where(certain, ahead, clock), state.t)


def look_ahead(factor: float = 1.4, quantile: float = 0.4, grid=None) -> Policy:
  """Patch Forcing's look-ahead: certain regions run ahead of the clock as context.

  The clock is the synchronous schedule, T_k = 1 - (k + 1) / N after step k. Regions
  strictly below the per-image uncertainty `quantile` (of the still-noisy ones) go to
  1 - min(factor (1 - T_k), 1), i.e. their progress 1 - t is `factor` times the clock's
  (Patch Forcing's min(1.4 t, 1) in its convention, where t = 1 is clean); the others
  follow the clock. A region ahead that becomes uncertain waits (times never increase).
  factor = 1 is the synchronous schedule.
  """
  if not float(factor) >= 1.0:
    raise checks.InputError(f"factor={factor}; expected >= 1 (1 = synchronous).")
  if not 0.0 <= float(quantile) <= 1.0:
    raise checks.InputError(f"quantile={quantile}; expected a share in [0, 1].")
  return Policy("look_ahead", _look_ahead, {"factor": float(factor),
                                            "quantile": float(quantile)}, grid, None)


def _dual_loop(state: LoopState, params: dict) -> jax.Array:
  """Patch Forcing's dual loop (see `dual_loop`)."""
  sub = params["sub_steps"]
  outer_steps = jnp.maximum(state.budget // sub, 1)
  o, j = state.step // sub, state.step % sub
  t_o, t_next = _clock(o, outer_steps), _clock(o + 1, outer_steps)
  sub_target = jnp.where(j + 1 >= sub, t_next,
                         t_o - (j + 1).astype(jnp.float32) * (t_o - t_next) / sub)
  certain = _certain_regions(state, params["regions"], params["quantile"])
  first = jnp.where(certain, t_next, sub_target)          # sub-step 0 decides the split
  later = jnp.where(state.t > t_next, sub_target, state.t)  # then the uncertain ones move on
  s = jnp.where(j == 0, first, later)
  return jnp.minimum(jnp.where(state.known, 0.0, s), state.t)


def _dual_loop_min_budget(n_unknown: int, params: dict) -> int:
  del n_unknown
  return int(params["sub_steps"])


def dual_loop(sub_steps: int = 4, quantile: float = 0.4, grid=None) -> Policy:
  """Patch Forcing's dual-loop sampler: extra sub-steps for uncertain regions.

  The budget of N network evaluations is M = N // sub_steps outer steps of the clock
  1 - o / M. At the first sub-step of an outer step the still-noisy regions strictly below
  the per-image uncertainty `quantile` (p = 0.4 in Patch Forcing) take the full step at once;
  the others take it in `sub_steps` equal sub-steps (4 in Patch Forcing), one network
  evaluation each, while the certain ones wait. sub_steps = 1 is the synchronous schedule.
  """
  checks.check_positive_int(sub_steps, "sub_steps")
  if not 0.0 <= float(quantile) <= 1.0:
    raise checks.InputError(f"quantile={quantile}; expected a share in [0, 1].")
  return Policy("dual_loop", _dual_loop, {"sub_steps": int(sub_steps),
                                          "quantile": float(quantile)}, grid,
                _dual_loop_min_budget)


def _schedule(state: LoopState, params: dict) -> jax.Array:
  tau = params["tau"]
  nxt = jax.lax.dynamic_index_in_dim(tau, jnp.minimum(state.step + 1, tau.shape[0] - 1),
                                     keepdims=False)
  return jnp.broadcast_to(nxt, state.t.shape)


def schedule(tau) -> Policy:
  """A tensor schedule tau [N+1, H, W] or [N+1, B, H, W] as a policy (budget N).

  The sample-independent special case; with it the policy sampler takes exactly the
  steps of `samplers.Sampler(tau)`.
  """
  tau = schedules.validate_schedule(tau)
  if not np.isin(tau[0], (0.0, 1.0)).all():
    raise checks.InputError("schedule policy: tau[0] must be 1 (unknown pixels start from "
                            "noise) or 0 (known pixels, also passed as `known`).")
  n = tau.shape[0] - 1
  return Policy("schedule", _schedule, {"tau": tau}, None,
                lambda n_unknown, params: n)


POLICIES = {
    "uncertainty_accelerated": uncertainty_accelerated,
    "uncertainty_ordered": uncertainty_ordered,
    "look_ahead": look_ahead,
    "dual_loop": dual_loop,
}


def get(name: str, **kwargs) -> Policy:
  """A built-in policy by name (see POLICIES), e.g. get('dual_loop', sub_steps=4)."""
  checks.check_choice(name, tuple(POLICIES), "policy")
  return POLICIES[name](**kwargs)


def custom(fn: PolicyFn, name: str = "custom", grid=None, **params) -> Policy:
  """A user policy `fn(state: LoopState, params) -> next times [B, H, W]`.

  `fn` must be a hashable function (a module-level function, not a fresh lambda per
  call, or it recompiles); `params` are traced numbers; `params['regions']` holds the
  resolved region map. Run it with `debug=True` once: the sampler then reports steps
  where it returned increasing times, moved known pixels or produced non-finite times.
  """
  return Policy(name, fn, dict(params), grid, None)
