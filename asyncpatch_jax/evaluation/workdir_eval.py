"""The scores of `--mode=evaluate`: generation and inpainting quality of a trained model.

The common case of the benchmarks (AsyncPatch Table 1 per model; experiments/
sampler_ablation.py calls `evaluate` for each of its workdirs):
  - generation: `num_samples` samples of the synchronous schedule (labels cycling over
    the classes of a conditional model, CFG weight `guidance`), against `num_reference`
    real images of `reference_split` (default the training split, the distribution
    the model learned, as FID's reference statistics are the training set's): Frechet
    distance and PRDC (Naeem et al. 2020) on each feature network, named for it
    (`fd_digits`, `fd_textures`, and `fid` only with Inception-v3 weights);
  - inpainting (AsyncPatch Eq. 4 by default, Sec. 5.3): for each mask family
    (data/masks.py), `num_inpaint` held-out (test split) images, PSNR/SSIM against the
    originals, Frechet distance and PRDC of the inpainted set against the originals, LPIPS
    with weights from a file; network evaluations and seconds per image.
The feature networks: the dataset's in-project network (feature_nets.IN_PROJECT,
trained here from the run's seed) and, with `inception_weights`, FID's Inception-v3.
Everything runs batch-sharded over a mesh when the caller gives one.

Keys (root = key(config.seed), the benchmark scripts' convention): feature network
fold_in(root, 1), samples fold_in(root, 2), mask family j fold_in(root, 10 + j).
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.data import datasets
from asyncpatch_jax.data import masks as masks_lib
from asyncpatch_jax.diffusion import repaint
from asyncpatch_jax.evaluation import feature_nets
from asyncpatch_jax.evaluation import inception
from asyncpatch_jax.evaluation import inpainting_eval
from asyncpatch_jax.evaluation import lpips

REFERENCE_SPLITS = ("train", "test")
NUM_EXAMPLES = 8           # images per family kept for a grid (masked input, output)


def check_settings(config, image_shape, latent: bool = False) -> None:
  """Every `config.evaluate` setting, checked before anything is loaded or compiled.

  config: the run's config (data, sample and evaluate sections). image_shape: the
  model's [H, W, C] (from the checkpoint; a latent model's: the decoded images'). latent:
  a latent diffusion model (inpainting by inpainting_eval.LATENT_METHODS only).
  """
  ec = config.evaluate
  h, w, _ = image_shape
  n = ec.num_samples
  try:
    too_few = int(n) != n or n < 2
  except (TypeError, ValueError):
    too_few = True
  if too_few or isinstance(n, bool):
    raise checks.InputError(f"evaluate.num_samples={n!r}; the Frechet distance (a covariance) "
                            "and PRDC need at least 2 samples (the benchmarks use 1000+).")
  checks.check_positive_int(ec.batch_size, "evaluate.batch_size")
  k = checks.check_positive_int(ec.k, "evaluate.k")
  if k >= n:
    raise checks.InputError(f"evaluate.k={k} nearest neighbours need more than k samples; "
                            f"evaluate.num_samples={n}. Raise num_samples or lower k.")
  checks.check_choice(ec.reference_split, REFERENCE_SPLITS, "evaluate.reference_split")
  if int(ec.num_reference) != ec.num_reference or ec.num_reference < 0:
    raise checks.InputError(f"evaluate.num_reference={ec.num_reference!r}; expected 0 "
                            "(= num_samples) or a positive number of real images.")
  if ec.num_reference and ec.num_reference <= k:
    raise checks.InputError(f"evaluate.num_reference={ec.num_reference} must exceed "
                            f"evaluate.k={k} (PRDC's neighbours).")
  checks.check_range(ec.guidance, "evaluate.guidance", 0.0)
  checks.check_positive_int(ec.feature_steps, "evaluate.feature_steps")
  if int(ec.num_inpaint) != ec.num_inpaint or ec.num_inpaint < 0 or 0 < ec.num_inpaint <= k:
    raise checks.InputError(f"evaluate.num_inpaint={ec.num_inpaint!r}; expected 0 (no "
                            f"inpainting) or more than evaluate.k={k} images per mask family.")
  if ec.num_inpaint:
    if not tuple(ec.mask_families):
      raise checks.InputError("evaluate.mask_families is empty; name at least one of "
                              f"{', '.join(masks_lib.FAMILIES)}, or set evaluate.num_inpaint=0.")
    for family in ec.mask_families:
      checks.check_choice(family, masks_lib.FAMILIES, "evaluate.mask_families entry")
      masks_lib.make_masks(family, 1, h, w)             # the family fits the image size
    checks.check_choice(ec.inpaint_method, inpainting_eval.METHODS, "evaluate.inpaint_method")
    if latent and ec.inpaint_method not in inpainting_eval.LATENT_METHODS:
      raise checks.InputError(f"evaluate.inpaint_method={ec.inpaint_method!r} needs a pixel "
                              "model; a latent diffusion model inpaints with one of "
                              f"{', '.join(inpainting_eval.LATENT_METHODS)}.")
    if ec.inpaint_method == "repaint":
      if len(tuple(ec.repaint)) != 3:
        raise checks.InputError(f"evaluate.repaint={tuple(ec.repaint)}; expected (num_steps, "
                                "jump_length, jump_n_sample), e.g. (250, 10, 10).")
      repaint.jump_schedule(*(int(v) for v in ec.repaint))   # positive, dividing
    checks.check_positive_int(config.sample.num_steps, "sample.num_steps")
  data = config.data
  held_out = datasets.get_dataset(data.dataset, "test", data_dir=data.data_dir or None,
                                  **dict(data.options))
  if tuple(held_out.image_shape) != tuple(image_shape):
    raise checks.InputError(f"the model makes {tuple(image_shape)} images but dataset "
                            f"{config.data.dataset!r} with data.options="
                            f"{dict(config.data.options)} has {tuple(held_out.image_shape)}; "
                            "evaluate with the run's own config (the workdir's config.json).")
  problem = feature_nets.in_project_problem(data.dataset, dict(data.options))
  if problem and not ec.inception_weights:
    raise checks.InputError(f"{problem}; give FID Inception-v3 weights: "
                            "--config.evaluate.inception_weights=<file.npz> "
                            "(tools/convert_weights.py).")


def load_weight_files(config):
  """(Inception features or None, LPIPS or None) from `evaluate.*_weights`.

  Read before anything is sampled: a file that does not fit its network stops here
  with the first missing or mis-shaped tensor named (weights_file.py).
  """
  ec = config.evaluate
  return (inception.load(ec.inception_weights) if ec.inception_weights else None,
          lpips.load(ec.lpips_weights) if ec.lpips_weights else None)


def feature_extractors(config, key: jax.Array, inception_features=None, bar=None):
  """([extractors], {name: what it is}): the dataset's in-project network (where one fits
  it), trained from `key` on its train split, and Inception-v3 when given."""
  extractors, info = [], {}
  dataset = config.data.dataset
  options = dict(config.data.options)
  if feature_nets.in_project_problem(dataset, options) is None:
    logging.info("evaluate: training the in-project %s feature network (%d steps) ...",
                 dataset, config.evaluate.feature_steps)
    extractor, accuracy = feature_nets.in_project(dataset, key, config.evaluate.feature_steps,
                                                  options)
    classes = datasets.get_dataset(dataset, "test", **options).num_classes
    extractors.append(extractor)
    info[extractor.name] = {
        "network": f"in-project {extractor.name} classifier (penultimate layer, "
                   f"{extractor.dim}-d), trained here",
        "training_steps": int(config.evaluate.feature_steps),
        "held_out_accuracy": accuracy, "chance": 1.0 / classes}
    if bar is not None:
      bar.update(1)
  if inception_features is not None:
    extractors.append(inception_features)
    info[inception_features.name] = {"network": "FID Inception-v3 (pool3, 2048-d)",
                                     "weights": str(config.evaluate.inception_weights)}
  return extractors, info


def num_updates(config, mesh_size: int = 1) -> int:
  """How many times `evaluate` (with feature_extractors first) advances its progress bar."""
  ec = config.evaluate
  batches = lambda n: -(-n // _batch(ec.batch_size, n, mesh_size))
  in_project = feature_nets.in_project_problem(config.data.dataset, dict(config.data.options))
  n = int(in_project is None) + batches(ec.num_samples)
  if ec.num_inpaint:
    n += len(tuple(ec.mask_families)) * batches(ec.num_inpaint)
  return n


def _batch(batch_size: int, n: int, mesh_size: int) -> int:
  """The batch for n images: as few batches as `batch_size` allows, of equal size (so the
  padding of the last one is small), rounded up to a multiple of the mesh's devices."""
  num_batches = -(-n // min(batch_size, n))
  per_batch = -(-n // num_batches)
  return -(-per_batch // mesh_size) * mesh_size


def _extract_all(extractors, images, batch, mesh) -> dict[str, np.ndarray]:
  return {ex.name: feature_nets.extract(ex, images, batch, mesh) for ex in extractors}


def evaluate(generator, params, config, *, image_shape, key: jax.Array, extractors,
             lpips_fn=None, mesh: jax.sharding.Mesh | None = None, bar=None,
             mask_seed: int | None = None):
  """Generation and inpainting scores of a model; (result dict, example images).

  generator: a generate.Generator of the model (the caller's; built with `mesh`),
  params: its (EMA) parameters. config: the run's config, settings in config.evaluate
  (checked by `check_settings`), sampler settings in config.sample. image_shape: the
  model's [H, W, C]. key: the root key (module docstring). extractors: from
  `feature_extractors`. lpips_fn: from `load_weight_files`, or None. mesh: the sampler
  batches, feature extraction and PRDC are split over its devices. bar: a progress bar.
  mask_seed: the masks' seed (data/masks.py; default config.seed). A latent diffusion
  model's generator (one with a codec) samples and inpaints on tokens; every score is
  taken on the decoded pixels, image_shape [H, W, C].
  Returns ({'generation': {...}, 'inpainting': {...}}, {family: (masked inputs,
  outputs)} of the first NUM_EXAMPLES images).
  """
  ec, sc, data = config.evaluate, config.sample, config.data
  shards = 1 if mesh is None else mesh.size
  options = dict(data.options)
  image_shape = tuple(image_shape)
  t0 = time.perf_counter()
  # One line per phase, also with the progress bars off (train.progress_bar=false).
  logging.info("evaluate: generating %d samples (%d steps) ...", ec.num_samples, sc.num_steps)
  samples = inpainting_eval.sample(
      generator, params, int(ec.num_samples), image_shape, num_steps=sc.num_steps, eta=sc.eta,
      key=jax.random.fold_in(key, 2), batch=_batch(ec.batch_size, ec.num_samples, shards),
      guidance_weight=float(ec.guidance), bar=bar, multiple_of=shards)
  sample_seconds = time.perf_counter() - t0
  num_ref = int(ec.num_reference) or int(ec.num_samples)
  reference = inpainting_eval.dataset_images(data.dataset, ec.reference_split, num_ref,
                                             data_dir=data.data_dir, options=options)
  generation = {"num_samples": int(ec.num_samples), "reference_split": ec.reference_split,
                "num_reference": len(reference), "guidance": float(ec.guidance),
                "num_steps": int(sc.num_steps), "eta": float(sc.eta),
                "sampling_seconds": sample_seconds}
  batch = int(ec.batch_size)                 # feature networks (extract pads to the mesh)
  logging.info("evaluate: sampled in %.1f s; scoring them against %d %s images ...",
               sample_seconds, len(reference), ec.reference_split)
  for ex in extractors:
    generation.update(feature_nets.feature_metrics(ex, reference, samples, k=int(ec.k),
                                                   batch_size=batch, mesh=mesh))
  result = {"generation": generation}
  examples = {"samples": samples[:NUM_EXAMPLES]}
  if not ec.num_inpaint:
    return result, examples

  originals = inpainting_eval.dataset_images(data.dataset, "test", int(ec.num_inpaint),
                                             data_dir=data.data_dir, options=options)
  fn, nfe = inpainting_eval.method(
      ec.inpaint_method, generator, params, num_steps=sc.num_steps, eta=sc.eta,
      input_guidance=float(ec.input_guidance), num_stripes=sc.num_stripes,
      repaint_params=tuple(int(v) for v in ec.repaint))
  real_features = _extract_all(extractors, originals, batch, mesh)
  h, w, _ = image_shape
  mask_seed = int(config.seed if mask_seed is None else mask_seed)
  families = {}
  for j, family in enumerate(ec.mask_families):
    logging.info("evaluate: inpainting %d test images, mask family %r (%s) ...", len(originals),
                 family, ec.inpaint_method)
    m = masks_lib.make_masks(family, len(originals), h, w, seed=mask_seed)
    out, cost = inpainting_eval.run_inpainting(fn, originals, m, jax.random.fold_in(key, 10 + j),
                                               _batch(ec.batch_size, len(originals), shards),
                                               bar=bar, multiple_of=shards)
    q = inpainting_eval.quality(out, originals, extractors, lpips_fn=lpips_fn, batch=batch,
                                k=int(ec.k), mesh=mesh, real_features=real_features)
    families[family] = {**q, "hole_fraction": float(1.0 - m.mean()), **cost}
    examples[family] = (np.where(m[:NUM_EXAMPLES, :, :, None] > 0, originals[:NUM_EXAMPLES], -1.0),
                        out[:NUM_EXAMPLES])
  result["inpainting"] = {"method": ec.inpaint_method, "network_evals": nfe,
                          "num_images": len(originals), "split": "test",
                          "mask_seed": mask_seed, "families": families}
  if ec.inpaint_method == "repaint":
    result["inpainting"]["repaint"] = [int(v) for v in ec.repaint]
  if ec.inpaint_method == "asyncpatch_input_guidance":
    result["inpainting"]["input_guidance"] = float(ec.input_guidance)
  return result, examples
