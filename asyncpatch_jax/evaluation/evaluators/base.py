"""The evaluator interface (big_vision's `evaluators/` is the model) and what evaluators share.

An `Evaluator` is built from the run's config and checks its settings there, before
anything is loaded or compiled (bad input stops at the boundary); `run(ctx)` scores the
model of a `Context` and returns a dict that the caller merges into its JSON
(`eval.json` at the end of training, `evaluate.json` for `--mode=evaluate`), with the
example images it wants in the caller's grid. `evaluators/common.py` names them: training
runs `config.evaluate.at_end`, `--mode=evaluate` runs `config.evaluate.evaluators`.

Keys (root = key(config.seed)): the in-project feature network fold_in(root, 1), the
generation samples fold_in(root, 2), inpainting mask family j fold_in(root, 10 + j), the
digit classifier fold_in(root, 2^30 + 2).
"""

from __future__ import annotations

import abc
from typing import Any, ClassVar

import jax
import numpy as np
from absl import logging

from asyncpatch_jax.data import datasets
from asyncpatch_jax.evaluation import feature_nets
from asyncpatch_jax.evaluation import inception
from asyncpatch_jax.evaluation import lpips
from asyncpatch_jax.runtime import checks

NUM_EXAMPLES = 8           # example images an evaluator keeps for the caller's grid


class Context:
  """What the evaluators of one call share.

  generator: a generate.Generator of the model (a latent model's carries its codec; every
  score is taken on decoded pixels); params: its (EMA) parameters; config: the run's;
  image_shape: the pixels' [H, W, C]; key: the root key (module docstring); mesh: sampler
  batches, feature extraction and PRDC are split over its devices (None: one device);
  bar: a progress bar (anything with `update(n)`) or None; inception_features, lpips_fn:
  from `load_weight_files`; mask_seed: inpainting masks' seed (default config.seed);
  feature_nets: `feature_extractors`' result, when the caller made it already (several
  models scored on the same networks).
  """

  def __init__(self, generator, params, config, *, image_shape, key: jax.Array, mesh=None,
               bar=None, inception_features=None, lpips_fn=None, mask_seed: int | None = None,
               feature_nets: tuple[list, dict[str, Any]] | None = None):
    self.generator, self.params, self.config = generator, params, config
    self.image_shape = tuple(int(s) for s in image_shape)
    self.key, self.mesh, self.bar = key, mesh, bar
    self.inception_features, self.lpips_fn = inception_features, lpips_fn
    self.mask_seed = int(config.seed if mask_seed is None else mask_seed)
    self._feature_nets = feature_nets

  @property
  def shards(self) -> int:
    return 1 if self.mesh is None else self.mesh.size

  def update(self, n: int = 1) -> None:
    if self.bar is not None:
      self.bar.update(n)

  @property
  def feature_nets(self) -> tuple[list, dict[str, Any]]:
    """([extractors], {name: what it is}), made on first use: `feature_extractors`."""
    if self._feature_nets is None:
      self._feature_nets = feature_extractors(self.config, jax.random.fold_in(self.key, 1),
                                              self.inception_features, self.bar)
    return self._feature_nets

  @property
  def has_feature_nets(self) -> bool:
    return self._feature_nets is not None


class Evaluator(abc.ABC):
  """One score family. Subclasses set `name`, check their settings in `__init__` and
  implement `run`; `num_updates` is how often `run` advances the progress bar."""

  name: ClassVar[str]
  uses_feature_nets: ClassVar[bool] = False

  def __init__(self, config, image_shape, latent: bool = False):
    """config: the run's; image_shape: the pixels' [H, W, C]; latent: a latent model."""
    self.config = config
    self.image_shape = tuple(int(s) for s in image_shape)
    self.latent = latent
    if self.uses_feature_nets:
      r = config.evaluate.interval_resamples        # an int >= 0 (config/rules.py)
      if 0 < r < 50:
        raise checks.InputError(f"evaluate.interval_resamples={r!r}; expected 0 (no "
                                "intervals) or at least 50 bootstrap resamples (200 default).")

  @abc.abstractmethod
  def num_updates(self, shards: int) -> int:
    """Progress-bar updates of `run` on a mesh of `shards` devices (feature nets apart)."""

  @abc.abstractmethod
  def run(self, ctx: Context) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scores to merge into the caller's JSON, example images {name: images or rows})."""


def batch_size(batch: int, n: int, shards: int) -> int:
  """The batch for n images: as few batches as `batch` allows, of equal size (so the
  padding of the last one is small), rounded up to a multiple of the mesh's devices."""
  num_batches = -(-n // min(batch, n))
  per_batch = -(-n // num_batches)
  return -(-per_batch // shards) * shards


def check_feature_data(config, image_shape) -> None:
  """The dataset makes the model's images, and a feature network fits it."""
  data, ec = config.data, config.evaluate
  checks.check_positive_int(ec.batch_size, "evaluate.batch_size")
  checks.check_positive_int(ec.feature_steps, "evaluate.feature_steps")
  held_out = datasets.get_dataset(data.dataset, "test", data_dir=data.data_dir or None,
                                  **dict(data.options))
  if tuple(held_out.image_shape) != tuple(image_shape):
    raise checks.InputError(f"the model makes {tuple(image_shape)} images but dataset "
                            f"{data.dataset!r} with data.options="
                            f"{dict(data.options)} has {tuple(held_out.image_shape)}; "
                            "evaluate with the run's own config (the workdir's config.json).")
  problem = feature_nets.in_project_problem(data.dataset, dict(data.options))
  if problem and not ec.inception_weights:
    raise checks.InputError(f"{problem}; give FID Inception-v3 weights: "
                            "--config.evaluate.inception_weights=<file.npz> "
                            "(tools/convert_weights.py).")


def check_k(config, n, what: str) -> int:
  """evaluate.k, PRDC's neighbours: positive and below n (`what` names n's setting)."""
  k = checks.check_positive_int(config.evaluate.k, "evaluate.k")
  if k >= n:
    raise checks.InputError(f"evaluate.k={k} nearest neighbours need more than k samples; "
                            f"{what}={n}. Raise {what.split('.')[-1]} or lower k.")
  return k


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


def extract_all(extractors, images, batch, mesh) -> dict[str, np.ndarray]:
  return {ex.name: feature_nets.extract(ex, images, batch, mesh) for ex in extractors}
