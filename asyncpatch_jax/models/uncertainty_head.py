"""An uncertainty head: the per-pixel log-variance of a frozen model's velocity error.

AsyncPatch Sec. 5.5 trains "an uncertainty estimation head on top of a pre-trained ...
model ... to predict the error that the model is making"; SRM and Patch Forcing train
theirs as one extra output of log-variance (clamped) with the Gaussian negative
log-likelihood of the target under a mean that is the model's own prediction, with the
gradient stopped (SRM; Patch Forcing; docs/conventions.md, "The uncertainty head's loss").
Here the model is frozen, so only the NLL
term has a gradient (their velocity MSE term is a constant; the 0.01 weight they put on
the NLL only rescales it):

    NLL_i = 1/2 [ mean_c (v_ic - sg(v_hat_ic))^2 exp(-l_i) + l_i ],   l = head(z, t, v_hat),

averaged over the pixels with t_i > 0. Its minimiser is l_i = log E[mean_c (v - v_hat)^2
| inputs], the per-pixel (channel-averaged) error variance. Where t_i = 0 the pixel is
clean: z_i = x_i, the x0 prediction z - t v_hat is exact whatever v_hat, and v's error there
(the unobservable eps_i, variance 1) says nothing about the sample, so those pixels carry no
loss and `uncertainty_fn` reports 0 for them (as SRM masks its sigma where t = 0).

The head sees what the frozen UNet exposes without changing it: z, the time map (its
sinusoidal features, as the UNet embeds it) and the frozen prediction v_hat (with the
x0 prediction z - t v_hat); a few 3x3 convolutions (receptive field 2 L + 1 pixels for L
layers). It adds ~4 % to a forward pass of the default UNet (experiments/benchmarks/bench_adaptive.py).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.models import embeddings


class UncertaintyHead(nn.Module):
  """log sigma^2 = head(z [B, H, W, C], t [B] or [B, H, W], v_hat [B, H, W, C]) -> [B, H, W].

  Attributes:
    channels: width of the hidden convolutions.
    num_layers: 3x3 convolutions in all (>= 1; the last one outputs the log-variance).
    time_features: sinusoidal features of the per-pixel time (embeddings.sinusoidal_features).
    logvar_min, logvar_max: the clamp of the output (SRM/Patch Forcing clamp theirs).
  """
  channels: int = 16
  num_layers: int = 3
  time_features: int = 16
  logvar_min: float = -12.0
  logvar_max: float = 6.0

  @nn.compact
  def __call__(self, z: jax.Array, t: jax.Array, v_hat: jax.Array) -> jax.Array:
    checks.check_image(z, "z")
    checks.check_time(t, z.shape, "t")
    if v_hat.shape != z.shape:
      raise checks.InputError(f"v_hat has shape {v_hat.shape}; expected the shape of z {z.shape}.")
    b, h, w, _ = z.shape
    t_map = jnp.broadcast_to(t.reshape(t.shape + (1,) * (3 - t.ndim)), (b, h, w))
    t_map = t_map.astype(jnp.float32)
    x0 = z - t_map[..., None] * v_hat
    feats = jnp.concatenate(
        [z, v_hat, x0, t_map[..., None],
         embeddings.sinusoidal_features(t_map, self.time_features)], axis=-1)
    hidden = feats
    for i in range(self.num_layers - 1):
      hidden = nn.silu(nn.Conv(self.channels, (3, 3), name=f"conv_{i}")(hidden))
    # Zero-initialised output: every pixel starts at log-variance 0.
    out = nn.Conv(1, (3, 3), kernel_init=nn.initializers.zeros,
                  name=f"conv_{self.num_layers - 1}")(hidden)[..., 0]
    return jnp.clip(out, self.logvar_min, self.logvar_max)


def build_head(uncertainty_config) -> UncertaintyHead:
  """The head described by `config.uncertainty` (see base_config.py)."""
  checks.check_positive_int(uncertainty_config.channels, "uncertainty.channels")
  checks.check_positive_int(uncertainty_config.num_layers, "uncertainty.num_layers")
  checks.check_positive_int(uncertainty_config.time_features, "uncertainty.time_features")
  lo, hi = float(uncertainty_config.logvar_min), float(uncertainty_config.logvar_max)
  if not lo < hi:
    raise checks.InputError(f"uncertainty.logvar_min={lo} must be below logvar_max={hi}.")
  return UncertaintyHead(channels=int(uncertainty_config.channels),
                         num_layers=int(uncertainty_config.num_layers),
                         time_features=int(uncertainty_config.time_features),
                         logvar_min=lo, logvar_max=hi)


def example_inputs(image_shape, batch: int = 1):
  """Zero inputs (z, t, v_hat) for `head.init` / `jax.eval_shape`."""
  z = jnp.zeros((batch, *image_shape), jnp.float32)
  return z, jnp.zeros((batch, *image_shape[:2]), jnp.float32), z


def gaussian_nll(logvar: jax.Array, v: jax.Array, v_hat: jax.Array, t: jax.Array) -> jax.Array:
  """Mean per-pixel Gaussian NLL of the target v under N(sg(v_hat), exp(logvar)) (SRM's loss).

  logvar: [B, H, W]; v, v_hat: [B, H, W, C]; t: [B] or [B, H, W]. Pixels with t = 0 carry
  no loss (the constant 1/2 log 2 pi is dropped).
  """
  err2 = jnp.mean(jnp.square(v - jax.lax.stop_gradient(v_hat)), axis=-1)     # [B, H, W]
  nll = 0.5 * (err2 * jnp.exp(-logvar) + logvar)
  t_map = jnp.broadcast_to(t.reshape(t.shape + (1,) * (3 - t.ndim)), err2.shape)
  weight = (t_map > 0).astype(nll.dtype)
  return jnp.sum(weight * nll) / jnp.maximum(jnp.sum(weight), 1.0)


def uncertainty_fn(head: UncertaintyHead):
  """u = fn(z, t, v_hat, head_params): the predicted error variance [B, H, W], 0 where t = 0.

  The `uncertainty_fn` of samplers.Sampler (its uncertainty_cond is {'head_params': ...}).
  """
  def fn(z, t, v_hat, head_params):
    logvar = head.apply({"params": head_params}, z, t, v_hat)
    t_map = jnp.broadcast_to(t.reshape(t.shape + (1,) * (3 - t.ndim)), logvar.shape)
    return jnp.where(t_map > 0, jnp.exp(logvar), 0.0)
  return fn


__all__ = ["UncertaintyHead", "build_head", "example_inputs", "gaussian_nll", "uncertainty_fn"]
