"""Latent AsyncPatch cost, measured side by side in one run (AsyncPatch Sec. 5.2).

  python -m experiments.benchmarks.bench_latent --out=results/latent/bench_latent.json

1. Autoencoder throughput (images/s): `encode` (the pre-quantisation latent) and `decode`
   (quantise + decoder) of the textures autoencoder (configs/vqae_textures.py, 32x32x3)
   and, with --paper, of Table 7's (configs/vqae_imagenet256.py, 256x256x3).
2. The train step of the AsyncPatch UNet of configs/latent_textures.py on the 8x8x3
   latents (the batch encoded by the frozen autoencoder inside the step) against the same
   UNet on the 32x32x3 pixels, and against configs/textures.py's pixel UNet: seconds per
   step and the ratio, at the same batch and image size. Parameter values do not change
   the cost, so every network has random weights (no training needed).
Timings interleave the programs (round-robin repeats, median per program). `--tiny`: tiny
widths, batch 2, one call.
"""

from __future__ import annotations

import functools
import json
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runs import latent_codec as latent
from asyncpatch_jax.models import vqae
from asyncpatch_jax.training import train
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "results/latent/bench_latent.json", "Output JSON path.")
flags.DEFINE_integer("batch", 64, "Batch of the 32x32 programs.")
flags.DEFINE_integer("repeats", 5, "Timed rounds (each runs every program `calls` times).")
flags.DEFINE_integer("calls", 3, "Calls per program and round.")
flags.DEFINE_bool("paper", False, "Also time Table 7's autoencoder at 256x256 (batch 4).")
common.define_tiny(dict(batch=2, repeats=1, calls=1), "Tiny widths (a smoke run for the tests).")

# --tiny: the configs' sections replaced (a UNet of two levels: the latents are downsampled).
TINY = {"autoencoder": {"base_channels": 4, "mask_embed_dim": 8, "codebook_size": 16},
        "model": {"base_channels": 8, "channel_mult": (1, 2), "num_res_blocks": (1, 1),
                  "attention_resolutions": (), "head_dim": 8, "time_embed_dim": 16,
                  "num_groups": 4}}


def _config(name):
  config = common.load_config(name)
  if FLAGS.tiny:
    common.updated(config, {k: v for k, v in TINY.items() if k in config})
  return config


def _init(fn, key):
  return jax.jit(fn).lower(key).compile({"xla_backend_optimization_level": 0}
                                        if jax.default_backend() == "cpu" else None)(key)


def _time(programs: dict, repeats: int, calls: int) -> dict:
  """Median seconds per call of each program (zero-argument callables returning arrays)."""
  for f in programs.values():
    jax.block_until_ready(f())
  times = {k: [] for k in programs}
  for _ in range(repeats):
    for k, f in programs.items():
      t = time.perf_counter()
      for _ in range(calls):
        out = f()
      jax.block_until_ready(out)
      times[k].append((time.perf_counter() - t) / calls)
  return {k: float(np.median(v)) for k, v in times.items()}


def _autoencoder_programs(name, shape, batch):
  config = _config(name)
  ae = vqae.build_autoencoder(config.autoencoder)
  variables = _init(lambda k: vqae.init_variables(ae, k, shape), jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (batch, *shape), minval=-1, maxval=1)
  m = jnp.ones((batch, *shape[:2]))
  enc = jax.jit(lambda v, x, m: ae.apply(v, x, m, method=ae.encode))
  dec = jax.jit(lambda v, h, m: ae.apply(v, h, m, method=ae.decode))
  h = enc(variables, x, m)
  return ae, variables, {f"{name}_encode": lambda: enc(variables, x, m),
                         f"{name}_decode": lambda: dec(variables, h, m)}


def _step_program(config, image_shape, batch, codec=None, frozen=None):
  setup = train.Setup(config, devices=jax.devices()[:1], image_shape=image_shape)
  if codec is not None:
    # A latent model without a trained workdir: the codec of a randomly initialised
    # autoencoder (same cost); the UNet sees its latents.
    setup.codec = codec
  state = _init(setup.init_state, jax.random.key(0))
  x = jax.random.uniform(jax.random.key(2), (batch, *(codec.pixel_shape if codec else image_shape)),
                         minval=-1, maxval=1)
  step = jax.jit(functools.partial(train.train_step, setup=setup, root_key=jax.random.key(3)))
  args = (frozen,) if codec is not None else ()
  params = sum(a.size for a in jax.tree.leaves(state.params))
  return (lambda: step(state, {"image": x}, *args)[1]["loss"]), params


def main(argv):
  del argv
  b = FLAGS.batch
  ae, variables, programs = _autoencoder_programs("vqae_textures", (32, 32, 3), b)
  ae_times = _time(programs, FLAGS.repeats, FLAGS.calls)
  if FLAGS.paper:
    _, _, paper = _autoencoder_programs("vqae_imagenet256", (256, 256, 3), 4)
    ae_times.update({k: v for k, v in _time(paper, FLAGS.repeats, 1).items()})
  throughput = {k: (4 if "imagenet" in k else b) / v for k, v in ae_times.items()}

  codec = latent.LatentCodec(ae, variables["params"], scale=1.0, pixel_shape=(32, 32, 3))
  lat_cfg = _config("latent_textures")
  with lat_cfg.unlocked():
    lat_cfg.latent.autoencoder_workdir = ""
    lat_cfg.train.batch_size = b
  pix_cfg = _config("textures")
  with pix_cfg.unlocked():
    pix_cfg.train.batch_size = b
  latent_step, n_latent = _step_program(lat_cfg, codec.latent_shape, b, codec, codec.variables)
  same_unet_step, n_same = _step_program(lat_cfg, (32, 32, 3), b)
  pixel_step, n_pixel = _step_program(pix_cfg, (32, 32, 3), b)
  step_times = _time({"latent_unet_on_8x8x3_latents_with_encode": latent_step,
                      "same_unet_on_32x32x3_pixels": same_unet_step,
                      "textures_pixel_unet_on_32x32x3": pixel_step}, FLAGS.repeats, FLAGS.calls)
  lat = step_times["latent_unet_on_8x8x3_latents_with_encode"]
  result = {
      "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend(),
      "autoencoder_seconds_per_call": ae_times, "autoencoder_images_per_s": throughput,
      "train_step_seconds": step_times,
      "train_step_ratio_latent_over_same_unet_pixels":
          lat / step_times["same_unet_on_32x32x3_pixels"],
      "train_step_ratio_latent_over_textures_pixel_unet":
          lat / step_times["textures_pixel_unet_on_32x32x3"],
      "unet_parameters": {"latent": n_latent, "same_unet_pixels": n_same,
                          "textures_pixel_unet": n_pixel},
      "settings": {"batch": b, "repeats": FLAGS.repeats, "calls": FLAGS.calls,
                   "autoencoder_halo": ae.halo},
  }
  common.write_json(FLAGS.out, result)
  print(json.dumps(result, indent=2))


if __name__ == "__main__":
  common.run(main)
