"""Time and class embeddings for per-pixel FiLM conditioning (AsyncPatch Sec. 3.1, App. E)."""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


def sinusoidal_features(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """ADM's sinusoidal features of 1000 * t: `t [...] -> [..., dim]` (cos, sin halves)."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (1000.0 * t.astype(jnp.float32))[..., None] * freqs
  feats = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    feats = jnp.concatenate([feats, jnp.zeros_like(feats[..., :1])], axis=-1)
  return feats


def pool_time(t: jax.Array, factor: int) -> jax.Array:
  """Average-pools a per-pixel time map `[B, H, W]` by `factor`; a per-image `[B]` is returned as is."""
  if t.ndim == 1 or factor == 1:
    return t
  b, h, w = t.shape
  return t.reshape(b, h // factor, factor, w // factor, factor).mean(axis=(2, 4))


class TimeEmbedding(nn.Module):
  """Sinusoidal features -> Dense -> SiLU -> Dense, applied per image or per pixel.

  `t [B] -> [B, E]` or `t [B, h, w] -> [B, h, w, E]`; the same weights serve every
  resolution, so a constant map embeds exactly like the per-image time.
  """
  features: int
  embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    h = sinusoidal_features(t, self.features).astype(self.dtype)
    h = nn.Dense(self.embed_dim, dtype=self.dtype, name="dense_0")(h)
    return nn.Dense(self.embed_dim, dtype=self.dtype, name="dense_1")(nn.silu(h))
