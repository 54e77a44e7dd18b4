"""`digit_classifier`: a digits model's samples scored by the in-project digit classifier.

The classifier (evaluation/digit_classifier.py, trained here for `evaluate.classifier_steps`
steps from the key fold_in(root, 2^30 + 2); never called a pretrained metric) scores
`evaluate.classifier_samples` unconditional samples (the share with max class probability
>= 0.9) and as many class-conditional samples with CFG weight sample.guidance (the share
classified as their label), in batches of sample.batch_size with sample.num_steps steps.
Training runs it at its end by default (eval.json); 0 samples scores nothing.
"""

from __future__ import annotations

import jax
import numpy as np

from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.evaluation import digit_classifier as classifier
from asyncpatch_jax.evaluation.evaluators import base
from asyncpatch_jax.runtime import checks

CONFIDENT = 0.9


class DigitClassifier(base.Evaluator):
  """unconditional_confident_fraction, conditional_label_accuracy, the classifier's accuracy."""

  name = "digit_classifier"

  def __init__(self, config, image_shape, latent: bool = False):
    super().__init__(config, image_shape, latent)
    ec = config.evaluate
    n = ec.classifier_samples
    if isinstance(n, bool) or int(n) != n or n < 0:
      raise checks.InputError(f"evaluate.classifier_samples={n!r}; expected 0 (none) or a "
                              "positive number of samples.")
    if n and config.data.dataset != "digits":
      raise checks.InputError(
          f"evaluate.at_end names 'digit_classifier', which scores digits, but data.dataset="
          f"{config.data.dataset!r}; set --config.evaluate.classifier_samples=0 or take it out "
          "of --config.evaluate.at_end.")
    checks.check_positive_int(ec.classifier_steps, "evaluate.classifier_steps")
    checks.check_positive_int(config.sample.batch_size, "sample.batch_size")

  def num_updates(self, shards: int) -> int:
    del shards
    n = int(self.config.evaluate.classifier_samples)
    return 1 + 2 * -(-n // self.config.sample.batch_size) if n else 0

  def run(self, ctx: base.Context):
    ec, sc = self.config.evaluate, self.config.sample
    n, bs = int(ec.classifier_samples), int(sc.batch_size)
    if not n:
      return {}, {}
    k_cls, k_unc, k_con = jax.random.split(jax.random.fold_in(ctx.key, 2 ** 30 + 2), 3)
    cls_params, held_out = classifier.train_classifier(k_cls, ec.classifier_steps)
    ctx.update(1)
    gen = ctx.generator
    h, w, _ = ctx.image_shape
    task = gen.task(schedules.synchronous(sc.num_steps, h, w), image_shape=ctx.image_shape)
    confident, correct = [], []
    for i in range(0, n, bs):
      b = min(bs, n - i)
      unc = gen.generate(ctx.params, task, key=jax.random.fold_in(k_unc, i), num=b, eta=sc.eta)
      probs = np.asarray(classifier.classify(cls_params, unc))
      confident.append(np.max(probs, -1) >= CONFIDENT)
      ctx.update(1)
      labels = (np.arange(i, i + b) % 10).astype(np.int32)
      con = gen.generate(ctx.params, task, key=jax.random.fold_in(k_con, i), num=b,
                         labels=labels, guidance_weight=sc.guidance, eta=sc.eta)
      correct.append(np.argmax(np.asarray(classifier.classify(cls_params, con)), -1) == labels)
      ctx.update(1)
    return {
        "unconditional_confident_fraction": float(np.mean(np.concatenate(confident))),
        "conditional_label_accuracy": float(np.mean(np.concatenate(correct))),
        "classifier_held_out_accuracy": held_out,
        "num_samples": n,
        "sampler_steps": sc.num_steps,
        "eta": sc.eta,
        "guidance": sc.guidance,
    }, {}
