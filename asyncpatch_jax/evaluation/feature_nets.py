"""Feature extractors for the distribution metrics, and the metrics named after them.

An extractor is a callable `images [B, H, W, C] in [-1, 1] -> features [B, D]` with a
`name`. The offline defaults are the in-project networks of the embedded datasets
(`IN_PROJECT`, trained on the dataset's train split in seconds):
  - `DigitFeatures`: the penultimate 128-d layer of the digit classifier
    (digit_classifier.py); metrics `fd_digits`, `precision_digits`, ...;
  - `TextureFeatures`: the penultimate 128-d layer of a small CNN trained to tell which
    source image a textures crop comes from (texture_features.py); `fd_textures`, ...
Their Frechet distances are never called FID. With Inception-v3 weights from a file
(`inception.load`), the same code gives `fid` (FID is only ever the Frechet distance of
those features).

Feature extraction and PRDC take an optional `jax.sharding.Mesh` (built by the caller,
runtime/sharding.py): the batch is split over all of the mesh's devices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.evaluation import digit_classifier
from asyncpatch_jax.evaluation import metrics
from asyncpatch_jax.evaluation import statistics
from asyncpatch_jax.evaluation import texture_features
from asyncpatch_jax.runtime import multihost


class DigitFeatures:
  """features = DigitFeatures(params)(images [B, 16, 16, 1] in [-1, 1]) -> [B, 128]."""
  name = "digits"
  dim = 128

  def __init__(self, params):
    self.params = params

  @classmethod
  def train(cls, key: jax.Array, num_steps: int = 600,
            options: dict | None = None) -> tuple["DigitFeatures", float]:
    """Trains the digit classifier on the digits train split; (extractor, held-out accuracy).

    options: the digits dataset options of the scored model; the classifier takes the
    default 16 x 16 digits only.
    """
    problem = in_project_problem("digits", options)
    if problem:
      raise checks.InputError(f"{problem}.{_INCEPTION_HINT}")
    params, accuracy = digit_classifier.train_classifier(key, num_steps)
    return cls(params), accuracy

  def __call__(self, images) -> jax.Array:
    checks.check_image(images, "images")
    if tuple(np.shape(images)[1:]) != (16, 16, 1):
      raise checks.InputError(f"images have shape {tuple(np.shape(images))}; the digit features "
                              "take the digits dataset's [B, 16, 16, 1].")
    # jnp (not np): a batch sharded over a mesh stays sharded.
    return digit_classifier.features(self.params, jnp.asarray(images, jnp.float32))


class TextureFeatures:
  """features = TextureFeatures(params, shape)(crops [B, S, S, 3] in [-1, 1]) -> [B, 128].

  The penultimate layer of the in-project textures network (texture_features.py:
  a small CNN trained to tell which source image a crop comes from).
  """
  name = "textures"
  dim = texture_features.FEATURE_DIM

  def __init__(self, params, image_shape: tuple[int, int, int]):
    self.params, self.image_shape = params, tuple(image_shape)

  @classmethod
  def train(cls, key: jax.Array, num_steps: int = 600,
            options: dict | None = None) -> tuple["TextureFeatures", float]:
    """Trains on the textures train split with the model's data.options (image_size,
    images, ...); (extractor, held-out accuracy on the test split, chance 1 / #images)."""
    params, shape, accuracy = texture_features.train_classifier(key, num_steps, options=options)
    return cls(params, shape), accuracy

  def __call__(self, images) -> jax.Array:
    checks.check_image(images, "images")
    if tuple(np.shape(images)[1:]) != self.image_shape:
      raise checks.InputError(f"images have shape {tuple(np.shape(images))}; these texture "
                              f"features were trained on crops of {self.image_shape}.")
    return texture_features.features(self.params, jnp.asarray(images, jnp.float32))


# dataset name -> its in-project feature network (the offline default of the metrics).
IN_PROJECT = {"digits": DigitFeatures, "textures": TextureFeatures}
_INCEPTION_HINT = (" Score it with FID Inception-v3 features from a weights file "
                   "(--config.evaluate.inception_weights=<file.npz>, made by "
                   "tools/convert_weights.py).")


def in_project_problem(dataset: str, options: dict | None = None) -> str | None:
  """Why no in-project feature network can score this dataset (None: one can)."""
  if dataset not in IN_PROJECT:
    return (f"dataset {dataset!r} has no in-project feature network (only "
            f"{', '.join(sorted(IN_PROJECT))} do)")
  if dataset == "digits" and dict(options or {}).get("image_size", 16) != 16:
    return (f"the in-project digit features take the 16x16 digits; data.options="
            f"{dict(options)} change the size")
  return None


def in_project(dataset: str, key: jax.Array, num_steps: int = 600, options: dict | None = None):
  """(the in-project feature extractor of an embedded dataset, its held-out accuracy).

  Trained from `key` on the dataset's train split with the run's data options (seconds
  on a CPU); InputError where `in_project_problem` names a reason.
  """
  problem = in_project_problem(dataset, options)
  if problem:
    raise checks.InputError(f"{problem}.{_INCEPTION_HINT}")
  checks.check_positive_int(num_steps, "feature network training steps")
  return IN_PROJECT[dataset].train(key, num_steps, options=options)


def metric_names(extractor_name: str) -> dict[str, str]:
  """{'frechet': 'fid' | 'fd_<name>', 'precision': 'precision_<name>', ...}."""
  frechet = "fid" if extractor_name == "inception" else f"fd_{extractor_name}"
  out = {"frechet": frechet}
  out.update({m: f"{m}_{extractor_name}" for m in ("precision", "recall", "density", "coverage")})
  return out


def extract(extractor, images, batch_size: int = 256,
            mesh: jax.sharding.Mesh | None = None) -> np.ndarray:
  """Features [N, D] of images [N, H, W, C], `batch_size` at a time.

  A ragged last batch is padded to the batch size (and the padding dropped), so the
  extractor compiles once. With a mesh, the batch size is rounded up to a multiple of
  the mesh's device count and every batch is split over all of its axes (the
  extractor's jitted function then runs sharded); the features are gathered to the host.
  """
  images = np.asarray(images)
  batch_size = checks.check_positive_int(min(batch_size, len(images)), "batch_size")
  put = lambda x: x
  if mesh is not None:
    if not isinstance(mesh, jax.sharding.Mesh):
      raise checks.InputError(f"mesh={mesh!r}; expected a jax.sharding.Mesh (runtime/sharding.py "
                              "builds one) or None.")
    batch_size = -(-batch_size // mesh.size) * mesh.size
    batch = NamedSharding(mesh, P(tuple(mesh.axis_names)))
    put = lambda x: jax.device_put(x, batch)
  out = []
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    n = len(chunk)
    if n < batch_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch_size - n, axis=0)])
    out.append(np.asarray(multihost.gather(extractor(put(chunk))))[:n])
  return np.concatenate(out)


def feature_metrics(extractor, real_images, fake_images, *, k: int = 5, batch_size: int = 256,
                    mesh: jax.sharding.Mesh | None = None,
                    real_features: np.ndarray | None = None, interval_resamples: int = 0,
                    paired: bool = False) -> dict:
  """Frechet distance (streaming float64 statistics) and PRDC of two image sets, named by extractor.

  Returns e.g. {'fd_digits', 'precision_digits', 'recall_digits', 'density_digits',
  'coverage_digits'} for DigitFeatures ('fid', 'precision_inception', ... for Inception).
  mesh: feature extraction and PRDC split over its devices. real_features: the real
  images' features when already extracted (real_images is then not read).
  interval_resamples > 0 adds '<frechet>_interval': the basic (bias-corrected) bootstrap
  interval of the Frechet distance (evaluation/statistics.py set_interval), resampling the
  generated images, or, with paired=True (inpaintings of the originals), each original
  together with its inpainting. A resample costs one eigendecomposition of a [D, D] matrix:
  ~1 ms at the digits' 128-d, ~1 s at Inception's 2048-d. A resample with repeats has fewer
  distinct images, which raises the distance by about the estimate's own bias; the basic
  interval removes that shift, so it can lie below the estimate (and below 0 when the two
  sets are nearly the same images). Compare methods by paired or seed-level differences.
  It also adds
  '<prdc metric>_interval': the BCa interval of each PRDC metric as a mean of per-point
  values (`metrics.prdc_values`), conditional on the other set: precision and density over the
  generated images with the real balls fixed, recall and coverage over the real images
  with the generated set fixed (a resample with repeats would shrink the k-NN radii).
  """
  names = metric_names(extractor.name)
  real = (extract(extractor, real_images, batch_size, mesh) if real_features is None
          else np.asarray(real_features))
  fake = extract(extractor, fake_images, batch_size, mesh)
  if paired and len(real) != len(fake):
    raise checks.InputError(f"paired Frechet interval of {len(real)} originals and "
                            f"{len(fake)} outputs; a paired interval needs one of each.")
  out = {names["frechet"]: frechet(real, fake)}
  per_sample = metrics.prdc_per_sample(real, fake, k=k, mesh=mesh)
  out.update({names[m]: v for m, v in metrics.prdc_means(per_sample, k).items()})
  if interval_resamples:
    fd = (lambda idx: frechet(real[idx], fake[idx])) if paired else (
        lambda idx: frechet(real, fake[idx]))
    out[names["frechet"] + "_interval"] = statistics.set_interval(
        fd, len(fake), resamples=interval_resamples).as_dict()
    for m, v in metrics.prdc_values(per_sample, k).items():
      out[names[m] + "_interval"] = statistics.interval(
          v, resamples=interval_resamples).as_dict()
  return out


def frechet(real_features, fake_features) -> float:
  """The Frechet distance of two feature sets [N, D] (float64 mean and covariance)."""
  return metrics.frechet_distance(*metrics.feature_statistics(real_features),
                                  *metrics.feature_statistics(fake_features))
