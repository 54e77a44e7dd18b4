"""`generation`: sample quality, the common case of the benchmarks (AsyncPatch Table 1).

`evaluate.num_samples` samples of the synchronous schedule (labels cycling over the
classes of a conditional model, CFG weight `evaluate.guidance`; sampler settings from
config.sample) against `evaluate.num_reference` real images of `evaluate.reference_split`
(default the training split, the distribution the model learned, as FID's reference
statistics are the training set's): Frechet distance and PRDC (Naeem et al. 2020) on each
feature network, named for it (`fd_digits`, `fd_textures`, and `fid` only with
Inception-v3 weights), each Frechet distance with its 95% bootstrap interval over the
samples (`evaluate.interval_resamples`). Scores: {'generation': {...}}; examples: {'samples': [8 images]}.
"""

from __future__ import annotations

import time

import jax
from absl import logging

from asyncpatch_jax.evaluation import feature_nets
from asyncpatch_jax.evaluation import inpainting_eval
from asyncpatch_jax.evaluation.evaluators import base
from asyncpatch_jax.runtime import checks

REFERENCE_SPLITS = ("train", "test")


class Generation(base.Evaluator):
  """Frechet distance and PRDC of synchronous samples against real images."""

  name = "generation"
  uses_feature_nets = True

  def __init__(self, config, image_shape, latent: bool = False):
    super().__init__(config, image_shape, latent)
    ec = config.evaluate
    n = ec.num_samples
    try:
      too_few = int(n) != n or n < 2
    except (TypeError, ValueError):
      too_few = True
    if too_few or isinstance(n, bool):
      raise checks.InputError(f"evaluate.num_samples={n!r}; the Frechet distance (a "
                              "covariance) and PRDC need at least 2 samples (the benchmarks "
                              "use 1000+).")
    checks.check_positive_int(ec.batch_size, "evaluate.batch_size")
    k = base.check_k(config, n, "evaluate.num_samples")
    checks.check_choice(ec.reference_split, REFERENCE_SPLITS, "evaluate.reference_split")
    if int(ec.num_reference) != ec.num_reference or ec.num_reference < 0:
      raise checks.InputError(f"evaluate.num_reference={ec.num_reference!r}; expected 0 "
                              "(= num_samples) or a positive number of real images.")
    if ec.num_reference and ec.num_reference <= k:
      raise checks.InputError(f"evaluate.num_reference={ec.num_reference} must exceed "
                              f"evaluate.k={k} (PRDC's neighbours).")
    checks.check_range(ec.guidance, "evaluate.guidance", 0.0)

  def num_updates(self, shards: int) -> int:
    ec = self.config.evaluate
    n = int(ec.num_samples)
    return -(-n // base.batch_size(ec.batch_size, n, shards))

  def run(self, ctx: base.Context):
    ec, sc, data = self.config.evaluate, self.config.sample, self.config.data
    extractors, _ = ctx.feature_nets
    t0 = time.perf_counter()
    # One line per phase, also with the progress bars off (train.progress_bar=false).
    logging.info("evaluate: generating %d samples (%d steps) ...", ec.num_samples, sc.num_steps)
    samples = inpainting_eval.sample(
        ctx.generator, ctx.params, int(ec.num_samples), ctx.image_shape,
        num_steps=sc.num_steps, eta=sc.eta, key=jax.random.fold_in(ctx.key, 2),
        batch=base.batch_size(ec.batch_size, ec.num_samples, ctx.shards),
        guidance_weight=float(ec.guidance), bar=ctx.bar, multiple_of=ctx.shards)
    sample_seconds = time.perf_counter() - t0
    num_ref = int(ec.num_reference) or int(ec.num_samples)
    reference = inpainting_eval.dataset_images(data.dataset, ec.reference_split, num_ref,
                                               data_dir=data.data_dir,
                                               options=dict(data.options))
    scores = {"num_samples": int(ec.num_samples), "reference_split": ec.reference_split,
              "num_reference": len(reference), "guidance": float(ec.guidance),
              "num_steps": int(sc.num_steps), "eta": float(sc.eta),
              "sampling_seconds": sample_seconds}
    logging.info("evaluate: sampled in %.1f s; scoring them against %d %s images ...",
                 sample_seconds, len(reference), ec.reference_split)
    for ex in extractors:        # feature networks (extract pads to the mesh)
      scores.update(feature_nets.feature_metrics(
          ex, reference, samples, k=int(ec.k), batch_size=int(ec.batch_size), mesh=ctx.mesh,
          interval_resamples=int(ec.interval_resamples)))
    return {"generation": scores}, {"samples": samples[:base.NUM_EXAMPLES]}
