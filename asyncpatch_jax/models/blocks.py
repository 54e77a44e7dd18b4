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
# As big_vision and maxtext: 'block' wraps every residual / attention / transformer block in
# nn.remat (its activations are recomputed in the backward pass; the block inputs are kept),
# 'full' wraps the whole forward pass (only the network's inputs are kept). nn.remat keeps
# the parameter tree, so one checkpoint serves every setting and the values are unchanged.
REMAT = ("none", "block", "full")


def remat_block(block_cls, remat: str, train_argnum: int | None = None):
  """`block_cls`, or its nn.remat under remat='block' (train_argnum: the position of a
  static Python bool argument, counting the module as 0)."""
  if remat != "block":
    return block_cls
  return nn.remat(block_cls, static_argnums=() if train_argnum is None else (train_argnum,))


def remat_call(module, *args):
  """`module.forward(*args)` (the last argument a static train flag), recomputed in the
  backward pass as a whole under remat='full'."""
  checks.check_choice(module.remat, REMAT, "model.remat")
  if module.remat != "full":
    return module.forward(*args)
  fn = lambda m, *a: m.forward(*a)
  return nn.remat(fn, static_argnums=(len(args),))(module, *args)
