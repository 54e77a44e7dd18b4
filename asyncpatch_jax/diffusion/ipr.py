"""Iterative Partial Refinement (IPR, Kang, Yoon, Ahn, Alg. 1) on the per-pixel sampler.

Given a sample x^(0) (from any schedule: sequential inference in the paper), each
round r = 1..R

  1. selects M^(r): floor(alpha (N - |C|)) of the N regions outside the condition
     set C, uniformly at random and independently per image (Alg. 1 line 3);
  2. replaces them with N(0, I) noise: their time is set to 1 (line 4);
  3. regenerates them conditioned on the rest with the inpainting schedule of
     AsyncPatch Eq. 4, tau = (1 - u) on M^(r) and 0 elsewhere (line 5, Eq. 4); the
     rest has time 0 throughout, so the sampler returns it bit-identical (Eq. 5).

All R rounds are one `lax.scan` around the sampler's own `lax.scan`, inside one
`jax.jit`. The ablations of the paper are options: `fixed_noise` re-uses one noise
draw (start noise and per-step noise) in every round, `fixed_regions` selects the
same M in every round. The number of resampled regions is computed from `alpha`
and each image's |C| inside the jit, so `alpha` and C do not recompile.

Regions are any partition of the pixels, given as an integer map [H, W] with values
0..N-1 (`schedules.grid_regions` builds raster patches, e.g. the 81 cells of a Sudoku).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.diffusion import samplers
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.runtime import multihost


# The region-map check lives with `schedules.grid_regions`; kept here under its old name.
check_regions = schedules.check_regions


def num_resampled(alpha, num_regions: int, num_conditioned):
  """floor(alpha (N - |C|)) (Alg. 1 line 3), robust to float rounding of alpha * n."""
  free = num_regions - num_conditioned
  return jnp.floor(alpha * free * (1.0 + 1e-6)).astype(jnp.int32)


def select_regions(key: jax.Array, condition: jax.Array, alpha) -> jax.Array:
  """[B, N] bool: per image, a uniform subset of floor(alpha (N - |C|)) free regions.

  The free regions get i.i.d. uniform scores and the conditioned ones a score above
  all of them; the regions ranked below n form a uniformly random n-subset of the free.
  """
  b, n_regions = condition.shape
  scores = jnp.where(condition, 2.0, jax.random.uniform(key, (b, n_regions)))
  ranks = jnp.argsort(jnp.argsort(scores, axis=1), axis=1)
  n = num_resampled(alpha, n_regions, condition.sum(axis=1))
  return ranks < n[:, None]


def refine_loop(velocity_fn: samplers.VelocityFn, x: jax.Array, key: jax.Array,
                regions: jax.Array, condition: jax.Array, alpha, eta=0.0,
                cond: dict | None = None, policy_params: dict | None = None,
                uncertainty_cond: dict | None = None, *, num_rounds: int, num_steps: int,
                fixed_noise: bool = False, fixed_regions: bool = False,
                return_history: bool = False, policy_fn=None, uncertainty_fn=None):
  """R rounds of IPR; pure and traceable (see `Refiner` for the checked, compiled form).

  Args:
    velocity_fn: v_hat = velocity_fn(z, t_map, **cond).
    x: [B, H, W, C] the sample x^(0) (conditioned regions hold the given content).
    key: PRNG key; round r selects with fold_in(fold_in(key, 0), r) and regenerates
      with fold_in(fold_in(key, 1), r); under the fixed options every round uses
      r = 1, so round 1 is the same with and without them.
    regions: [H, W] int32 region ids 0..N-1.
    condition: [B, N] bool, the condition set C (never resampled).
    alpha: resampling ratio in (0, 1].
    eta: the sampler's stochastic coefficient.
    num_rounds, num_steps: R and the sampler steps of each regeneration.
    policy_fn, policy_params, uncertainty_fn, uncertainty_cond: regenerate with a schedule
      policy within num_steps steps (samplers.policy_loop; the IPR paper's sequential
      backbone regenerates in SRM's uncertainty order, policies.uncertainty_ordered)
      instead of the inpainting schedule; None: the inpainting schedule.
  Returns:
    x^(R) [B, H, W, C]; with return_history also the samples of every round
    [R + 1, B, H, W, C] (x^(0) first) and the selections M^(r) as [R, B, N] bool.
  """
  key_select, key_generate = jax.random.fold_in(key, 0), jax.random.fold_in(key, 1)
  ramp = jnp.linspace(1.0, 0.0, num_steps + 1, dtype=jnp.float32)

  def round_fn(x, r):
    selected = select_regions(
        jax.random.fold_in(key_select, 1 if fixed_regions else r), condition, alpha)
    renoised = jnp.take(selected, regions, axis=1).astype(jnp.float32)   # [B, H, W]
    key_r = jax.random.fold_in(key_generate, 1 if fixed_noise else r)
    if policy_fn is None:
      tau = ramp[:, None, None, None] * renoised[None]
      x = samplers.sample_loop(velocity_fn, tau, x, key_r, eta, cond)
    else:
      x = samplers.policy_loop(velocity_fn, uncertainty_fn, x, renoised == 0, key_r, eta,
                               num_steps, policy_params, cond, uncertainty_cond,
                               policy_fn=policy_fn).samples
    return x, ((x, selected) if return_history else None)

  x_final, history = jax.lax.scan(round_fn, x, jnp.arange(1, num_rounds + 1))
  if not return_history:
    return x_final
  xs, selected = history
  return x_final, jnp.concatenate([x[None], xs]), selected


class Refiner(samplers.Sampler):
  """A `Sampler` that also runs IPR: `refiner(tau, ...)` samples x^(0), `.refine(x, ...)` refines.

  refiner = Refiner(velocity_fn)
  x0 = refiner(schedules.autoregressive(H, W, (9, 9), 10), key=k0, shape=(B, H, W, C))
  x = refiner.refine(x0, key=k1, regions=schedules.grid_regions(H, W, (9, 9)), num_rounds=50,
                     alpha=0.25, condition=clues)

  `refine` compiles once per (shapes, num_rounds, num_steps, options); alpha, eta, the
  condition set and the key are traced.
  """

  def __init__(self, velocity_fn: samplers.VelocityFn, *, mesh=None,
               batched_cond: Sequence[str] = ("y",), uncertainty_fn=None):
    super().__init__(velocity_fn, mesh=mesh, batched_cond=batched_cond,
                     uncertainty_fn=uncertainty_fn)
    self._refine = jax.jit(
        samplers.announce_compiling(
            "iterative partial refinement",
            functools.partial(refine_loop, velocity_fn, uncertainty_fn=uncertainty_fn)),
        static_argnames=("num_rounds", "num_steps", "fixed_noise", "fixed_regions",
                         "return_history", "policy_fn"))

  def refine(self, x, *, key: jax.Array, regions, num_rounds: int, alpha: float = 0.25,
             num_steps: int = 50, condition=None, eta: float = 0.0, fixed_noise: bool = False,
             fixed_regions: bool = False, return_history: bool = False, policy=None,
             uncertainty_cond: dict | None = None, **cond):
    """IPR from the sample x [B, H, W, C]; see `refine_loop` for the arguments and returns.

    condition: None (C empty), [N] or [B, N] booleans (or 0/1) over the regions.
    policy: None (regenerate with the inpainting schedule) or a `policies.Policy` that
      regenerates the selected regions within num_steps steps (its regions default to
      IPR's); uncertainty_cond: arguments of the sampler's uncertainty_fn.
    """
    checks.check_image(x, "x")
    b, h, w, _ = np.shape(x)
    regions, n_regions = check_regions(regions, (h, w))
    num_rounds = checks.check_positive_int(num_rounds, "num_rounds")
    num_steps = checks.check_positive_int(num_steps, "num_steps")
    if not 0.0 < float(alpha) <= 1.0:
      raise checks.InputError(f"alpha={alpha}; the resampling ratio must lie in (0, 1].")
    if not 0.0 <= float(eta) <= 1.0:
      raise checks.InputError(f"eta={eta}; expected a value in [0, 1] (0 = deterministic).")
    if condition is None:
      condition = np.zeros((b, n_regions), bool)
    condition = np.asarray(condition)
    if condition.shape == (n_regions,):
      condition = np.broadcast_to(condition, (b, n_regions))
    if condition.shape != (b, n_regions):
      raise checks.InputError(f"condition has shape {condition.shape}; expected [{n_regions}] or "
                       f"[{b}, {n_regions}] (one flag per region, 1 = given, never resampled).")
    if not np.isin(condition, (0, 1)).all():
      raise checks.InputError("condition must hold booleans or 0/1 (1 = region given).")
    condition = condition.astype(bool)
    if condition.all(axis=1).any():
      i = int(np.argmax(condition.all(axis=1)))
      raise checks.InputError(f"image {i}: the condition set covers all {n_regions} regions, so "
                              "IPR has nothing to resample; leave at least one region free "
                              "(condition 0).")
    n = np.asarray(num_resampled(float(alpha), n_regions, condition.sum(axis=1)))
    if (n < 1).any():
      i = int(np.argmin(n))
      raise checks.InputError(f"image {i}: alpha * (N - |C|) = {alpha} * {n_regions - condition[i].sum()} "
                       "< 1, so no region would be resampled; raise alpha or free more regions.")
    policy_params, policy_fn = None, None
    if policy is not None:
      if policy.regions is None:
        policy = dataclasses.replace(policy, regions=regions)
      policy_params = self._place(policy.arguments((h, w), None, int(num_steps),
                                                   num_unknown=int(n.max())), False, b)
      policy_fn = policy.fn
    if uncertainty_cond and self.uncertainty_fn is None:
      raise checks.InputError("uncertainty_cond was given, but this refiner has no "
                              "uncertainty_fn (build it with Refiner(..., uncertainty_fn=...)).")
    x = self._place(jnp.asarray(x, jnp.float32), True, b)
    condition = self._place(jnp.asarray(condition), True, b)
    cond = self.place_cond(cond, b)
    ucond = self._place(dict(uncertainty_cond or {}), False, b)
    return multihost.gather(self._refine(
        x, key, jnp.asarray(regions), condition, jnp.float32(alpha), jnp.float32(eta), cond,
        policy_params, ucond, num_rounds=int(num_rounds), num_steps=int(num_steps),
        fixed_noise=bool(fixed_noise), fixed_regions=bool(fixed_regions),
        return_history=bool(return_history), policy_fn=policy_fn))
