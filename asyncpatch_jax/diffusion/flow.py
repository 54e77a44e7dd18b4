"""Rectified flow with per-pixel time: noising, targets, conversions, the training loss.

Conventions (docs/conventions.md): t in [0, 1], t = 0 is clean data, t = 1 is pure noise;
    z_t = (1 - t) * x + t * eps,   v = eps - x,
    x_hat = z - t * v_hat,         eps_hat = z + (1 - t) * v_hat,
    logSNR lambda(t) = 2 * log((1 - t) / t).
A time `t` is either per image `[B]` or per pixel `[B, H, W]`; both broadcast to the
image `[B, H, W, C]` through `expand_time`, so a constant map gives exactly the
per-image result.
"""

from __future__ import annotations

from typing import Literal

import chex
import jax
import jax.numpy as jnp

from asyncpatch_jax.runtime import checks

LossWeighting = Literal["sigmoid", "mse"]


def expand_time(t: jax.Array, ndim: int = 4) -> jax.Array:
  """Broadcasts a time `[B]` or `[B, H, W]` against an image of rank `ndim`.

  Returns `[B, 1, 1, 1]` or `[B, H, W, 1]`.
  """
  t = jnp.asarray(t)
  return t.reshape(t.shape + (1,) * (ndim - t.ndim))


def add_noise(x: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """z_t = (1 - t) x + t eps (AsyncPatch Eq. 1 with alpha = 1 - t, sigma = t).

  x, eps: [B, H, W, C]; t: [B] or [B, H, W].
  """
  chex.assert_equal_shape([x, eps])
  chex.assert_equal_shape_prefix([x, t], jnp.ndim(t))
  te = expand_time(t, x.ndim)
  return (1.0 - te) * x + te * eps


def velocity_target(x: jax.Array, eps: jax.Array) -> jax.Array:
  """The rectified-flow velocity dz/dt = eps - x."""
  chex.assert_equal_shape([x, eps])
  return eps - x


def x0_from_v(z: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
  """x_hat = z - t v."""
  return z - expand_time(t, z.ndim) * v


def eps_from_v(z: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
  """eps_hat = z + (1 - t) v."""
  return z + (1.0 - expand_time(t, z.ndim)) * v


def v_from_x0(z: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
  """v = (z - x0) / t; undefined at t = 0 (where z = x0), returned as 0 there."""
  te = expand_time(t, z.ndim)
  safe = jnp.where(te > 0, te, 1.0)
  return jnp.where(te > 0, (z - x0) / safe, 0.0)


def v_from_eps(z: jax.Array, eps: jax.Array, t: jax.Array) -> jax.Array:
  """v = (eps - z) / (1 - t); undefined at t = 1 (where z = eps), returned as 0 there."""
  te = expand_time(t, z.ndim)
  safe = jnp.where(te < 1, 1.0 - te, 1.0)
  return jnp.where(te < 1, (eps - z) / safe, 0.0)


def logsnr(t: jax.Array) -> jax.Array:
  """lambda(t) = 2 log((1 - t) / t); +inf at t = 0 and -inf at t = 1."""
  t = jnp.asarray(t)
  return 2.0 * (jnp.log1p(-t) - jnp.log(t))


def sigmoid_loss_weight(t: jax.Array, bias: float) -> jax.Array:
  """Per-pixel weight on |v - v_hat|^2 of the SiD2 sigmoid weighting.

  SiD2 weights the epsilon loss with w(lambda) = sigmoid(b - lambda) times the
  ELBO factor -d lambda/dt = 2 / (t (1 - t)). With eps - eps_hat = (1 - t)(v - v_hat)
  and sigmoid(b - lambda) = t^2 / (t^2 + e^{-b} (1 - t)^2) this is, dropping the
  constant 2,
      weight(t) = t (1 - t) / (t^2 + e^{-b} (1 - t)^2),
  which vanishes at t = 0 (where v is unpredictable) and at t = 1.
  (docs/conventions.md, "Loss weighting"; AsyncPatch Eq. 2 with lambda(t_i) per pixel.)
  """
  t = jnp.asarray(t)
  one_minus = 1.0 - t
  return t * one_minus / (t * t + jnp.exp(-bias) * one_minus * one_minus)


def loss_weight(t: jax.Array, weighting: LossWeighting = "sigmoid",
                bias: float = 0.0) -> jax.Array:
  """The per-pixel loss weight; pixels with t = 0 carry no loss in either mode."""
  if weighting == "sigmoid":
    return sigmoid_loss_weight(t, bias)
  if weighting == "mse":
    return jnp.where(jnp.asarray(t) > 0, 1.0, 0.0)
  raise checks.InputError(
      f"weighting={weighting!r} is not a loss weighting; expected 'sigmoid' or 'mse'.")


def per_pixel_loss(v: jax.Array, v_hat: jax.Array, t: jax.Array,
                   weighting: LossWeighting = "sigmoid", bias: float = 0.0) -> jax.Array:
  """weight(t_i) * mean_c (v - v_hat)^2 per pixel: `[B, H, W]` (AsyncPatch Eq. 2).

  v, v_hat: [B, H, W, C]; t: [B] or [B, H, W].
  """
  chex.assert_equal_shape([v, v_hat])
  chex.assert_equal_shape_prefix([v, t], jnp.ndim(t))
  err = jnp.mean(jnp.square(v.astype(jnp.float32) - v_hat.astype(jnp.float32)), axis=-1)
  t_map = jnp.broadcast_to(expand_time(t, 3), err.shape)
  return loss_weight(t_map, weighting, bias) * err


def rectified_flow_loss(velocity_fn, x: jax.Array, t: jax.Array, eps: jax.Array,
                        weighting: LossWeighting = "sigmoid", bias: float = 0.0,
                        **cond) -> jax.Array:
  """Mean weighted velocity loss of `velocity_fn(z, t, **cond)` on clean data `x`.

  x, eps: [B, H, W, C]; t: [B] or [B, H, W]. Returns a scalar.
  """
  checks.check_image(x, "x")
  checks.check_time(t, x.shape, "t")
  z = add_noise(x, eps, t)
  v_hat = velocity_fn(z, t, **cond)
  return jnp.mean(per_pixel_loss(velocity_target(x, eps), v_hat, t, weighting, bias))
