"""Feature extractors for the distribution metrics, and the metrics named after them.

An extractor is a callable `images [B, H, W, C] in [-1, 1] -> features [B, D]` with a
`name`. The offline default is `DigitFeatures`: the penultimate 128-d layer of the
in-project digit classifier (digit_classifier.py), trained on the embedded digits;
its Frechet distance is reported as `fd_digits`, never as FID. With Inception-v3
weights from a file (`inception.load`), the same code gives `fid` (FID is only ever
the Frechet distance of those features).
"""

from __future__ import annotations

import jax
import numpy as np

from asyncpatch_jax import checks
from asyncpatch_jax.evaluation import digit_classifier
from asyncpatch_jax.evaluation import metrics


class DigitFeatures:
  """features = DigitFeatures(params)(images [B, 16, 16, 1] in [-1, 1]) -> [B, 128]."""
  name = "digits"
  dim = 128

  def __init__(self, params):
    self.params = params

  @classmethod
  def train(cls, key: jax.Array, num_steps: int = 600) -> tuple["DigitFeatures", float]:
    """Trains the digit classifier on the digits train split; (extractor, held-out accuracy)."""
    params, accuracy = digit_classifier.train_classifier(key, num_steps)
    return cls(params), accuracy

  def __call__(self, images) -> jax.Array:
    checks.check_image(images, "images")
    if tuple(np.shape(images)[1:]) != (16, 16, 1):
      raise checks.InputError(f"images have shape {tuple(np.shape(images))}; the digit features "
                              "take the digits dataset's [B, 16, 16, 1].")
    return digit_classifier.features(self.params, np.asarray(images, np.float32))


def metric_names(extractor_name: str) -> dict[str, str]:
  """{'frechet': 'fid' | 'fd_<name>', 'precision': 'precision_<name>', ...}."""
  frechet = "fid" if extractor_name == "inception" else f"fd_{extractor_name}"
  out = {"frechet": frechet}
  out.update({m: f"{m}_{extractor_name}" for m in ("precision", "recall", "density", "coverage")})
  return out


def extract(extractor, images, batch_size: int = 256) -> np.ndarray:
  """Features [N, D] of images [N, H, W, C], `batch_size` at a time.

  A ragged last batch is padded to the batch size (and the padding dropped), so the
  extractor compiles once.
  """
  images = np.asarray(images)
  batch_size = min(batch_size, len(images))
  out = []
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(extractor(chunk))[:n])
  return np.concatenate(out)


def feature_metrics(extractor, real_images, fake_images, *, k: int = 5,
                    batch_size: int = 256) -> dict[str, float]:
  """Frechet distance (streaming float64 statistics) and PRDC of two image sets, named by extractor.

  Returns e.g. {'fd_digits', 'precision_digits', 'recall_digits', 'density_digits',
  'coverage_digits'} for DigitFeatures ('fid', 'precision_inception', ... for Inception).
  """
  names = metric_names(extractor.name)
  real, fake = extract(extractor, real_images, batch_size), extract(extractor, fake_images, batch_size)
  mu_r, cov_r = metrics.FeatureStats().update(real).mean_cov()
  mu_f, cov_f = metrics.FeatureStats().update(fake).mean_cov()
  out = {names["frechet"]: metrics.frechet_distance(mu_r, cov_r, mu_f, cov_f)}
  out.update({names[m]: v for m, v in metrics.prdc(real, fake, k=k).items()})
  return out
