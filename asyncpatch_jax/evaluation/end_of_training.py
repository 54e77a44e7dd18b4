"""End-of-training evaluation written to `workdir/eval.json`.

For the digits model: the in-project classifier (classifier.py, never called a
pretrained metric) scores unconditional samples (share with max class probability
>= 0.9) and class-conditional samples with guidance (share classified as their label).
"""

from __future__ import annotations

import jax
import numpy as np

from asyncpatch_jax.evaluation import digit_classifier as classifier
from asyncpatch_jax.diffusion import schedules


def num_updates(sample_config, eval_config) -> int:
  """How many times `evaluate_digits` advances its progress bar (the caller's bar total)."""
  return 1 + 2 * -(-eval_config.num_samples // sample_config.batch_size)


def evaluate_digits(generator, params, sample_config, eval_config, image_shape, key,
                    bar=None) -> dict:
  """unconditional_confident_fraction, conditional_label_accuracy and the classifier's accuracy.

  bar: an optional progress bar (anything with `update(n)`), advanced `num_updates` times:
  once for the classifier's training, then once per sample batch.
  """
  update = bar.update if bar is not None else lambda n: None
  k_cls, k_unc, k_con = jax.random.split(key, 3)
  cls_params, held_out = classifier.train_classifier(k_cls, eval_config.classifier_steps)
  update(1)
  n, bs = eval_config.num_samples, sample_config.batch_size
  h, w, c = image_shape
  tau = schedules.synchronous(sample_config.num_steps, h, w)
  confident, correct = [], []
  for i in range(0, n, bs):
    b = min(bs, n - i)
    unc = generator(params, tau, key=jax.random.fold_in(k_unc, i), shape=(b, h, w, c),
                    eta=sample_config.eta)
    confident.append(np.max(np.asarray(classifier.classify(cls_params, unc)), -1) >= 0.9)
    update(1)
    labels = (np.arange(i, i + b) % 10).astype(np.int32)
    con = generator(params, tau, key=jax.random.fold_in(k_con, i), shape=(b, h, w, c),
                    labels=labels, guidance_weight=sample_config.guidance, eta=sample_config.eta)
    correct.append(np.argmax(np.asarray(classifier.classify(cls_params, con)), -1) == labels)
    update(1)
  return {
      "unconditional_confident_fraction": float(np.mean(np.concatenate(confident))),
      "conditional_label_accuracy": float(np.mean(np.concatenate(correct))),
      "classifier_held_out_accuracy": held_out,
      "num_samples": n,
      "sampler_steps": sample_config.num_steps,
      "eta": sample_config.eta,
      "guidance": sample_config.guidance,
  }
