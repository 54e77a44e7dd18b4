"""evaluation/evaluators/ (what --mode=evaluate and the end of training score) with a fake
generator on a mesh.

The fake generator is a pure function of its inputs (uniform noise from the key for
generation; the known pixels kept and the holes negated for inpainting), and the feature
network a fixed linear map, so every number evaluate.json holds has a float64 NumPy
reference: the Frechet distance by scipy's sqrtm formula, PRDC by its definitions, PSNR by
its formula. The trained end-to-end case is in tests/test_robustness.py.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from asyncpatch_jax.config import base_config
from asyncpatch_jax.data import datasets
from asyncpatch_jax.data import masks
from asyncpatch_jax.evaluation.evaluators import base
from asyncpatch_jax.evaluation.evaluators import common as evaluators
from asyncpatch_jax.generation import generate
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import sharding

W_FEATURES = np.random.default_rng(0).normal(size=(256, 6)).astype(np.float32)


class _Linear:
  """features = flatten(images) @ W (6-d): a fixed, exactly reproducible feature map."""
  name = "lin"
  dim = 6

  def __init__(self):
    self.seen = []

  def __call__(self, images):
    self.seen.append((images.shape[0], getattr(images, "sharding", None)))
    return jnp.reshape(jnp.asarray(images), (images.shape[0], -1)) @ W_FEATURES


class _Model:
  num_classes = 10


class _Generator(generate.Generator):
  """A pixel model's Generator whose sampler is a stand-in that records its calls."""

  def __init__(self, mesh):
    super().__init__(_Model(), mesh=mesh)
    self.calls = []

  def __call__(self, params, tau, *, key, x=None, shape=None, labels=None, guidance_weight=0.0,
               eta=0.0, **unused):
    del params, eta, unused
    if x is None:
      self.calls.append(("generate", shape[0], None if labels is None else np.array(labels),
                         guidance_weight))
      return jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)
    self.calls.append(("inpaint", x.shape[0], None, None))
    known = (np.asarray(tau)[0] == 0)[..., None]
    return np.where(known, x, -x)


def _frechet(a, b):
  c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
  return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1) + np.trace(c2)
               - 2 * np.trace(covmean))


def _prdc(real, fake, k):
  d = lambda a, b: np.sqrt(((a[:, None] - b[None]) ** 2).sum(-1))
  r_real, r_fake = np.sort(d(real, real), 1)[:, k], np.sort(d(fake, fake), 1)[:, k]
  rf = d(real, fake)
  inside = rf < r_real[:, None]
  return {"precision": inside.any(0).mean(), "recall": (rf < r_fake[None, :]).any(1).mean(),
          "density": inside.sum(0).mean() / k, "coverage": inside.any(1).mean()}


def _config(**evaluate):
  config = base_config.get_base_config()
  config.sample.update(num_steps=3, eta=0.0)
  config.evaluate.update(num_samples=50, batch_size=20, num_inpaint=19, k=3,
                         mask_families=("thin", "square"), **evaluate)
  return base_config.finalize(config)


@pytest.mark.parametrize("devices", [1, 3, 8])
def test_evaluate_with_a_fake_generator_against_float64_references(devices):
  mesh = None if devices == 1 else sharding.sampling_mesh(jax.devices()[:devices])
  config = _config(guidance=1.5)
  gen, lin = _Generator(mesh), _Linear()
  key = jax.random.key(7)

  class Bar:
    n = 0

    def update(self, k):
      Bar.n += k

  chosen = evaluators.from_config(config, ("generation", "inpainting"), (16, 16, 1))
  ctx = base.Context(gen, None, config, image_shape=(16, 16, 1), key=key, mesh=mesh, bar=Bar(),
                     feature_nets=([lin], {"lin": "a fixed linear map"}))
  result, examples = evaluators.run(chosen, ctx)
  assert Bar.n == evaluators.num_updates(chosen, config, devices) - 1  # (no in-project net here)
  assert result["feature_nets"] == {"lin": "a fixed linear map"}
  # Batches: 50 samples in 3 of 20 -> 3 of 17, rounded up to the devices; 19 images in one.
  gen_batch = -(-17 // devices) * devices
  inp_batch = -(-19 // devices) * devices
  generate_calls = [c for c in gen.calls if c[0] == "generate"]
  assert [c[1] for c in generate_calls] == [gen_batch] * -(-50 // gen_batch)
  assert all(c[3] == 1.5 for c in generate_calls)
  labels = np.concatenate([c[2] for c in generate_calls])
  np.testing.assert_array_equal(labels, np.arange(len(labels)) % 10)   # cycling, per batch
  assert [c[1] for c in gen.calls if c[0] == "inpaint"] == [inp_batch, inp_batch]
  if mesh is not None:       # the features of every batch arrive split over the mesh
    assert all(s.mesh.shape == mesh.shape and b % devices == 0 for b, s in lin.seen)

  # Generation: noise from fold_in(fold_in(key, 2), start) for each batch start.
  samples = np.concatenate([np.asarray(jax.random.uniform(
      jax.random.fold_in(jax.random.fold_in(key, 2), i), (gen_batch, 16, 16, 1), minval=-1.0,
      maxval=1.0)) for i in range(0, 50, gen_batch)])[:50]
  train_src = datasets.get_dataset("digits", "train")
  real = np.stack([train_src[i]["image"] for i in range(50)])
  feats = lambda x: np.reshape(x, (len(x), -1)).astype(np.float64) @ W_FEATURES.astype(np.float64)
  g = result["generation"]
  assert (g["num_samples"], g["num_reference"], g["reference_split"]) == (50, 50, "train")
  assert g["fd_lin"] == pytest.approx(_frechet(feats(real), feats(samples)), rel=1e-4)
  # Its interval (the default 200 resamples) resamples the samples, the reference fixed.
  iv = g["fd_lin_interval"]
  assert (iv["estimate"], iv["n"], iv["level"]) == (pytest.approx(g["fd_lin"]), 50, 0.95)
  assert iv["low"] < g["fd_lin"] < iv["high"]
  for name, value in _prdc(feats(real), feats(samples), 3).items():
    assert g[f"{name}_lin"] == pytest.approx(value, abs=1e-12), name

  # Inpainting: holes negated, known pixels kept; PSNR on [0, 1] images.
  test_src = datasets.get_dataset("digits", "test")
  originals = np.stack([test_src[i]["image"] for i in range(19)]).astype(np.float64)
  inp = result["inpainting"]
  assert (inp["method"], inp["network_evals"], inp["num_images"]) == ("asyncpatch", 3, 19)
  for family in ("thin", "square"):
    m = masks.make_masks(family, 19, 16, 16, seed=config.seed)[..., None]
    out = np.where(m > 0, originals, -originals)
    mse = (((out - originals) / 2.0) ** 2).mean(axis=(1, 2, 3))
    q = inp["families"][family]
    assert q["psnr"] == pytest.approx(np.mean(10 * np.log10(1.0 / mse)), rel=1e-5), family
    assert q["hole_fraction"] == pytest.approx(1.0 - m.mean(), abs=1e-7)
    assert q["fd_lin"] == pytest.approx(_frechet(feats(originals), feats(out)), rel=1e-4)
    assert q["psnr_interval"]["low"] < q["psnr"] < q["psnr_interval"]["high"]
    assert q["fd_lin_interval"]["n"] == 19
    masked, shown = examples[family]
    np.testing.assert_array_equal(shown, out[:8].astype(np.float32))
    np.testing.assert_array_equal(masked, np.where(m[:8] > 0, originals[:8], -1.0))


def test_too_few_interval_resamples_stop_before_any_work():
  with pytest.raises(checks.InputError, match="at least 50 bootstrap resamples"):
    evaluators.from_config(_config(interval_resamples=10), ("generation",), (16, 16, 1))
  evaluators.from_config(_config(interval_resamples=0), ("generation",), (16, 16, 1))


def test_batch_is_the_smallest_device_multiple_with_the_fewest_batches():
  """Enumeration: the fewest batches `batch_size` allows, then the smallest batch (a
  multiple of the devices) that reaches that count."""
  for devices in (1, 3, 8):
    for n in range(1, 70):
      for batch_size in range(1, 30):
        fewest = -(-n // min(batch_size, n))
        want = min(b for b in range(devices, n + 2 * devices, devices) if -(-n // b) <= fewest)
        assert base.batch_size(batch_size, n, devices) == want, (devices, n, batch_size)
