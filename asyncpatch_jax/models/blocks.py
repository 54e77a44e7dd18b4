"""UNet building blocks: FiLM residual block, self-attention, down/up sampling (ADM style)."""

from __future__ import annotations

import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from asyncpatch_jax.runtime import checks

zeros = nn.initializers.zeros


def _groups(channels: int, num_groups: int) -> int:
  return math.gcd(channels, num_groups)


class Norm(nn.Module):
  """GroupNorm or RMSNorm over channels, computed in float32, returned in `dtype`."""
  kind: str = "group"
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    if self.kind == "group":
      y = nn.GroupNorm(num_groups=_groups(x.shape[-1], self.num_groups), epsilon=1e-5,
                       dtype=jnp.float32)(x32)
    elif self.kind == "rms":
      y = nn.RMSNorm(epsilon=1e-6, dtype=jnp.float32)(x32)
    else:
      raise checks.InputError(f"norm={self.kind!r}; expected 'group' or 'rms'.")
    return y.astype(self.dtype)


class ResBlock(nn.Module):
  """ADM residual block with scale-shift FiLM from a per-pixel (or per-image) embedding.

  x: [B, h, w, C_in]; emb: silu'd embedding [B, h, w, E] or [B, E].
  h = conv(silu(norm(x))); h = norm(h) * (1 + scale) + shift; out = skip(x) + conv(silu(h)),
  with (scale, shift) = Dense(emb) zero-initialised, so every block starts unmodulated.
  """
  channels: int
  dropout: float = 0.0
  norm: str = "group"
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
    norm = lambda name: Norm(self.norm, self.num_groups, self.dtype, name=name)
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, name="conv_0")(
        nn.silu(norm("norm_0")(x)))
    film = nn.Dense(2 * self.channels, dtype=self.dtype, kernel_init=zeros, name="film")(emb)
    if film.ndim == 2:                          # per-image: [B, 2C] -> [B, 1, 1, 2C]
      film = film[:, None, None, :]
    scale, shift = jnp.split(film, 2, axis=-1)
    h = norm("norm_1")(h) * (1.0 + scale) + shift
    h = nn.Dropout(self.dropout, deterministic=not train)(nn.silu(h))
    h = nn.Conv(self.channels, (3, 3), dtype=self.dtype, kernel_init=zeros, name="conv_1")(h)
    skip = x if x.shape[-1] == self.channels else nn.Conv(
        self.channels, (1, 1), dtype=self.dtype, name="skip")(x)
    return skip + h


class Attention(nn.Module):
  """Multi-head self-attention over the h*w positions, residual, zero-initialised output."""
  head_dim: int = 64
  norm: str = "group"
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    heads = max(1, c // self.head_dim)
    y = Norm(self.norm, self.num_groups, self.dtype, name="norm")(x)
    qkv = nn.Dense(3 * c, dtype=self.dtype, name="qkv")(y)
    q, k, v = einops.rearrange(qkv, "b h w (three n d) -> three b (h w) n d", three=3,
                               n=heads)                                  # [B, L, heads, d]
    out = einops.rearrange(jax.nn.dot_product_attention(q, k, v), "b (h w) n d -> b h w (n d)",
                           h=h, w=w)
    return x + nn.Dense(c, dtype=self.dtype, kernel_init=zeros, name="proj")(out)


class Downsample(nn.Module):
  """Strided 3x3 convolution: [B, h, w, C] -> [B, h/2, w/2, C]."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return nn.Conv(x.shape[-1], (3, 3), strides=(2, 2), dtype=self.dtype)(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2 then 3x3 convolution: [B, h, w, C] -> [B, 2h, 2w, C]."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return nn.Conv(x.shape[-1], (3, 3), dtype=self.dtype)(x)


# ---- Rematerialisation (config.model.remat), shared by the UNet and the DiT ----------------
# maxtext's remat policies, applied to every residual / attention / transformer block with
# nn.remat (the block's input is always kept):
#   none   every activation is kept for the backward pass;
#   block  a block keeps its matmul and convolution outputs with parameters
#          (dots_with_no_batch_dims_saveable, maxtext's 'minimal') and recomputes the rest
#          (norms, activations, attention probabilities);
#   full   a block keeps nothing and is recomputed whole (nothing_saveable, maxtext's 'full').
# nn.remat keeps the parameter tree, so one checkpoint serves every setting, and the values
# are the same. (XLA:CPU's schedule hoists recomputations of unrolled blocks: the savings
# show where the blocks are a scan, as the DiT's are.)
REMAT = ("none", "block", "full")
_POLICIES = {"block": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
             "full": jax.checkpoint_policies.nothing_saveable}


def remat_block(block_cls, remat: str, train_argnum: int | None = None):
  """`block_cls`, or its nn.remat under remat 'block' or 'full' (train_argnum: the position
  of a static Python bool argument, counting the module as 0)."""
  checks.check_choice(remat, REMAT, "model.remat")
  if remat == "none":
    return block_cls
  return nn.remat(block_cls, policy=_POLICIES[remat],
                  static_argnums=() if train_argnum is None else (train_argnum,))
