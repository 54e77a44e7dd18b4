"""The AsyncPatch UNet: ADM-style, with per-pixel FiLM time conditioning (AsyncPatch Sec. 3.1, App. E).

The time map is average-pooled to every resolution of the UNet and embedded there
once (sinusoidal features + MLP, weights shared across resolutions); the silu'd
embedding of a resolution is shared by all blocks at that resolution, each of which
projects it to its own per-pixel (scale, shift) with a zero-initialised Dense.
A per-image time `[B]` takes the same path with a [B, E] embedding broadcast over
space, so it equals the constant time map (to float rounding) at a fraction of the
cost. The class embedding (with a null class for classifier-free guidance) is added
to the time embedding.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.models import blocks
from asyncpatch_jax.models import embeddings


class UNet(nn.Module):
  """v_hat = UNet(z [B, H, W, C], t [B] or [B, H, W], y [B] | None) -> [B, H, W, C] (float32).

  Attributes:
    out_channels: image channels C.
    base_channels: channels at the first level.
    channel_mult: per-level multipliers of base_channels (len = number of levels L).
    num_res_blocks: residual blocks per level on the way down (up: one more), len L.
    num_middle_blocks: (attention, residual) pairs after the first middle residual block.
    attention_resolutions: feature-map heights at which self-attention is applied.
    head_dim: channels per attention head.
    time_embed_dim: width E of the per-pixel time embedding (the FiLM input).
    num_classes: 0 for unconditional; else labels 0..num_classes-1, and num_classes
      is the null label used for classifier-free guidance.
    dropout: dropout rate inside residual blocks (train=True only).
    norm: 'group' or 'rms'.
    num_groups: GroupNorm groups (gcd with the channel count).
    dtype: compute dtype (params are always float32).
    remat: 'none', 'block' or 'full': how much of each residual and attention block is
      recomputed in the backward pass (blocks.REMAT). Memory only: the parameters and
      every value are the same.
  """
  out_channels: int = 3
  base_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 3, 3)
  num_res_blocks: tuple[int, ...] = (1, 2, 2, 2)
  num_middle_blocks: int = 1
  attention_resolutions: tuple[int, ...] = (16, 8)
  head_dim: int = 64
  time_embed_dim: int = 128
  num_classes: int = 0
  dropout: float = 0.0
  norm: str = "group"
  num_groups: int = 32
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"

  @property
  def downsampling(self) -> int:
    """Total downsampling factor 2^(L-1): H and W must be multiples of it."""
    return 2 ** (len(self.channel_mult) - 1)

  @property
  def null_label(self) -> int:
    return self.num_classes

  def check_inputs(self, z, t, y=None) -> None:
    """Raises ValueError for inputs the UNet cannot take (shapes, time range, labels)."""
    checks.check_image(z, "z")
    if len(self.num_res_blocks) != len(self.channel_mult):
      raise checks.InputError(f"num_res_blocks={self.num_res_blocks} and channel_mult="
                       f"{self.channel_mult} must have the same length (one per level).")
    _, h, w, c = z.shape
    for size, name in ((h, "height"), (w, "width")):
      checks.check_divisible(size, self.downsampling, f"image {name}",
                             f"the UNet's total downsampling with {len(self.channel_mult)} "
                             "levels")
    if c != self.out_channels:
      raise checks.InputError(f"z has {c} channels; this UNet was built for out_channels="
                       f"{self.out_channels}.")
    checks.check_time(t, z.shape, "t")
    if self.num_classes:
      if y is None or tuple(jnp.shape(y)) != (z.shape[0],):
        raise checks.InputError(f"y has shape {None if y is None else tuple(jnp.shape(y))}; a "
                         f"class-conditional UNet needs labels [{z.shape[0]}] in "
                         f"0..{self.num_classes} ({self.num_classes} = null class).")
      if checks.is_concrete(y) and np.size(y) and (
          np.min(np.asarray(y)) < 0 or np.max(np.asarray(y)) > self.num_classes):
        raise checks.InputError(f"y has labels outside 0..{self.num_classes} "
                         f"({self.num_classes} = null class).")
    elif y is not None:
      raise checks.InputError("y was given to an unconditional UNet (num_classes=0).")

  def __call__(self, z: jax.Array, t: jax.Array, y: jax.Array | None = None, *,
               train: bool = False) -> jax.Array:
    self.check_inputs(z, t, y)
    return self.forward(z, t, y, train)

  @nn.compact
  def forward(self, z, t, y, train: bool) -> jax.Array:
    """The network (`__call__` checks the inputs first)."""
    dtype = self.dtype
    res_block = blocks.remat_block(blocks.ResBlock, self.remat, train_argnum=3)
    attention = blocks.remat_block(blocks.Attention, self.remat)
    time_embed = embeddings.TimeEmbedding(self.base_channels, self.time_embed_dim, dtype,
                                          name="time_embed")
    class_emb = None
    if self.num_classes:
      class_emb = nn.Embed(self.num_classes + 1, self.time_embed_dim, dtype=dtype,
                           name="class_embed")(y)                      # [B, E]

    def level_embedding(level: int) -> jax.Array:
      """silu(time + class embedding) at level `level`: [B, h, w, E] or [B, E]."""
      emb = time_embed(embeddings.pool_time(t, 2 ** level))
      if class_emb is not None:
        emb = emb + (class_emb if emb.ndim == 2 else class_emb[:, None, None, :])
      return nn.silu(emb)

    res_kw = dict(dropout=self.dropout, norm=self.norm, num_groups=self.num_groups, dtype=dtype)
    attn_kw = dict(head_dim=self.head_dim, norm=self.norm, num_groups=self.num_groups,
                   dtype=dtype)
    num_levels = len(self.channel_mult)
    embs = [level_embedding(level) for level in range(num_levels)]

    h = nn.Conv(self.base_channels, (3, 3), dtype=dtype, name="conv_in")(z.astype(dtype))
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks[level]):
        h = res_block(self.base_channels * mult, **res_kw, name=f"down_{level}_res_{i}")(
            h, embs[level], train)
        if h.shape[1] in self.attention_resolutions:
          h = attention(**attn_kw, name=f"down_{level}_attn_{i}")(h)
        skips.append(h)
      if level != num_levels - 1:
        h = blocks.Downsample(dtype, name=f"down_{level}_downsample")(h)
        skips.append(h)

    emb = embs[-1]
    ch = h.shape[-1]
    h = res_block(ch, **res_kw, name="mid_res_0")(h, emb, train)
    for i in range(self.num_middle_blocks):
      h = attention(**attn_kw, name=f"mid_attn_{i}")(h)
      h = res_block(ch, **res_kw, name=f"mid_res_{i + 1}")(h, emb, train)

    for level in reversed(range(num_levels)):
      mult = self.channel_mult[level]
      for i in range(self.num_res_blocks[level] + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(self.base_channels * mult, **res_kw, name=f"up_{level}_res_{i}")(
            h, embs[level], train)
        if h.shape[1] in self.attention_resolutions:
          h = attention(**attn_kw, name=f"up_{level}_attn_{i}")(h)
      if level != 0:
        h = blocks.Upsample(dtype, name=f"up_{level}_upsample")(h)

    h = nn.silu(blocks.Norm(self.norm, self.num_groups, dtype, name="norm_out")(h))
    out = nn.Conv(self.out_channels, (3, 3), dtype=dtype, kernel_init=nn.initializers.zeros,
                  name="conv_out")(h)
    return out.astype(jnp.float32)
