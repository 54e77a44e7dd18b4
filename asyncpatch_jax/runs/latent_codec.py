"""Latent AsyncPatch (AsyncPatch Sec. 5.2, App. E-F): a frozen localized autoencoder between pixels
and the latent tokens the UNet diffuses, each token with its own noise level.

Training encodes every batch with the frozen autoencoder inside the jitted train step
(`LatentCodec.encode`, the pre-quantisation latent times `scale`) and trains the UNet on
the latents exactly as on pixels. Sampling runs the sampler on tokens and decodes
(`decode` quantises first, as latent diffusion does).

Pixel tasks on tokens. Every `--mode=sample` task of the pixel model is a pixel schedule
`tau [N+1, H, W]` (and for conditional tasks a known image and mask); on tokens:
  * token time = the largest time of any pixel the token depends on: over its f x f
    cell and the encoder's halo when there is known content, over the cell alone when
    there is none (`latent_schedule`). So a token is known (time 0 throughout) only if
    every pixel of its cell and halo is known -- the token mask (`vqae.token_mask`) --
    and then, by locality, its latent is exactly the latent of the unmasked image,
    the distribution the UNet was trained on;
  * the known tokens come from encoding the masked image with its mask
    (`encode(x, mask)`; hidden pixels never reach them);
  * the decoded image keeps the known pixels exactly (`finish`: pasted back).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.models import vqae


class LatentCodec:
  """Pixels <-> scaled latent tokens of a trained autoencoder (frozen).

  Attributes:
    ae: the VQAutoencoder module; params: its parameters; scale: the latent multiplier
    (1 / std of the training latents unless given); pixel_shape [H, W, C];
    latent_shape [H/f, W/f, D].
  """

  def __init__(self, ae: vqae.VQAutoencoder, params, scale: float, pixel_shape):
    self.ae = ae
    self.params = params
    self.scale = float(scale)
    self.pixel_shape = tuple(int(s) for s in pixel_shape)
    self.latent_shape = ae.latent_shape(self.pixel_shape)
    self._encode_jit = jax.jit(self.encode)
    self._decode_jit = jax.jit(self.decode)

  @property
  def variables(self) -> dict[str, Any]:
    return {"params": self.params}

  # -------------------------------------------------------------- traceable (inside jit)
  def encode(self, variables, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    """Scaled pre-quantisation latents of x [B, H, W, C] (mask [B, H, W], default all known)."""
    if mask is None:
      mask = jnp.ones(x.shape[:3], jnp.float32)
    h = self.ae.apply(variables, x, mask, method=self.ae.encode)
    return jax.lax.stop_gradient(h * self.scale)

  def decode(self, variables, z: jax.Array) -> jax.Array:
    """Images [B, H, W, C] of scaled latents z (quantised, decoded with the all-known mask)."""
    b, h, w, _ = z.shape
    f = self.ae.factor
    mask = jnp.ones((b, h * f, w * f), jnp.float32)
    return self.ae.apply(variables, z / self.scale, mask, method=self.ae.decode)

  # -------------------------------------------------------------- host side
  def encode_images(self, x, mask=None) -> np.ndarray:
    """encode() on host arrays (compiled once per shape)."""
    x = np.asarray(x, np.float32)
    mask = np.ones(x.shape[:3], np.float32) if mask is None else np.asarray(mask, np.float32)
    self.ae.check_inputs(x, mask)
    return np.asarray(self._encode_jit(self.variables, x, mask))

  def decode_latents(self, z) -> np.ndarray:
    return np.asarray(self._decode_jit(self.variables, jnp.asarray(z, jnp.float32)))

  def token_mask(self, mask, halo: int | None = None) -> np.ndarray:
    """Pixel mask [..., H, W] -> token mask [..., H/f, W/f]: known iff cell and halo known.

    halo: default the encoder's (exact); a smaller one (e.g. 0: the cell alone) also keeps
    tokens whose halo is partly hidden, whose latents then differ from the unmasked ones.
    """
    return vqae.token_mask(mask, self.ae.factor, self.ae.halo if halo is None else halo)

  def latent_schedule(self, tau, known_content: bool, halo: int | None = None) -> np.ndarray:
    """Pixel schedule [N+1, (B,) H, W] -> token schedule [N+1, (B,) H/f, W/f] (module docstring).

    halo: as in `token_mask` (used only with known content)."""
    tau = schedules.validate_schedule(tau, self.pixel_shape[:2])
    halo = (self.ae.halo if halo is None else halo) if known_content else 0
    return schedules.validate_schedule(vqae.receptive_field_max(tau, self.ae.factor, halo))

  def finish(self, z, x=None, mask=None) -> np.ndarray:
    """Decodes latents z [B, h, w, D]; with known content x [(B,) H, W, C] and its mask
    [(B,) H, W] (1 = known), the known pixels are pasted back exactly."""
    out = self.decode_latents(z)
    if x is not None:
      m = np.broadcast_to(np.asarray(mask, np.float32)[..., None] > 0, out.shape)
      out = np.where(m, np.broadcast_to(np.asarray(x, np.float32), out.shape), out)
    return out

  def model_shape(self, image_shape) -> tuple[int, int, int]:
    """The token grid [h, w, D] of pixel images [H, W, C] (this codec's pixel_shape)."""
    if tuple(int(v) for v in image_shape) != self.pixel_shape:
      raise ValueError(f"images of shape {tuple(image_shape)} given to a codec of "
                       f"{self.pixel_shape} images.")
    return self.latent_shape

  def to_model(self, tau, x=None, mask=None):
    """A pixel task (schedule tau [N+1, (B,) H, W], known images x [(B,) H, W, C] and masks
    [(B,) H, W], or None) on tokens: (token schedule, known latents [(B,) h, w, D] or None,
    token masks [(B,) h, w] or None)."""
    tau_tokens = self.latent_schedule(tau, known_content=x is not None)
    if x is None:
      return tau_tokens, None, None
    single = np.ndim(x) == 3
    x = np.asarray(x)[None] if single else np.asarray(x)
    mask = np.broadcast_to(np.asarray(mask, np.float32), x.shape[:3])
    z, tokens = self.known_latents(x, mask)
    return (tau_tokens, z[0], tokens[0]) if single else (tau_tokens, z, tokens)

  def ipr_regions(self, grid, token_mask, shape=None) -> tuple[np.ndarray, np.ndarray]:
    """IPR regions over the token grid and the condition set: the regions whose tokens are all
    known. Unlike pixels, a region the token mask knows only in part is refined (its known
    pixels come back when decoded: `finish`). shape: the token grid (default latent_shape)."""
    h, w = (shape or self.latent_shape)[:2]
    regions = schedules.grid_regions(h, w, tuple(grid))
    return regions, schedules.known_regions(regions, token_mask)[0]

  def known_latents(self, x, mask) -> tuple[np.ndarray, np.ndarray]:
    """(scaled latents of the masked images [B, h, w, D], token masks [B, h, w])."""
    x = np.asarray(x, np.float32)
    mask = np.broadcast_to(np.asarray(mask, np.float32), x.shape[:3])
    return self.encode_images(x, mask), self.token_mask(mask)

