"""DiT (Peebles & Xie 2023) whose tokens each carry their own time (AsyncPatch Sec. 3).

The image is cut into p x p patches (tokens), embedded, given a fixed 2-D sin-cos position
embedding (MAE's), and run through transformer blocks with adaptive LayerNorm. In DiT
the modulation (shift, scale, gate) is a function of the image's time and label, [B, D];
here every token's modulation comes from that token's own time (diffusion/tokens.py:
the patch mean of the time map), so shift, scale and gate are [B, N, D]. With a
per-image time every token gets the same modulation and the model is exactly DiT.

Two modulation designs (`modulation`):
  adaln_zero    DiT's: each block has its own MLP SiLU -> Dense(6D) of the conditioning
                c = t_emb + y_emb (zero-initialised, so every block starts as the identity);
                per token it costs 6 D^2 multiply-adds per block.
  adaln_single  PixArt-alpha's: one shared SiLU -> Dense(6D) of c for all blocks, plus a
                learned per-block table [6, D] added to it (and [2, D] for the final layer,
                which takes c itself); 6 D^2 per token in all.

Clean context (`clean_context`, the compute-follows-the-schedule option): a token whose
time is exactly 0 (known, or finished) attends only to the other clean tokens, a noisy
token to every token. A clean token's hidden states at every layer then depend only on
the clean set and its values, so a sampler can compute its keys, values and output once
for as long as the clean set stays the same and run only the noisy tokens at every step
(models/dit_cache.py). `forward(..., tokens_pass=TokenPass(...))` is that partial pass: the
tokens `index` names, gathered into a buffer of fixed capacity ('clean': among
themselves, returning every layer's keys and values; 'active': against the cached keys
and values of every other token).

Inputs and outputs follow the UNet (models/unet.py): x [B, H, W, C], t [B] or [B, H, W]
in [0, 1] (embedded as ADM/DiT do, sinusoidal features of 1000 t), labels y [B] (the
null label `num_classes` is CFG's unconditional branch) -> [B, H, W, out_channels].
"""

from __future__ import annotations

import dataclasses
import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.diffusion import tokens
from asyncpatch_jax.models import blocks
from asyncpatch_jax.models import embeddings
from asyncpatch_jax.runtime import checks

MODULATIONS = ("adaln_zero", "adaln_single")
# DiT's configurations (the paper's Table 1): name -> (depth, hidden size, heads).
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}

_xavier = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros


def pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """MAE's fixed 2-D sin-cos position embedding [grid_h * grid_w, dim] (raster order).

  The first dim / 2 channels encode the column, the rest the row, each as
  [sin(pos * omega), cos(pos * omega)] with omega_k = 10000^(-k / (dim / 4)).
  """
  if dim % 4:
    raise checks.InputError(f"the DiT width {dim} must be a multiple of 4 (the 2-D sin-cos "
                            "position embedding).")

  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
    out = np.einsum("m,d->md", pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64),
                           np.arange(grid_w, dtype=np.float64), indexing="ij")
  return np.concatenate([one_d(dim // 2, cols), one_d(dim // 2, rows)], axis=1)


def forward_flops(model: "DiT", image_shape, per_token: bool) -> float:
  """XLA's cost-analysis FLOPs of one forward pass (batch 1) on images [H, W, C], with a
  per-token time map or a per-image time; lowered on abstract parameters (nothing is
  allocated or compiled)."""
  shape = (1, *tuple(image_shape))
  x, y = jax.ShapeDtypeStruct(shape, jnp.float32), jax.ShapeDtypeStruct((1,), jnp.int32)
  t = jax.ShapeDtypeStruct(shape[:3] if per_token else (1,), jnp.float32)
  model = model.clone(unroll_blocks=True)       # cost analysis counts a loop body once
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, y)
  return float(jax.jit(model.apply).lower(params, x, t, y).cost_analysis()["flops"])


def per_token_extra_flops(model: "DiT", tokens: int) -> float:
  """FLOPs (2 per multiply-add) that a per-token time adds to the per-image model's forward
  pass of one image of `tokens` tokens: the other N - 1 tokens' time embedder (256 D + D^2
  multiply-adds) and modulation MLPs (adaln_zero: depth x 6 D^2 + 2 D^2; adaln_single:
  6 D^2, plus adding each block's table, depth x 6 D). Elementwise terms of O(D) per
  token otherwise (activations, biases) are left out: under 1% at DiT's widths."""
  d = model.hidden_size
  macs = model.freq_dim * d + d * d
  adds = 0
  if model.modulation == "adaln_zero":
    macs += model.depth * 6 * d * d + 2 * d * d
  else:
    macs += 6 * d * d
    adds += model.depth * 6 * d
  return float((tokens - 1) * (2 * macs + adds))


def modulate(x, shift, scale):
  return x * (1.0 + scale) + shift


PASSES = ("clean", "active")


@dataclasses.dataclass(frozen=True)
class TokenPass:
  """A forward pass over a subset of the tokens (`DiT.forward(..., tokens_pass=...)`).

  kind: 'clean' -- the tokens are the clean set (time 0) and attend among themselves;
    the pass returns every layer's keys and values [L, B, C, heads, head_dim] with the
    outputs. 'active' -- the tokens are every noisy token and attend to all N tokens:
    the clean ones through `keys`/`values` [L, B, N, heads, head_dim] (a 'clean' pass's,
    scattered to their positions), themselves through their own fresh keys and values.
  index: [B, C] int32 token positions (raster order); N marks an empty slot (padding),
    which is computed but never read: its keys and values are dropped, not scattered.
  """
  kind: str
  index: jax.Array
  keys: jax.Array | None = None
  values: jax.Array | None = None


class TimestepEmbedder(nn.Module):
  """DiT's: sinusoidal features (256) -> Dense(D) -> SiLU -> Dense(D), per token."""
  hidden_size: int
  freq_dim: int = 256
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, t):
    h = embeddings.sinusoidal_features(t, self.freq_dim).astype(self.dtype)
    init = nn.initializers.normal(0.02)
    h = nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype, name="dense_0")(h)
    return nn.Dense(self.hidden_size, kernel_init=init, dtype=self.dtype,
                    name="dense_1")(nn.silu(h))


class DiTBlock(nn.Module):
  """x + gate_msa * attn(modulate(LN(x))) then x + gate_mlp * mlp(modulate(LN(x))).

  mod: the block's six modulations [B, N, 6, D] (shift, scale, gate of attention, then
  of the MLP), per token; [B, 1, 6, D] for a per-image time. mask: None or the attention
  mask [B, 1, N_q, N_k] (True = attend). cache: None, or (index [B, N_q], keys, values
  [B, N_k, heads, head_dim]): the queries' own keys and values are scattered into the
  cached ones at `index` (N_k = padding, dropped) and attention runs over all N_k.
  Returns (x', (k, v) of the queries' tokens).
  """
  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x, mod, mask=None, cache=None):
    d, heads = self.hidden_size, self.num_heads
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        mod[:, :, k] for k in range(6))
    norm = lambda name: nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False,
                                     dtype=self.dtype, name=name)
    dense = lambda n, name: nn.Dense(n, kernel_init=_xavier, bias_init=_zeros,
                                     dtype=self.dtype, name=name)
    h = modulate(norm("norm1")(x), shift_msa, scale_msa)
    qkv = dense(3 * d, "qkv")(h)
    q, k, v = einops.rearrange(qkv, "b n (three h e) -> three b n h e", three=3, h=heads)
    k_all, v_all = k, v
    if cache is not None:
      index, k_cached, v_cached = cache
      rows = jnp.arange(x.shape[0])[:, None]
      k_all = k_cached.astype(k.dtype).at[rows, index].set(k, mode="drop")
      v_all = v_cached.astype(v.dtype).at[rows, index].set(v, mode="drop")
    att = jax.nn.dot_product_attention(q, k_all, v_all, mask=mask)   # fused on GPU / TPU
    att = dense(d, "proj")(einops.rearrange(att, "b n h e -> b n (h e)"))
    x = x + gate_msa * att
    h = modulate(norm("norm2")(x), shift_mlp, scale_mlp)
    h = dense(d, "fc2")(nn.gelu(dense(int(d * self.mlp_ratio), "fc1")(h), approximate=True))
    return x + gate_mlp * h, (k, v)


class ModulatedBlock(nn.Module):
  """One DiT block with its modulation, as a scan step: `(h, (c, mask, index), layer_cache)
  -> (h', kv)`.

  c: adaln_zero: silu(conditioning) [B, N or 1, D], mapped by this block's own
  zero-initialised Dense(6D); adaln_single: the shared modulation [B, N or 1, 6, D], to
  which this block adds its learned table [6, D]. mask: None or the attention mask;
  index and layer_cache (this layer's cached keys and values): an 'active' TokenPass's, else
  None. kv: this layer's keys and values when `return_kv` (a 'clean' pass), else None.
  The modulation is sown as ('intermediates', 'modulation').
  """
  hidden_size: int
  num_heads: int
  mlp_ratio: float
  modulation: str
  dtype: jnp.dtype = jnp.float32
  return_kv: bool = False

  @nn.compact
  def __call__(self, h, context, layer_cache):
    c, mask, index = context
    d, b = self.hidden_size, h.shape[0]
    if self.modulation == "adaln_zero":
      mod = nn.Dense(6 * d, kernel_init=_zeros, bias_init=_zeros, dtype=self.dtype,
                     name="adaln")(c).reshape(b, -1, 6, d)
    else:
      table = self.param("scale_shift_table", nn.initializers.normal(1.0 / math.sqrt(d)),
                         (6, d))
      mod = c + table.astype(self.dtype)
    self.sow("intermediates", "modulation", mod)
    cache = None if layer_cache is None else (index, *layer_cache)
    h, kv = DiTBlock(d, self.num_heads, self.mlp_ratio, self.dtype, name="block")(
        h, mod, mask, cache)
    return h, (kv if self.return_kv else None)


def clean_context_mask(clean):
  """The clean-context attention mask [B, 1, N, N] of the tokens' clean flags [B, N]: query
  i attends to key j when j is clean or i is not (a clean token sees only clean tokens)."""
  return (clean[:, None, None, :] | ~clean[:, None, :, None])


class DiT(nn.Module):
  """DiT with per-token adaLN; `__call__(x [B, H, W, C], t [B] | [B, H, W], y [B] | None)`.

  The blocks' parameters are stacked (leading axis: the block) under 'blocks'. unroll_blocks
  unrolls their scan (same parameters, same values): XLA's cost analysis counts a loop's
  body once, so FLOP counts (`forward_flops`) unroll it.
  """
  patch_size: int = 2
  hidden_size: int = 384
  depth: int = 12
  num_heads: int = 6
  mlp_ratio: float = 4.0
  out_channels: int = 1
  num_classes: int = 0
  modulation: str = "adaln_zero"
  freq_dim: int = 256
  dtype: jnp.dtype = jnp.float32
  remat: str = "none"                                      # blocks.REMAT
  unroll_blocks: bool = False
  clean_context: bool = False

  @property
  def null_label(self) -> int:
    """The label of CFG's unconditional branch (an extra row of the label table)."""
    return self.num_classes

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  def check_inputs(self, height: int, width: int) -> None:
    """InputError for an image the patches do not tile or a width the heads do not split."""
    tokens.check_patch_size(height, width, self.patch_size)
    checks.check_choice(self.modulation, MODULATIONS, "model.modulation")
    if self.hidden_size % self.num_heads:
      raise checks.InputError(f"model.num_heads={self.num_heads} does not divide the DiT width "
                              f"{self.hidden_size}; pick a head count that divides it.")

  def __call__(self, x, t, y=None, train: bool = False):
    self.check_inputs(x.shape[1], x.shape[2])
    return self.forward(x, t, y, train)

  @nn.compact
  def forward(self, x, t, y, train: bool, tokens_pass: TokenPass | None = None):
    """The network (`__call__` checks the shapes first).

    tokens_pass: None (every token; returns v [B, H, W, out_channels]) or a TokenPass over
    the tokens it names (returns their outputs [B, C, p * p * out_channels] and, for a
    'clean' pass, every layer's keys and values ([L, B, C, heads, head_dim] each), else
    None). A partial pass needs `clean_context` and a per-pixel time map t [B, H, W].
    """
    del train                                              # no dropout
    b, height, width, c = x.shape
    p, d = self.patch_size, self.hidden_size
    gh, gw = height // p, width // p
    # Patch embedding (a p x p, stride p convolution) and the fixed position embedding.
    h = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                kernel_init=nn.initializers.xavier_uniform(in_axis=(0, 1, 2), out_axis=3),
                name="x_embedder")(x.astype(self.dtype))
    h = einops.rearrange(h, "b h w d -> b (h w) d")
    h = h + jnp.asarray(pos_embed_2d(d, gh, gw), self.dtype)[None]
    token_t = tokens.token_times(t, p)                     # [B, N] (or [B, 1] per image)
    mask = index = layer_caches = None
    if tokens_pass is None:
      if self.clean_context:
        mask = clean_context_mask(jnp.broadcast_to(token_t == 0.0, (b, gh * gw)))
    else:
      if not self.clean_context or token_t.shape[1] != gh * gw:
        raise checks.InputError("a partial token pass needs a DiT with model.clean_context "
                                "and a per-pixel time map t [B, H, W].")
      checks.check_choice(tokens_pass.kind, PASSES, "TokenPass.kind")
      index = tokens_pass.index
      # Gather the pass's tokens (padding slots read the last token; they are never used).
      h = jnp.take_along_axis(h, index[..., None], axis=1, mode="clip")
      token_t = jnp.take_along_axis(token_t, index, axis=1, mode="clip")
      if tokens_pass.kind == "clean":                      # the clean set, among itself
        mask = (index < gh * gw)[:, None, None, :]
      else:                                                # noisy tokens see every token
        layer_caches = (tokens_pass.keys, tokens_pass.values)
    # Conditioning per token: the token's own time, plus the image's label.
    cond = TimestepEmbedder(d, self.freq_dim, self.dtype, name="t_embedder")(token_t)
    if self.num_classes:
      if y is None:
        y = jnp.full((b,), self.null_label, jnp.int32)
      table = nn.Embed(self.num_classes + 1, d, embedding_init=nn.initializers.normal(0.02),
                       name="y_embedder")
      cond = cond + table(y)[:, None].astype(self.dtype)
    # A per-image time keeps cond [B, 1, D]: its modulations are computed once per image
    # and broadcast over the tokens (DiT's cost); a per-token time map has [B, N, D].
    silu_c = nn.silu(cond)
    if self.modulation == "adaln_single":
      shared = nn.Dense(6 * d, kernel_init=nn.initializers.normal(0.02), bias_init=_zeros,
                        dtype=self.dtype, name="t_block")(silu_c).reshape(b, -1, 6, d)
    # The blocks as one scan over stacked parameters (maxtext's scan_layers, big_vision's
    # scan): one block is compiled, and remat (blocks.REMAT) recomputes each block's
    # activations in the backward pass.
    return_kv = tokens_pass is not None and tokens_pass.kind == "clean"
    block = blocks.remat_block(ModulatedBlock, self.remat)
    stack = nn.scan(block, variable_axes={"params": 0, "intermediates": 0},
                    split_rngs={"params": True}, in_axes=(nn.broadcast, 0),
                    length=self.depth, unroll=self.depth if self.unroll_blocks else 1)
    context = (silu_c if self.modulation == "adaln_zero" else shared, mask, index)
    h, kv = stack(d, self.num_heads, self.mlp_ratio, self.modulation, self.dtype, return_kv,
                  name="blocks")(h, context, layer_caches)
    # The final layer: modulated LayerNorm, then a linear map to the patch's pixels.
    if self.modulation == "adaln_zero":
      final = nn.Dense(2 * d, kernel_init=_zeros, bias_init=_zeros, dtype=self.dtype,
                       name="final_adaln")(silu_c).reshape(b, -1, 2, d)
    else:
      table = self.param("final_scale_shift_table",
                         nn.initializers.normal(1.0 / math.sqrt(d)), (2, d))
      final = cond[:, :, None] + table.astype(self.dtype)
    h = nn.LayerNorm(epsilon=1e-6, use_bias=False, use_scale=False, dtype=self.dtype,
                     name="norm_final")(h)
    h = modulate(h, final[:, :, 0], final[:, :, 1])
    h = nn.Dense(p * p * self.out_channels, kernel_init=_zeros, bias_init=_zeros,
                 dtype=self.dtype, name="final_linear")(h)
    if tokens_pass is not None:
      return h.astype(jnp.float32), kv
    out = einops.rearrange(h, "b (h w) (p q c) -> b (h p) (w q) c", h=gh, p=p, q=p)
    return out.astype(jnp.float32)
