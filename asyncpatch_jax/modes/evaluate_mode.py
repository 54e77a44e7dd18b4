"""`--mode=evaluate`: score a trained workdir's model and write `<workdir>/evaluate.json`.

  python -m asyncpatch_jax.main --mode=evaluate --workdir=DIR [--config.evaluate.KEY=VALUE ...]

Needs only the workdir (a local folder or a gs:// URL; the command line's default
config is the workdir's own config.json). Loads the latest checkpoint's EMA parameters
(runs/loader.py, as --mode=sample), then scores generation and inpainting
quality with the evaluators of `config.evaluate.evaluators` (evaluation/evaluators/;
by default `generation`: Frechet distance and PRDC on the dataset's in-project feature
network, `fd_digits` / `fd_textures`, FID with Inception-v3 weights; and `inpainting`:
PSNR/SSIM and LPIPS per mask family on the held-out split; a latent diffusion workdir on
its decoded pixels). With several devices the
sampler batches, feature extraction and PRDC are split over a mesh of all of them
(training/sharding.sampling_mesh). Every setting is checked, and the weight files read,
before the checkpoint is restored or anything compiles.
"""

from __future__ import annotations

import json
import time

import jax
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.generation import generate
from asyncpatch_jax.data import image_io
from asyncpatch_jax.runtime import storage
from asyncpatch_jax.evaluation.evaluators import base as evaluators_base
from asyncpatch_jax.evaluation.evaluators import common as evaluators
from asyncpatch_jax.runtime import multihost
from asyncpatch_jax.runtime import progress as progress_lib
from asyncpatch_jax.runtime import sharding
from asyncpatch_jax.runs import loader


def _summary(result: dict, path: str) -> dict:
  """The headline numbers: generation metrics, and PSNR / SSIM / Frechet distances per family."""
  gen = result.get("generation", {})
  keep = lambda d: {k: v for k, v in d.items() if k.startswith(("fd_", "fid", "precision_",
                                                                "recall_", "psnr", "ssim",
                                                                "lpips"))}
  out = {"evaluate_json": path, "step": result["step"], "generation": keep(gen)}
  if "inpainting" in result:
    out["inpainting"] = {f: {k: v for k, v in keep(q).items() if not k.startswith(
        ("precision_", "recall_"))} for f, q in result["inpainting"]["families"].items()}
  return out


def evaluate_workdir(config, workdir) -> dict:
  """Scores the workdir's latest checkpoint (config.evaluate); writes evaluate.json; a summary."""
  if "autoencoder" in config:
    raise checks.InputError("an autoencoder workdir generates nothing to evaluate; its "
                            "reconstruction metrics are in its eval.json. Evaluate the latent "
                            "diffusion workdir that names it instead.")
  t0 = time.perf_counter()
  workdir = storage.check_bucket(workdir, "workdir")
  loader.saved_image_shape(workdir)                    # InputError: no checkpoint
  setup = loader.open_run(workdir, config)
  codec = setup.codec              # a latent workdir: tokens, scored decoded (pixel_shape)
  chosen = evaluators.from_config(config, config.evaluate.evaluators, setup.pixel_shape,
                                  latent=codec is not None)
  out_path = (storage.check_bucket(config.evaluate.out, "evaluate.out") if config.evaluate.out
              else workdir / "evaluate.json")
  storage.check_writable(out_path.parent, "evaluate.out's folder")
  inception_features, lpips_fn = evaluators_base.load_weight_files(config)
  setup = loader.load_run(workdir, config, run=setup)
  mesh = sharding.sampling_mesh()                      # None on one device
  generator = generate.Generator(setup.model, codec=codec, mesh=mesh,
                                 clean_cache=config.sample.get("clean_cache", False))
  shards = 1 if mesh is None else mesh.size
  with progress_lib.bar(evaluators.num_updates(chosen, config, shards), "evaluate",
                        enabled=bool(config.train.progress_bar), unit="call") as bar:
    ctx = evaluators_base.Context(generator, setup.params, config,
                                  image_shape=setup.pixel_shape,
                                  key=jax.random.key(config.seed), mesh=mesh, bar=bar,
                                  inception_features=inception_features, lpips_fn=lpips_fn)
    scores, examples = evaluators.run(chosen, ctx)
  result = {"workdir": str(workdir), "step": setup.step,
            "dataset": config.data.dataset, "image_shape": list(setup.pixel_shape),
            "devices": jax.device_count(), "mesh": None if mesh is None else dict(mesh.shape),
            **scores, "seconds": time.perf_counter() - t0}
  if codec is not None:
    result["latent"] = {"autoencoder_workdir": str(config.latent.autoencoder_workdir),
                        "latent_shape": list(codec.latent_shape), "scale": float(codec.scale)}
  if lpips_fn is not None:
    result["lpips"] = {"network": f"LPIPS-{lpips_fn.net}",
                       "weights": str(config.evaluate.lpips_weights)}
  # The grid's rows: samples, then per mask family the masked inputs and their inpaintings.
  rows = [examples["samples"]] if "samples" in examples else []
  rows += [x for f in config.evaluate.mask_families if f in examples for x in examples[f]]
  grid_path = out_path.parent / (out_path.stem + ".png")
  if rows:
    result["grid"] = str(grid_path)
  if multihost.is_writer():
    # The grid and the JSON that names it are replaced together (the JSON last).
    with storage.replaced_files(out_path.parent, "evaluate.out's folder") as folder:
      if rows:
        image_io.write_grid(_stack(rows), folder.file(grid_path.name),
                            ncols=evaluators_base.NUM_EXAMPLES)
      storage.write_text_atomic(folder.file(out_path.name), json.dumps(result, indent=2))
  return _summary(result, str(out_path))


def _stack(rows):
  """Rows of up to NUM_EXAMPLES images, each padded with blank (-1) images to a full row."""
  n = evaluators_base.NUM_EXAMPLES
  return np.concatenate([np.concatenate([r, np.full((n - len(r), *r.shape[1:]), -1.0, r.dtype)])
                         for r in rows])
