"""Latent AsyncPatch on the embedded textures (AsyncPatch Sec. 5.2): autoencoder quality, the leak
test, and latent against pixel inpainting on the same masks.

  python -m experiments.asyncpatch.latent_textures --runs=/tmp/latent_textures --pixel_steps=1500 \
      --out=results/latent/latent_textures.json

Trains (or resumes; finished runs are reused) three models in `--runs` (default: a `runs`
folder next to `--out`):
  vqae/    the localized VQ autoencoder (configs/vqae_textures.py, --ae_steps);
  latent/  the AsyncPatch UNet on its 8x8x3 latents (configs/latent_textures.py);
  pixel/   an AsyncPatch UNet on the 32x32x3 pixels (configs/textures.py's UNet at width 32,
           one block per level: common.TEXTURES_PIXEL_UNET; --pixel_steps).
Then, on `--num_images` held-out crops:
  * reconstruction: L1, PSNR, SSIM of decode(encode(x)) without a mask, and PSNR over the
    known pixels with a mask of each family; codebook perplexity and codes used;
  * the leak test (evaluation/reconstruction.py): max |E(x m, m) - E(x, 1)| over the tokens
    whose cell and halo are known (0 for a localized encoder), and over the tokens with a
    known cell but a partly hidden halo (for scale);
  * inpainting (Eq. 4) of the same images and masks (data/masks.py families) with the pixel
    model and with the latent model (token mask, known tokens from the masked image, known
    pixels pasted back): PSNR and SSIM of the result, PSNR over the hidden pixels, the
    largest change of a known pixel (0 for both), and the share of tokens known; also the
    latent model with the cell-only token mask (tokens whose halo is partly hidden kept
    too: more context, but their latents are not the unmasked ones).
JSON + PNG grids (reconstructions, inpainting: rows masked input / latent / pixel / truth
per family) next to `--out`. `--tiny`: tiny widths, one training step each, 2 images.
"""

from __future__ import annotations

import json
import os

from absl import flags
import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.generation import generate
from asyncpatch_jax.data import datasets
from asyncpatch_jax.data import image_io
from asyncpatch_jax.data import masks as mask_lib
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.evaluation import reconstruction
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("runs", "", "Folder of the three runs (vqae/, latent/, pixel/); '' = "
                    "<dir of --out>/runs.")
flags.DEFINE_string("out", "results/latent/latent_textures.json", "Output JSON path.")
flags.DEFINE_integer("ae_steps", 2000, "Autoencoder training steps.")
flags.DEFINE_integer("latent_steps", 3000, "Latent UNet training steps.")
flags.DEFINE_integer("pixel_steps", 3000, "Pixel UNet training steps.")
flags.DEFINE_integer("pixel_batch", 16, "Pixel UNet batch size.")
flags.DEFINE_integer("num_images", 64, "Held-out images per mask family.")
flags.DEFINE_list("families", ["thin", "medium", "square", "left_half"], "Mask families.")
flags.DEFINE_integer("num_steps", 50, "Sampler steps.")
flags.DEFINE_float("eta", 0.25, "Sampler eta.")
flags.DEFINE_integer("seed", 0, "Root seed.")
common.define_tiny(dict(ae_steps=1, latent_steps=1, pixel_steps=1, pixel_batch=8,
                        num_images=2, num_steps=2, families=["square"]))

# --tiny: the configs' sections replaced (tiny widths and batches).
TINY = {
    "vqae_textures": {"autoencoder": {"base_channels": 4, "mask_embed_dim": 8,
                                      "codebook_size": 16}, "train": {"batch_size": 8},
                      "evaluate": {"reconstruct_images": 8}},
    "latent_textures": {"model": common.TINY_UNET, "train": {"batch_size": 8}},
}


def _config(name: str, **sections):
  config = common.updated(common.load_config(name), sections)
  return common.updated(config, TINY.get(name, {})) if FLAGS.tiny else config


def _psnr(a, b) -> np.ndarray:
  return np.asarray(pix.psnr((jnp.asarray(a) + 1) / 2, (jnp.asarray(b) + 1) / 2))


def _ssim(a, b) -> np.ndarray:
  return np.asarray(pix.ssim((jnp.asarray(a) + 1) / 2, (jnp.asarray(b) + 1) / 2))


def _hidden_psnr(x, y, m) -> float:
  w = (1.0 - m)[..., None]
  n = np.maximum(w.sum(axis=(1, 2, 3)) * x.shape[-1], 1)
  mse = (w * ((x - y) / 2) ** 2).sum(axis=(1, 2, 3)) / n
  return float(np.mean(10 * np.log10(1.0 / np.maximum(mse, 1e-12))))


def _inpaint_scores(x, out, m) -> dict:
  known = m[..., None] > 0
  return {"psnr": float(np.mean(_psnr(out, x))), "ssim": float(np.mean(_ssim(out, x))),
          "psnr_hidden": _hidden_psnr(x, out, m),
          "known_max_abs_change": float(np.abs(np.where(known, out - x, 0.0)).max())}


def main(argv):
  del argv
  wd = FLAGS.runs or os.path.join(os.path.dirname(os.path.abspath(FLAGS.out)), "runs")
  ae_dir, latent_dir, pixel_dir = (os.path.join(wd, n) for n in ("vqae", "latent", "pixel"))
  off = {"progress_bar": True}
  train = common.train_or_resume
  times = {
      "autoencoder": train(_config("vqae_textures", train={"num_steps": FLAGS.ae_steps, **off}),
                           ae_dir),
      "latent": train(_config("latent_textures", latent={"autoencoder_workdir": ae_dir},
                              train={"num_steps": FLAGS.latent_steps, **off},
                              sample={"num_images": 0}), latent_dir),
      "pixel": train(common.textures_pixel_config(FLAGS.pixel_steps, FLAGS.pixel_batch,
                                                  FLAGS.tiny), pixel_dir),
  }
  n = FLAGS.num_images
  test = datasets.get_dataset("textures", "test")
  x = np.stack([test[i]["image"] for i in range(n)])
  h, w, _ = x.shape[1:]

  # Autoencoder quality and the leak test, per mask family.
  ae_run = common.load_run(ae_dir)
  ae = ae_run.model
  rec = reconstruction.Reconstructor(ae, ae_run.params)
  family_masks = {f: mask_lib.make_masks(f, n, h, w, seed=FLAGS.seed) for f in FLAGS.families}
  autoencoder = {"halo": ae.halo, "factor": ae.factor, "step": ae_run.step,
                 "latent_std": ae_run.latent_stats["std"], "families": {}}
  for f, m in family_masks.items():
    autoencoder["families"][f] = rec.metrics(x, m)
  first = next(iter(autoencoder["families"].values()))
  autoencoder.update({k: first[k] for k in ("l1", "psnr", "ssim", "perplexity", "codes_used",
                                            "codebook_size")})

  # Latent vs pixel inpainting on the same images and masks.
  latent_run, pixel_run = common.load_run(latent_dir), common.load_run(pixel_dir)
  codec = latent_run.codec
  lgen, pgen = generate.Generator(latent_run.model), generate.Generator(pixel_run.model)
  key = jax.random.key(FLAGS.seed)
  inpainting, rows = {}, []
  for k, (f, m) in enumerate(family_masks.items()):
    kf = jax.random.fold_in(key, k)
    pix_out = np.asarray(pgen(pixel_run.params, schedules.inpainting(m, FLAGS.num_steps),
                              key=kf, x=x, eta=FLAGS.eta))
    z_known, tokens = codec.known_latents(x, m)
    tau_pixels = schedules.inpainting(m, FLAGS.num_steps)
    z = lgen(latent_run.params, codec.latent_schedule(tau_pixels, known_content=True), key=kf,
             x=z_known, eta=FLAGS.eta)
    lat_out = codec.finish(z, x, m)
    # The cell-only token mask also keeps tokens whose halo is partly hidden (not exact).
    z_cell = lgen(latent_run.params, codec.latent_schedule(tau_pixels, True, halo=0), key=kf,
                  x=z_known, eta=FLAGS.eta)
    cell_out = codec.finish(z_cell, x, m)
    inpainting[f] = {"hidden_fraction": float(1 - m.mean()),
                     "known_token_fraction": float(tokens.mean()),
                     "known_token_fraction_cell_only": float(codec.token_mask(m, halo=0).mean()),
                     "latent": _inpaint_scores(x, lat_out, m),
                     "latent_cell_only_token_mask": _inpaint_scores(x, cell_out, m),
                     "pixel": _inpaint_scores(x, pix_out, m)}
    show = slice(0, 8)
    rows += [np.where(m[show, ..., None] > 0, x[show], -1.0), lat_out[show], pix_out[show], x[show]]
    print(f, json.dumps(inpainting[f]))

  out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
  os.makedirs(out_dir, exist_ok=True)
  image_io.save_grid(np.concatenate(rows), os.path.join(out_dir, "inpainting.png"), ncols=8,
                     scale=3)
  m0 = family_masks[FLAGS.families[0]][:8]
  image_io.save_grid(np.concatenate([x[:8], rec.reconstruct(x[:8]),
                                     np.where(m0[..., None] > 0, x[:8], -1.0),
                                     rec.reconstruct(x[:8], m0)]),
                     os.path.join(out_dir, "reconstructions.png"), ncols=8, scale=3)
  sync = schedules.synchronous(FLAGS.num_steps, *codec.latent_shape[:2])
  samples = codec.finish(lgen(latent_run.params, sync, key=jax.random.fold_in(key, 99),
                              shape=(16, *codec.latent_shape), eta=FLAGS.eta))
  image_io.save_grid(samples, os.path.join(out_dir, "latent_samples.png"), ncols=8, scale=3)
  result = {
      "autoencoder": autoencoder, "inpainting": inpainting,
      "settings": {"ae_steps": FLAGS.ae_steps, "latent_steps": FLAGS.latent_steps,
                   "pixel_steps": FLAGS.pixel_steps, "pixel_batch": FLAGS.pixel_batch,
                   "num_images": n, "families": list(FLAGS.families),
                   "num_steps": FLAGS.num_steps, "eta": FLAGS.eta, "seed": FLAGS.seed,
                   "latent_shape": list(codec.latent_shape), "latent_scale": codec.scale,
                   "train_seconds_this_run": times, "total_seconds": common.elapsed(),
                   "device": str(jax.devices()[0].device_kind)},
  }
  common.write_json(FLAGS.out, result, time_key=None)
  print(json.dumps(result["settings"], indent=2))


if __name__ == "__main__":
  common.run(main)
