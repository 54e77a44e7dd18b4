"""The mask-conditioned, localized VQ autoencoder of latent AsyncPatch (AsyncPatch Sec. 5.2, App. F).

Architecture (Table 7; the f = 4 VQ model of latent diffusion, Rombach et al. 2022):
encoder and decoder of residual blocks over `len(channel_mult)` resolutions (base 128,
multipliers (1, 2, 4), 2 blocks per scale, f = 2^(L-1) = 4), RMSNorm, 3 latent
channels, a codebook of 8192 entries; optional self-attention in the decoder only.

Mask conditioning (App. F). The pixel mask `m [B, H, W]` (1 = known) enters both
encoder and decoder the way time enters the UNet: it is average-pooled to every
resolution, embedded there (the UNet's `TimeEmbedding`, its own weights), and every
residual block applies `h * (1 + scale) + shift` with `(scale, shift)` projected per
position by a zero-initialised Dense. The image enters the encoder only as `x * m`
(with `1 - m` as one more input channel), so hidden pixels (m = 0) cannot reach any
latent.

Localized encoding (Sec. 5.2: "no information regarding the mask is leaked to the
surrounding latents"), exact by construction:
  * the encoder is convolutions, per-position RMSNorm over channels and per-position
    FiLM only (no GroupNorm over the image, no attention);
  * downsampling is a 2x2 stride-2 convolution, aligned with the cells, so it adds
    no halo (latent diffusion uses a 3x3 stride-2 convolution with (0, 1) padding);
  * every k x k convolution at level l (resolution H / 2^l) widens the dependence by
    (k - 1) / 2 * 2^l pixels on each side; `encoder_kernels[l]` sets k per level.
So latent token (i, j) depends only on the pixels (and mask values) of its f x f cell
`[f i, f i + f) x [f j, f j + f)` widened by `halo` pixels on every side, with
`halo = encoder_halo(...)` (an exact bound, checked with VJPs in tests/test_vqae.py).
Consequently a token whose cell and halo are all known has exactly the latent of the
unmasked image: `token_mask` marks those tokens, the ones latent inpainting keeps.

Quantisation: nearest codebook entry, straight-through gradient, no EMA updates.
Diffusion runs on the continuous pre-quantisation latent (`encode`); `decode`
quantises first, as in latent diffusion's VQ models.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.models import blocks
from asyncpatch_jax.models import embeddings

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def encoder_halo(channel_mult, num_res_blocks: int, encoder_kernels) -> int:
  """The encoder's receptive-field halo in pixels (see the module docstring).

  Level l holds `2 * num_res_blocks` convolutions of kernel `encoder_kernels[l]`; level 0
  also the input convolution, the last level also the two middle blocks (4 convolutions)
  and the output convolution. A k x k convolution at level l adds (k - 1) / 2 * 2^l.
  """
  num_levels = len(channel_mult)
  halo = 0
  for level, k in enumerate(encoder_kernels):
    n = 2 * num_res_blocks + (level == 0) + (5 if level == num_levels - 1 else 0)
    halo += n * (k - 1) // 2 * 2 ** level
  return halo


class LocalResBlock(nn.Module):
  """Residual block with per-position RMSNorm and mask FiLM, k x k convolutions.

  x: [B, h, w, C_in]; emb: silu'd mask embedding [B, h, w, E]. Nothing in it mixes
  positions except its two convolutions (radius (k - 1) / 2 each).
  """
  channels: int
  kernel: int = 3
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array) -> jax.Array:
    k = (self.kernel, self.kernel)
    norm = lambda name: blocks.Norm("rms", dtype=self.dtype, name=name)
    h = nn.Conv(self.channels, k, dtype=self.dtype, name="conv_0")(nn.silu(norm("norm_0")(x)))
    film = nn.Dense(2 * self.channels, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    name="film")(emb)
    scale, shift = jnp.split(film, 2, axis=-1)
    h = norm("norm_1")(h) * (1.0 + scale) + shift
    h = nn.Conv(self.channels, k, dtype=self.dtype, name="conv_1")(nn.silu(h))
    skip = x if x.shape[-1] == self.channels else nn.Conv(
        self.channels, (1, 1), dtype=self.dtype, name="skip")(x)
    return skip + h


def _mask_embeddings(embed: nn.Module, mask: jax.Array, num_levels: int) -> list[jax.Array]:
  """silu(embedding of the mask average-pooled to level l), l = 0..L-1: [B, H/2^l, W/2^l, E]."""
  return [nn.silu(embed(embeddings.pool_time(mask, 2 ** level))) for level in range(num_levels)]


class Encoder(nn.Module):
  """(x * m, 1 - m) [B, H, W, C + 1] and the mask m [B, H, W] -> features [B, H/f, W/f, latent]."""
  base_channels: int
  channel_mult: tuple[int, ...]
  num_res_blocks: int
  latent_channels: int
  kernels: tuple[int, ...]
  mask_embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    num_levels = len(self.channel_mult)
    embed = embeddings.TimeEmbedding(self.mask_embed_dim, self.mask_embed_dim, self.dtype,
                                     name="mask_embed")
    embs = _mask_embeddings(embed, mask, num_levels)
    k0 = (self.kernels[0],) * 2
    h = nn.Conv(self.base_channels, k0, dtype=self.dtype, name="conv_in")(x.astype(self.dtype))
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = LocalResBlock(self.base_channels * mult, self.kernels[level], self.dtype,
                          name=f"down_{level}_res_{i}")(h, embs[level])
      if level != num_levels - 1:
        # Cell-aligned 2x2 stride-2 downsampling: adds no halo.
        h = nn.Conv(h.shape[-1], (2, 2), strides=(2, 2), padding="VALID", dtype=self.dtype,
                    name=f"down_{level}_downsample")(h)
    k_last = self.kernels[-1]
    for i in range(2):
      h = LocalResBlock(h.shape[-1], k_last, self.dtype, name=f"mid_res_{i}")(h, embs[-1])
    h = nn.silu(blocks.Norm("rms", dtype=self.dtype, name="norm_out")(h))
    return nn.Conv(self.latent_channels, (k_last, k_last), dtype=self.dtype,
                   name="conv_out")(h)


class Decoder(nn.Module):
  """Quantised latent [B, h, w, latent] and mask [B, H, W] -> features before the last conv.

  Returns silu(norm(h)) [B, H, W, base_channels * channel_mult[0]]; the autoencoder's
  `conv_out` (the "last layer" of the adaptive discriminator weight) maps it to pixels.
  """
  base_channels: int
  channel_mult: tuple[int, ...]
  num_res_blocks: int
  attention_resolutions: tuple[int, ...]
  head_dim: int
  mask_embed_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, mask: jax.Array) -> jax.Array:
    num_levels = len(self.channel_mult)
    embed = embeddings.TimeEmbedding(self.mask_embed_dim, self.mask_embed_dim, self.dtype,
                                     name="mask_embed")
    embs = _mask_embeddings(embed, mask, num_levels)
    attn = lambda name: blocks.Attention(self.head_dim, norm="rms", dtype=self.dtype, name=name)
    h = nn.Conv(self.base_channels * self.channel_mult[-1], (3, 3), dtype=self.dtype,
                name="conv_in")(z.astype(self.dtype))
    h = LocalResBlock(h.shape[-1], 3, self.dtype, name="mid_res_0")(h, embs[-1])
    if h.shape[1] in self.attention_resolutions:
      h = attn("mid_attn")(h)
    h = LocalResBlock(h.shape[-1], 3, self.dtype, name="mid_res_1")(h, embs[-1])
    for level in reversed(range(num_levels)):
      for i in range(self.num_res_blocks + 1):
        h = LocalResBlock(self.base_channels * self.channel_mult[level], 3, self.dtype,
                          name=f"up_{level}_res_{i}")(h, embs[level])
        if h.shape[1] in self.attention_resolutions:
          h = attn(f"up_{level}_attn_{i}")(h)
      if level != 0:
        h = blocks.Upsample(self.dtype, name=f"up_{level}_upsample")(h)
    return nn.silu(blocks.Norm("rms", dtype=self.dtype, name="norm_out")(h))


class VectorQuantizer(nn.Module):
  """Nearest-neighbour vector quantisation with a straight-through gradient (van den Oord 2017).

  h [..., D] -> (z_q_st, z_q, indices): z_q = codebook[argmin_k ||h - e_k||^2] [..., D];
  z_q_st = (h - sg(h)) + sg(z_q) equals z_q exactly and passes the gradient to h
  unchanged (none to the codebook); indices [...] int32. The codebook is learned by the
  codebook loss (no EMA), initialised uniform in [-1/K, 1/K] as in taming-transformers.
  """
  codebook_size: int
  dim: int

  @nn.compact
  def __call__(self, h: jax.Array):
    k = self.codebook_size
    init = lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -1.0 / k, 1.0 / k)
    codebook = self.param("codebook", init, (k, self.dim))
    flat = h.reshape(-1, self.dim).astype(jnp.float32)
    # ||h||^2 - 2 h.e + ||e||^2; the ||h||^2 term does not change the argmin.
    dist = (-2.0 * flat @ codebook.T) + jnp.sum(codebook ** 2, axis=1)[None, :]
    indices = jnp.argmin(dist, axis=1).astype(jnp.int32)
    z_q = codebook[indices].reshape(h.shape)
    # (h - sg(h)) + sg(z_q): exactly z_q in value (h - h = 0), gradient 1 w.r.t. h.
    z_st = (h - jax.lax.stop_gradient(h)) + jax.lax.stop_gradient(z_q)
    return z_st, z_q, indices.reshape(h.shape[:-1])


def _check_kernels(kernels, channel_mult) -> None:
  if len(kernels) != len(channel_mult) or any(k < 1 or k % 2 == 0 for k in kernels):
    raise checks.InputError(
        f"autoencoder.encoder_kernels={kernels}; expected one odd kernel size per level "
        f"({len(channel_mult)} levels, channel_mult={channel_mult}).")


class VQAutoencoder(nn.Module):
  """Mask-conditioned, localized VQ autoencoder (AsyncPatch App. F, Table 7).

  Public API (used by latent diffusion):
    ae.apply(variables, x [B, H, W, C], mask [B, H, W], method=ae.encode)
        -> pre-quantisation latent [B, H/f, W/f, latent_channels] (diffusion runs here);
    ae.apply(variables, h, mask, method=ae.decode) -> [B, H, W, C] (quantises h first);
    ae.halo: the encoder's halo in pixels; ae.factor: f.
  `__call__(x, mask)` runs the whole model for training and returns
  (x_rec, h, z_q, indices).

  Attributes:
    image_channels: C.
    base_channels, channel_mult, num_res_blocks: Table 7 (128, (1, 2, 4), 2).
    latent_channels: latent width (3).
    codebook_size: K (8192).
    encoder_kernels: convolution kernel size of the encoder at each level; sets the halo.
    attention_resolutions: heights at which the *decoder* applies self-attention (the
      encoder never does: it would make every latent depend on every pixel).
    head_dim: attention head width.
    mask_embed_dim: width of the mask embedding (the FiLM input).
    dtype: compute dtype.
  """
  image_channels: int = 3
  base_channels: int = 128
  channel_mult: tuple[int, ...] = (1, 2, 4)
  num_res_blocks: int = 2
  latent_channels: int = 3
  codebook_size: int = 8192
  encoder_kernels: tuple[int, ...] = (3, 3, 1)
  attention_resolutions: tuple[int, ...] = ()
  head_dim: int = 64
  mask_embed_dim: int = 128
  dtype: jnp.dtype = jnp.float32

  def setup(self):
    _check_kernels(tuple(self.encoder_kernels), tuple(self.channel_mult))
    self.encoder = Encoder(self.base_channels, tuple(self.channel_mult), self.num_res_blocks,
                           self.latent_channels, tuple(self.encoder_kernels),
                           self.mask_embed_dim, self.dtype)
    self.quant_conv = nn.Conv(self.latent_channels, (1, 1), name="quant_conv")
    self.quantizer = VectorQuantizer(self.codebook_size, self.latent_channels)
    self.post_quant_conv = nn.Conv(self.latent_channels, (1, 1), name="post_quant_conv")
    self.decoder = Decoder(self.base_channels, tuple(self.channel_mult), self.num_res_blocks,
                           tuple(self.attention_resolutions), self.head_dim,
                           self.mask_embed_dim, self.dtype)
    self.conv_out = nn.Conv(self.image_channels, (3, 3), dtype=self.dtype, name="conv_out")

  @property
  def factor(self) -> int:
    """Spatial downsampling f = 2^(L - 1)."""
    return 2 ** (len(self.channel_mult) - 1)

  @property
  def halo(self) -> int:
    """Pixels beyond its f x f cell, on every side, that a latent token depends on."""
    return encoder_halo(self.channel_mult, self.num_res_blocks, self.encoder_kernels)

  def latent_shape(self, image_shape) -> tuple[int, int, int]:
    """[H, W, C] -> [H/f, W/f, latent_channels] (checks divisibility)."""
    h, w, c = image_shape
    self._check_size(h, w, c)
    return (h // self.factor, w // self.factor, self.latent_channels)

  def _check_size(self, h: int, w: int, c: int) -> None:
    for size, name in ((h, "height"), (w, "width")):
      checks.check_divisible(size, self.factor, f"image {name}",
                             f"the autoencoder's downsampling factor f = {self.factor}; crop or "
                             "pad the image to a multiple of it")
    if c != self.image_channels:
      raise checks.InputError(f"the image has {c} channels; this autoencoder was built for "
                              f"image_channels={self.image_channels}.")

  def check_inputs(self, x, mask) -> None:
    """Image [B, H, W, C] with H, W multiples of f; mask [B, H, W] of 0/1."""
    checks.check_image(x, "x")
    b, h, w, c = x.shape
    self._check_size(h, w, c)
    if tuple(np.shape(mask)) != (b, h, w):
      raise checks.InputError(f"mask has shape {tuple(np.shape(mask))}; expected [{b}, {h}, {w}] "
                              "(one value per pixel of the image, 1 = known, 0 = hidden).")
    if checks.is_concrete(mask):
      checks.check_mask(np.asarray(mask), (b, h, w), "mask")

  def check_latent(self, h, mask) -> None:
    """Latent [B, H/f, W/f, latent_channels] and the pixel mask [B, H, W]."""
    if np.ndim(h) != 4 or np.shape(h)[-1] != self.latent_channels:
      raise checks.InputError(f"latent has shape {tuple(np.shape(h))}; expected "
                              f"[B, H/{self.factor}, W/{self.factor}, {self.latent_channels}].")
    b, hh, ww, _ = np.shape(h)
    expected = (b, hh * self.factor, ww * self.factor)
    if tuple(np.shape(mask)) != expected:
      raise checks.InputError(f"mask has shape {tuple(np.shape(mask))}; a latent of shape "
                              f"{tuple(np.shape(h))} decodes to pixels {list(expected)}.")
    if checks.is_concrete(mask):
      checks.check_mask(np.asarray(mask), expected, "mask")

  def encode(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    """Pre-quantisation latent of the masked image: [B, H/f, W/f, latent_channels] (float32)."""
    self.check_inputs(x, mask)
    m = jnp.asarray(mask, jnp.float32)
    # The hidden-pixel indicator 1 - m is an input channel besides the FiLM: without it a
    # hidden region is an all-zero input, whose per-position RMSNorm has gradients
    # ~1/sqrt(eps) (the step-0 gradient norm was 3e10).
    m4 = m[..., None].astype(x.dtype)
    h = self.encoder(jnp.concatenate([x * m4, 1.0 - m4], axis=-1), m)
    return self.quant_conv(h.astype(jnp.float32))

  def quantize(self, h: jax.Array):
    """(z_q_st, z_q, indices): see VectorQuantizer."""
    return self.quantizer(h)

  def decode_features(self, z_q: jax.Array, mask: jax.Array) -> jax.Array:
    """Decoder features before the last layer, from a quantised latent."""
    return self.decoder(self.post_quant_conv(z_q), jnp.asarray(mask, jnp.float32))

  def to_pixels(self, features: jax.Array) -> jax.Array:
    """The last layer (`conv_out`): features -> image [B, H, W, C] (float32)."""
    return self.conv_out(features).astype(jnp.float32)

  def decode(self, h: jax.Array, mask: jax.Array) -> jax.Array:
    """Quantises the latent h [B, H/f, W/f, latent] and decodes it: [B, H, W, C]."""
    self.check_latent(h, mask)
    z_q, _, _ = self.quantize(h)
    return self.to_pixels(self.decode_features(z_q, mask))

  def __call__(self, x: jax.Array, mask: jax.Array):
    """(x_rec [B, H, W, C], h [B, h, w, D], z_q [B, h, w, D], indices [B, h, w])."""
    h = self.encode(x, mask)
    z_st, z_q, indices = self.quantize(h)
    return self.to_pixels(self.decode_features(z_st, mask)), h, z_q, indices


def build_autoencoder(ae_config) -> VQAutoencoder:
  """The autoencoder described by a `config.autoencoder` ConfigDict (configs/vqae_*.py)."""
  dtype = ae_config.get("dtype", "float32")
  checks.check_choice(dtype, tuple(_DTYPES), "autoencoder.dtype")
  for key in ("image_channels", "base_channels", "num_res_blocks", "latent_channels",
              "codebook_size", "head_dim", "mask_embed_dim"):
    checks.check_positive_int(ae_config[key], f"autoencoder.{key}")
  _check_kernels(tuple(ae_config.encoder_kernels), tuple(ae_config.channel_mult))
  return VQAutoencoder(
      image_channels=ae_config.image_channels,
      base_channels=ae_config.base_channels,
      channel_mult=tuple(ae_config.channel_mult),
      num_res_blocks=ae_config.num_res_blocks,
      latent_channels=ae_config.latent_channels,
      codebook_size=ae_config.codebook_size,
      encoder_kernels=tuple(ae_config.encoder_kernels),
      attention_resolutions=tuple(ae_config.attention_resolutions),
      head_dim=ae_config.head_dim,
      mask_embed_dim=ae_config.mask_embed_dim,
      dtype=_DTYPES[dtype],
  )


def init_variables(ae: VQAutoencoder, key: jax.Array, image_shape, batch: int = 1):
  """`ae.init` on zero inputs of `image_shape` [H, W, C] (use under jax.eval_shape for shapes)."""
  x = jnp.zeros((batch, *image_shape), jnp.float32)
  return ae.init(key, x, jnp.ones((batch, *image_shape[:2]), jnp.float32))


# ----------------------------------------------------------------------------- tokens

def receptive_field_max(values, factor: int, halo: int) -> np.ndarray:
  """Per token, the maximum of `values` over the pixels it depends on (cell + halo).

  values: [..., H, W] (NumPy, any leading axes) -> [..., H/f, W/f]. Pixels outside the
  image count as -inf (the encoder sees the same zero padding whatever the mask).
  """
  v = np.asarray(values, np.float64)
  *lead, h, w = v.shape
  if h % factor or w % factor:
    raise checks.InputError(f"a {h}x{w} map is not divisible by the autoencoder's factor {factor}.")
  if halo:
    size = [1] * len(lead) + [2 * halo + 1, 2 * halo + 1]
    v = ndimage.maximum_filter(v, size=size, mode="constant", cval=-np.inf)
  v = v.reshape(*lead, h // factor, factor, w // factor, factor)
  return v.max(axis=(-3, -1))


def token_mask(mask, factor: int, halo: int) -> np.ndarray:
  """Pixel mask [..., H, W] (1 = known) -> token mask [..., H/f, W/f] (float32).

  A token is known only if every pixel of its cell and halo is known: then its latent
  equals the latent of the unmasked image exactly (locality).
  """
  m = np.asarray(mask, np.float64)
  if not np.all((m == 0) | (m == 1)):
    raise checks.InputError("mask must be binary (1 = known pixel, 0 = hidden).")
  return (1.0 - receptive_field_max(1.0 - m, factor, halo)).astype(np.float32)
