"""`inpainting`: inpainting quality per mask family (AsyncPatch Eq. 4 by default, Sec. 5.3).

For each mask family (data/masks.py), `evaluate.num_inpaint` held-out (test split) images
inpainted by `evaluate.inpaint_method` (inpainting_eval.METHODS; a latent model's by
LATENT_METHODS): PSNR/SSIM against the originals, Frechet distance and PRDC of the
inpainted set against the originals, LPIPS with weights from a file; 95% bootstrap
intervals of PSNR, SSIM and the Frechet distances (`evaluate.interval_resamples`); network
evaluations and seconds per image. evaluate.num_inpaint=0 scores nothing. Scores: {'inpainting': {...}}; examples:
{family: (masked inputs, outputs)} of the first 8 images.
"""

from __future__ import annotations

import jax
import numpy as np
from absl import logging

from asyncpatch_jax.data import masks as masks_lib
from asyncpatch_jax.diffusion import repaint
from asyncpatch_jax.evaluation import inpainting_eval
from asyncpatch_jax.evaluation.evaluators import base
from asyncpatch_jax.runtime import checks


class Inpainting(base.Evaluator):
  """PSNR/SSIM, Frechet distance, PRDC and LPIPS of inpaintings, per mask family."""

  name = "inpainting"
  uses_feature_nets = True

  def __init__(self, config, image_shape, latent: bool = False):
    super().__init__(config, image_shape, latent)
    ec = config.evaluate
    h, w, _ = self.image_shape
    n = ec.num_inpaint
    k = checks.check_positive_int(ec.k, "evaluate.k")
    if int(n) != n or n < 0 or 0 < n <= k:
      raise checks.InputError(f"evaluate.num_inpaint={n!r}; expected 0 (no inpainting) or "
                              f"more than evaluate.k={k} images per mask family.")
    checks.check_positive_int(ec.batch_size, "evaluate.batch_size")
    if not n:
      self.uses_feature_nets = False          # scores nothing: no feature network needed
      return
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

  def num_updates(self, shards: int) -> int:
    ec = self.config.evaluate
    n = int(ec.num_inpaint)
    return len(tuple(ec.mask_families)) * -(-n // base.batch_size(ec.batch_size, n, shards))

  def run(self, ctx: base.Context):
    ec, sc, data = self.config.evaluate, self.config.sample, self.config.data
    if not ec.num_inpaint:
      return {}, {}
    extractors, _ = ctx.feature_nets
    batch = int(ec.batch_size)
    originals = inpainting_eval.dataset_images(data.dataset, "test", int(ec.num_inpaint),
                                               data_dir=data.data_dir,
                                               options=dict(data.options))
    fn, nfe = inpainting_eval.method(
        ec.inpaint_method, ctx.generator, ctx.params, num_steps=sc.num_steps, eta=sc.eta,
        input_guidance=float(ec.input_guidance), num_stripes=sc.num_stripes,
        repaint_params=tuple(int(v) for v in ec.repaint))
    real_features = base.extract_all(extractors, originals, batch, ctx.mesh)
    h, w, _ = ctx.image_shape
    families, examples = {}, {}
    k = base.NUM_EXAMPLES
    for j, family in enumerate(ec.mask_families):
      logging.info("evaluate: inpainting %d test images, mask family %r (%s) ...",
                   len(originals), family, ec.inpaint_method)
      m = masks_lib.make_masks(family, len(originals), h, w, seed=ctx.mask_seed)
      out, cost = inpainting_eval.run_inpainting(
          fn, originals, m, jax.random.fold_in(ctx.key, 10 + j),
          base.batch_size(ec.batch_size, len(originals), ctx.shards), bar=ctx.bar,
          multiple_of=ctx.shards)
      q = inpainting_eval.quality(out, originals, extractors, lpips_fn=ctx.lpips_fn,
                                  batch=batch, k=int(ec.k), mesh=ctx.mesh,
                                  real_features=real_features,
                                  interval_resamples=int(ec.interval_resamples))
      families[family] = {**q, "hole_fraction": float(1.0 - m.mean()), **cost}
      examples[family] = (np.where(m[:k, :, :, None] > 0, originals[:k], -1.0), out[:k])
    result = {"method": ec.inpaint_method, "network_evals": nfe,
              "num_images": len(originals), "split": "test",
              "mask_seed": ctx.mask_seed, "families": families}
    if ec.inpaint_method == "repaint":
      result["repaint"] = [int(v) for v in ec.repaint]
    if ec.inpaint_method == "asyncpatch_input_guidance":
      result["input_guidance"] = float(ec.input_guidance)
    return {"inpainting": result}, examples
