"""Autoencoder quality: reconstruction PSNR/SSIM with and without a mask, codebook usage, the leak test.

Images are in [-1, 1]; PSNR and SSIM are dm-pix's on the images mapped to [0, 1]
(peak 1). With a mask, PSNR is over the known pixels only (10 log10(1 / MSE_known)),
since the hidden ones were never seen by the encoder.

The leak test (AsyncPatch Sec. 5.2): for each image and mask, the largest change of a
known token's latent (token mask: cell and halo known) between encoding the masked
image with its mask and encoding the whole image, `max |E(x m, m) - E(x, 1)|` over
known tokens. Locality makes it exactly 0; `leak_boundary` reports the same change on
the tokens the mask only partly covers, for scale.
"""

from __future__ import annotations

from typing import Any

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.models import vqae


class Reconstructor:
  """Batched, compiled encode / decode of a trained autoencoder (one compilation per batch size)."""

  def __init__(self, ae: vqae.VQAutoencoder, params, batch_size: int = 64):
    self.ae = ae
    self.variables = {"params": params}
    self.batch_size = batch_size
    self._encode = jax.jit(lambda v, x, m: ae.apply(v, x, m, method=ae.encode))
    self._decode = jax.jit(lambda v, h, m: ae.apply(v, h, m, method=ae.decode))
    self._indices = jax.jit(lambda v, h: ae.apply(v, h, method=ae.quantize)[2])

  def _batched(self, fn, *arrays) -> np.ndarray:
    n = len(arrays[0])
    b = min(self.batch_size, n)
    out = []
    for i in range(0, n, b):
      chunk = [a[i:i + b] for a in arrays]
      k = len(chunk[0])
      if k < b:   # pad to the compiled batch size
        chunk = [np.concatenate([c, np.repeat(c[-1:], b - k, axis=0)]) for c in chunk]
      out.append(np.asarray(fn(self.variables, *chunk))[:k])
    return np.concatenate(out)

  def _ones(self, images) -> np.ndarray:
    return np.ones(np.shape(images)[:3], np.float32)

  def encode(self, images, masks=None) -> np.ndarray:
    """Pre-quantisation latents [N, H/f, W/f, D]."""
    images = np.asarray(images, np.float32)
    masks = self._ones(images) if masks is None else np.asarray(masks, np.float32)
    self.ae.check_inputs(images, masks)
    return self._batched(self._encode, images, masks)

  def decode(self, latents, masks) -> np.ndarray:
    return self._batched(self._decode, np.asarray(latents, np.float32),
                         np.asarray(masks, np.float32))

  def reconstruct(self, images, masks=None) -> np.ndarray:
    """decode(encode(x, m), m): [N, H, W, C]."""
    masks = self._ones(images) if masks is None else np.asarray(masks, np.float32)
    return self.decode(self.encode(images, masks), masks)

  def latent_statistics(self, images) -> dict[str, Any]:
    """Mean and std of the (unmasked) latents: latent diffusion divides by the std."""
    h = self.encode(images)
    return {"mean": float(h.mean()), "std": float(h.std()), "num_images": int(len(h)),
            "channel_std": h.reshape(-1, h.shape[-1]).std(axis=0).tolist()}

  def metrics(self, images, masks) -> dict[str, Any]:
    """Reconstruction metrics without and with the masks, codebook usage and the leak test."""
    images = np.asarray(images, np.float32)
    masks = np.asarray(masks, np.float32)
    if masks.shape != images.shape[:3]:
      raise checks.InputError(f"masks have shape {masks.shape}; expected {images.shape[:3]}.")
    full = self.encode(images)
    rec = self.decode(full, self._ones(images))
    a, b = (images + 1.0) / 2.0, (rec + 1.0) / 2.0
    out = {"num_images": int(len(images)),
           "l1": float(np.abs(images - rec).mean()),
           "psnr": float(np.mean(pix.psnr(jnp.asarray(a), jnp.asarray(b)))),
           "ssim": float(np.mean(pix.ssim(jnp.asarray(a), jnp.asarray(b))))
           if min(images.shape[1:3]) >= 11 else None}
    masked = self.encode(images, masks)
    rec_m = self.decode(masked, masks)
    w = masks[..., None]
    mse_known = ((w * ((images - rec_m) / 2.0) ** 2).sum(axis=(1, 2, 3))
                 / np.maximum(w.sum(axis=(1, 2, 3)) * images.shape[-1], 1))
    out["psnr_masked_known"] = float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse_known, 1e-12))))
    out["l1_masked_known"] = float((w * np.abs(images - rec_m)).sum()
                                   / max(w.sum() * images.shape[-1], 1))
    out["hidden_fraction"] = float(1.0 - masks.mean())
    out.update(leak_test(self.ae, full, masked, masks))
    idx = self._batched(self._indices, full)
    counts = np.bincount(idx.reshape(-1), minlength=self.ae.codebook_size)
    p = counts / counts.sum()
    out["perplexity"] = float(np.exp(-np.sum(p[p > 0] * np.log(p[p > 0]))))
    out["codes_used"] = int((counts > 0).sum())
    out["codebook_size"] = int(self.ae.codebook_size)
    return out


def leak_test(ae: vqae.VQAutoencoder, full_latents, masked_latents, masks) -> dict[str, Any]:
  """max |E(x m, m) - E(x, 1)| over known tokens (0 for a localized encoder) and boundary tokens."""
  known = vqae.token_mask(masks, ae.factor, ae.halo) > 0        # cell and halo known [N, h, w]
  cell_known = vqae.token_mask(masks, ae.factor, 0) > 0          # own cell known
  diff = np.abs(np.asarray(masked_latents) - np.asarray(full_latents)).max(axis=-1)
  boundary = cell_known & ~known                                 # known cell, hidden halo
  return {"leak_max_abs": float(diff[known].max()) if known.any() else 0.0,
          "leak_boundary_max_abs": float(diff[boundary].max()) if boundary.any() else 0.0,
          "known_token_fraction": float(known.mean())}
