"""The PIFS collage regulariser: cross-patch Jacobian mass by random probes (PIFS Thm. 15).

`R(x) = sum_{k != j} ||[J eps_hat]_kj||_F^2` (k: output patch, j: input patch) is the
term the PIFS collage loss adds to the denoising loss with a weight `mu_reg`; lowering
it lowers the Cauchy-Schwarz bound on the coupling C_k,t and widens the (PC) margin.

Unbiased estimator, one JVP per probe: draw an input patch j (stratified over the
probes) and a Rademacher vector z supported on patch j; then
`E_z ||P_k J E_j z||^2 = ||[J]_kj||_F^2`, so

    M * (||J E_j z||^2 - ||P_j J E_j z||^2)

has expectation `sum_j (1/M) * M * sum_{k != j} ||[J]_kj||_F^2 = R(x)`. It is
differentiable in the model parameters (reverse-over-forward), so it can be added
to a training loss:

    eps_map = lambda z: z + (1 - t_map[..., None]) * model_apply(params, z, t_map, y)
    loss = denoising_loss + mu_reg * collage_penalty_batch(
        eps_map, z, patch_size=p, key=key, num_probes=1)

(in rectified-flow coordinates the identity part of eps_hat has no cross blocks, so
this penalises (1 - t)^2 times the cross blocks of the velocity Jacobian).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.analysis.ddim_maps import check_image_map
from asyncpatch_jax.analysis.patch_stats import patch_grid, patchify, unpatchify
from asyncpatch_jax.analysis.ddim_maps import as_partial


def _probe_tangents(key, lead_shape, image_shape, patch_size, num_probes):
  """Rademacher probes on one patch each: tangents `[P, *lead, H, W, C]`, patch ids."""
  _, _, nk = patch_grid(image_shape, patch_size)
  m = int(np.prod(image_shape)) // nk
  k_off, k_z = jax.random.split(key)
  offset = jax.random.randint(k_off, lead_shape, 0, m)
  j = (offset[None] + jnp.arange(num_probes).reshape((-1,) + (1,) * len(lead_shape))) % m
  z = jax.random.rademacher(k_z, (num_probes,) + tuple(lead_shape) + (nk,), jnp.float32)
  onehot = jax.nn.one_hot(j, m)  # [P, *lead, M]
  tangents = unpatchify(onehot[..., None] * z[..., None, :], image_shape, patch_size)
  return tangents, onehot, m


def _estimate(outs, onehot, m, patch_size):
  """outs `[P, *lead, H, W, C]` = J E_j z -> per-probe estimates `[P, *lead]`."""
  sq = jnp.sum(patchify(outs, patch_size) ** 2, axis=-1)  # [P, *lead, M]
  return m * (jnp.sum(sq, axis=-1) - jnp.sum(sq * onehot, axis=-1))


@functools.partial(jax.jit, static_argnames=("patch_size", "num_probes"))
def _penalty_core(fn, x, key, patch_size, num_probes):
  tangents, onehot, m = _probe_tangents(key, (), x.shape, patch_size, num_probes)
  outs = jax.vmap(lambda t: jax.jvp(fn, (x,), (t.astype(x.dtype),))[1])(tangents)
  return _estimate(outs, onehot.astype(x.dtype), m, patch_size)


def collage_penalty(fn: Callable, x, *, patch_size: int, key, num_probes: int = 8,
                    return_samples: bool = False):
  """Unbiased estimate of `sum_{k != j} ||[J fn]_kj||_F^2` at x (PIFS Thm. 15).

  Args:
    fn: `[H, W, C] -> [H, W, C]`, typically the epsilon-predictor at one level.
    x: `[H, W, C]`.
    patch_size: p, dividing H and W.
    key: PRNG key for the probes.
    num_probes: number of probes (one JVP each, vmapped).
    return_samples: return the per-probe estimates `[num_probes]` instead of their
      mean.

  Returns:
    the estimate `[]` (or `[num_probes]`).
  """
  check_image_map(fn, x)
  patch_grid(np.shape(x), patch_size)
  checks.check_positive_int(num_probes, "num_probes")
  samples = _penalty_core(as_partial(fn), jnp.asarray(x), key, int(patch_size),
                          int(num_probes))
  return samples if return_samples else samples.mean()


def collage_penalty_batch(fn: Callable, x, *, patch_size: int, key,
                          num_probes: int = 1):
  """Batch mean of the collage estimate for a batched map (training-loss form).

  `fn: [B, H, W, C] -> [B, H, W, C]` must treat the examples independently (no
  cross-example ops such as BatchNorm), so one JVP with a tangent per example
  gives every example's `J_b z_b`. Each example gets its own random patch and
  probe. Differentiable in whatever `fn` closes over.

  Args:
    fn: batched map; x: `[B, H, W, C]`.
    patch_size, key, num_probes: as in `collage_penalty`.

  Returns:
    `mean_b R_b` estimate `[]`.
  """
  shape = tuple(np.shape(x))
  if len(shape) != 4:
    raise checks.InputError(f"x has shape {shape}; expected a batch [B, H, W, C].")
  out = jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, jnp.result_type(x)))
  if getattr(out, "shape", None) != shape:
    raise checks.InputError(f"fn maps x of shape {shape} to {getattr(out, 'shape', None)}; "
                     "expected the same shape.")
  patch_grid(shape[1:], patch_size)
  checks.check_positive_int(num_probes, "num_probes")
  x = jnp.asarray(x)
  tangents, onehot, m = _probe_tangents(key, shape[:1], shape[1:], int(patch_size),
                                        int(num_probes))
  outs = jax.vmap(lambda t: jax.jvp(fn, (x,), (t.astype(x.dtype),))[1])(tangents)
  return _estimate(outs, onehot.astype(x.dtype), m, int(patch_size)).mean()


def collage_loss_for_velocity_model(velocity_apply: Callable, params, z, t, *, key,
                                    patch_size: int, num_probes: int = 1):
  """The collage penalty of a rectified-flow model at a training batch (Thm. 15).

  The epsilon-predictor of a velocity model is `eps_hat(z) = z + (1 - t) v_hat(z, t)`
  (docs/conventions.md); this estimates, per example and averaged over the batch,
  `sum_{k != j} ||[d eps_hat / d z]_kj||_F^2` at the batch's noisy states. It is
  taken with respect to the rectified-flow state z (the network's input); the
  identity part of eps_hat has no cross blocks, so it equals
  `sum_{k != j} ||diag(1 - t)_k [d v_hat / d z]_kj||_F^2`. Differentiable in `params`.

  Args:
    velocity_apply: `(params, z [B, H, W, C], t) -> v_hat [B, H, W, C]`.
    params: model parameters.
    z: `[B, H, W, C]` noisy states.
    t: `[B, H, W]` time map or `[B]` per-image time.
    key: PRNG key for the probes.
    patch_size: p, dividing H and W.
    num_probes: probes per example (one JVP each, vmapped).

  Returns:
    the batch-mean estimate `[]`.
  """
  z = jnp.asarray(z)
  t = jnp.asarray(t)
  if z.ndim != 4 or t.shape not in (z.shape[:1], z.shape[:3]):
    raise checks.InputError(f"z has shape {z.shape} and t {t.shape}; expected z [B, H, W, C] and "
                     "t [B] or [B, H, W].")
  one_minus_t = (1.0 - t).reshape(t.shape + (1,) * (4 - t.ndim)).astype(z.dtype)
  eps_map = lambda zz: zz + one_minus_t * velocity_apply(params, zz, t)
  return collage_penalty_batch(eps_map, z, patch_size=patch_size, key=key,
                               num_probes=num_probes)
