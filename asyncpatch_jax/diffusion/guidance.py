"""Guidance in the velocity parameterisation: classifier-free (Eq. 6-7) and input guidance (Eq. 8).

Scores, epsilon and velocity predictions at the same (z, t) are affine in one
another (score = -eps_hat / t, eps_hat = z + (1 - t) v_hat), so a guidance
combination of scores at one (z, t) is the same combination of velocities:
    CFG:  v = (1 + w_c) v(z, t, c) - w_c v(z, t, null).
Input guidance compares scores at two different inputs, the current z at its
times s and a copy z_g whose guidance region is re-noised to a higher level
t_g >= s; in epsilon form
    eps_bar = (1 + w_i) eps_hat(z, s) - w_i (s / t_g) eps_hat(z_g, t_g),
    v_bar = (eps_bar - z) / (1 - s),
per pixel (at s = 1 no velocity can be recovered from a score, and v is kept).
"""

from __future__ import annotations

import jax.numpy as jnp

from asyncpatch_jax.diffusion import flow
from asyncpatch_jax.diffusion import samplers

# Each wrapper is written once on samplers.CachedVelocity and returns the kind it wraps
# (samplers.like_input): a plain function, or a CachedVelocity (a clean-context DiT's cached
# velocity, models/dit_cache.py) whose cache covers every call it makes (CFG: the batch of
# 2B; input guidance: one cache per input).


def model_velocity_fn(model):
  """velocity_fn(z, t, params, y=None) of a flax UNet."""
  def velocity_fn(z, t, params, y=None):
    return model.apply({"params": params}, z, t, y)
  return velocity_fn


def classifier_free(velocity_fn, null_label: int):
  """velocity_fn(z, t, params, y, guidance) with CFG (AsyncPatch Eq. 6-7).

  The conditional and unconditional passes run as one batch of 2B.
  """
  def batch(z, t, y):
    return (jnp.concatenate([z, z]), jnp.concatenate([t, t]),
            jnp.concatenate([y, jnp.full_like(y, null_label)]))

  def combine(v, guidance):
    v_c, v_u = jnp.split(v, 2)
    return v_c + guidance * (v_c - v_u)

  fn = samplers.as_cached(velocity_fn)

  def init(z, t, params, y, guidance, **cond):
    del guidance
    zz, tt, yy = batch(z, t, y)
    return fn.init(zz, tt, params, yy, **cond)

  def apply(cache, z, t, params, y, guidance, **cond):
    zz, tt, yy = batch(z, t, y)
    v, cache = fn.apply(cache, zz, tt, params, yy, **cond)
    return combine(v, guidance), cache
  return samplers.like_input(velocity_fn, samplers.CachedVelocity(init, apply))


def renoise(z: jnp.ndarray, s: jnp.ndarray, t_g: jnp.ndarray, noise: jnp.ndarray) -> jnp.ndarray:
  """Forward transition of rectified flow from times s to t_g >= s, per pixel.

  z_g = (1 - t_g)/(1 - s) z + sqrt(t_g^2 - ((1 - t_g)/(1 - s))^2 s^2) noise.
  """
  s4, t4 = flow.expand_time(s, z.ndim), flow.expand_time(t_g, z.ndim)
  ratio = (1.0 - t4) / jnp.where(s4 < 1.0, 1.0 - s4, 1.0)
  sigma = jnp.sqrt(jnp.maximum(t4 * t4 - (ratio * s4) ** 2, 0.0))
  return jnp.where(t4 > s4, ratio * z + sigma * noise, z)


def input_guidance(velocity_fn):
  """velocity_fn(z, t, guide_mask, guide_noise, input_guidance, input_guidance_t, **cond).

  guide_mask [B, H, W] (1 = guidance region, e.g. the known pixels), guide_noise
  [B, H, W, C] (the re-noising noise, fixed over the steps), input_guidance = w_i,
  input_guidance_t = t_g: the region is re-noised to max(t, t_g). AsyncPatch Eq. 8.
  """
  def guide_input(z, t, guide_mask, guide_noise, input_guidance_t):
    t_g = jnp.where(guide_mask > 0, jnp.maximum(t, input_guidance_t), t)
    return renoise(z, t, t_g, guide_noise), t_g

  def combine(z, t, v_s, z_g, t_g, v_g, input_guidance):
    eps_s, eps_g = flow.eps_from_v(z, v_s, t), flow.eps_from_v(z_g, v_g, t_g)
    ratio = flow.expand_time(jnp.where(t_g > 0, t / jnp.where(t_g > 0, t_g, 1.0), 0.0), z.ndim)
    eps_bar = (1.0 + input_guidance) * eps_s - input_guidance * ratio * eps_g
    return jnp.where(flow.expand_time(t, z.ndim) < 1.0, flow.v_from_eps(z, eps_bar, t), v_s)

  fn = samplers.as_cached(velocity_fn)

  def init(z, t, guide_mask, guide_noise, input_guidance, input_guidance_t, **cond):
    del input_guidance
    z_g, t_g = guide_input(z, t, guide_mask, guide_noise, input_guidance_t)
    return fn.init(z, t, **cond), fn.init(z_g, t_g, **cond)

  def apply(cache, z, t, guide_mask, guide_noise, input_guidance, input_guidance_t, **cond):
    z_g, t_g = guide_input(z, t, guide_mask, guide_noise, input_guidance_t)
    v_s, cache_s = fn.apply(cache[0], z, t, **cond)
    v_g, cache_g = fn.apply(cache[1], z_g, t_g, **cond)
    return combine(z, t, v_s, z_g, t_g, v_g, input_guidance), (cache_s, cache_g)
  return samplers.like_input(velocity_fn, samplers.CachedVelocity(init, apply))
