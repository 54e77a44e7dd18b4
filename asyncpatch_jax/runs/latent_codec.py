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

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.data import image_io
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

  @classmethod
  def load(cls, workdir, pixel_shape, scale: float = 0.0, model_config=None) -> "LatentCodec":
    """The codec of a trained autoencoder workdir for images of `pixel_shape` [H, W, C].

    scale: 0 reads 1 / std from the workdir's latent_stats.json (written at the end of
    the autoencoder's training). model_config: the UNet's `config.model`, checked
    against the latent shape (channels, divisibility).
    """
    from asyncpatch_jax.training import autoencoder_train  # pylint: disable=g-import-not-at-top
    if not workdir:
      raise checks.InputError("latent.autoencoder_workdir is empty; name a trained autoencoder "
                              "workdir (configs/vqae_*.py).")
    ae, params, meta = autoencoder_train.load_autoencoder(workdir)
    pixel_shape = tuple(int(s) for s in pixel_shape)
    if pixel_shape[-1] != ae.image_channels:
      raise checks.InputError(f"the images have {pixel_shape[-1]} channels but the autoencoder in "
                              f"{str(workdir)!r} was trained on {ae.image_channels}.")
    latent_shape = ae.latent_shape(pixel_shape)
    if model_config is not None:
      if model_config.out_channels != ae.latent_channels:
        raise checks.InputError(
            f"model.out_channels={model_config.out_channels} but the autoencoder's latent has "
            f"{ae.latent_channels} channels; set --config.model.out_channels={ae.latent_channels}.")
      down = 2 ** (len(model_config.channel_mult) - 1)
      if latent_shape[0] % down or latent_shape[1] % down:
        raise checks.InputError(
            f"the latent is {latent_shape[0]}x{latent_shape[1]} (images {pixel_shape[0]}x"
            f"{pixel_shape[1]} / f={ae.factor}), not divisible by the UNet's downsampling {down} "
            f"({len(model_config.channel_mult)} levels); use fewer UNet levels or larger images.")
    if not scale:
      stats = meta["latent_stats"]
      if stats is None or not stats.get("std"):
        raise checks.InputError(
            f"autoencoder workdir {str(workdir)!r} has no latent_stats.json (written when its "
            "training finishes); finish the training or set --config.latent.scale.")
      scale = 1.0 / stats["std"]
    if not np.isfinite(scale) or scale <= 0:
      raise checks.InputError(f"latent.scale={scale}; expected a positive number (0 = from the "
                              "autoencoder's latent statistics).")
    return cls(ae, jax.device_get(params), scale, pixel_shape)

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

  def token_task(self, tau, x=None, mask=None):
    """A pixel task (schedule tau [N+1, H, W], known image x [H, W, C] and mask [H, W], or
    None) on tokens: (token schedule, known latents [h, w, D] or None, token mask or None)."""
    tau_tokens = self.latent_schedule(tau, known_content=x is not None)
    if x is None:
      return tau_tokens, None, None
    z, tokens = self.known_latents(np.asarray(x)[None], np.asarray(mask)[None])
    return tau_tokens, z[0], tokens[0]

  def ipr_regions(self, grid, token_mask) -> tuple[np.ndarray, np.ndarray]:
    """IPR regions over the token grid and the condition set: the regions whose tokens are all
    known. Unlike pixels, a region the token mask knows only in part is refined (its known
    pixels come back when decoded: `finish`)."""
    regions = schedules.grid_regions(self.latent_shape[0], self.latent_shape[1], grid)
    n = int(regions.max()) + 1
    if token_mask is None:
      return regions, np.zeros((n,), bool)
    known = np.array([np.asarray(token_mask)[regions == k].min() for k in range(n)]) == 1
    return regions, known

  def known_latents(self, x, mask) -> tuple[np.ndarray, np.ndarray]:
    """(scaled latents of the masked images [B, h, w, D], token masks [B, h, w])."""
    x = np.asarray(x, np.float32)
    mask = np.broadcast_to(np.asarray(mask, np.float32), x.shape[:3])
    return self.encode_images(x, mask), self.token_mask(mask)


def write_grids(generator, params, codec: LatentCodec, sample_config, references: np.ndarray,
                key: jax.Array, out_dir) -> dict[str, str]:
  """The pixel model's grids (generate.write_grids) for a latent model: samples, inpainting
  of the right half (masked input, latent inpainting with known pixels pasted, originals)
  and autoregressive generation over a 2x2 grid of token patches; PNGs in `out_dir`."""
  from asyncpatch_jax.generation import generate  # pylint: disable=g-import-not-at-top
  n = sample_config.num_images
  h, w, c = codec.pixel_shape
  lh, lw, lc = codec.latent_shape
  steps, eta = sample_config.num_steps, sample_config.eta
  keys = jax.random.split(key, 3)
  paths = {}

  def save(name, images, ncols=None):
    path = out_dir / f"{name}.png"
    if jax.process_index() == 0:
      image_io.save_grid(np.asarray(images), path, ncols=ncols, scale=4 if h <= 32 else 1)
    paths[name] = str(path)

  sync = schedules.synchronous(steps, lh, lw)
  save("samples", codec.finish(generator(params, sync, key=keys[0], shape=(n, lh, lw, lc),
                                         eta=eta)))
  k = min(n, len(references), 16)
  x = references[:k]
  mask = np.broadcast_to(generate.left_half_mask(h, w), (k, h, w))
  z_known, _ = codec.known_latents(x, mask)
  tau = codec.latent_schedule(schedules.inpainting(mask[0], steps), known_content=True)
  z = generator(params, tau, key=keys[1], x=z_known, eta=eta)
  masked = np.where(mask[..., None] > 0, x, -1.0)
  save("inpainting", np.concatenate([masked, codec.finish(z, x, mask), x]), ncols=k)
  grid = (2, 2) if lh % 2 == 0 and lw % 2 == 0 else (1, 1)
  auto = generator(params, schedules.autoregressive(lh, lw, grid, max(steps // 4, 1)),
                   key=keys[2], shape=(n, lh, lw, lc), eta=eta)
  save("autoregressive", codec.finish(auto))
  return paths
