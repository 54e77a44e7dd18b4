"""The in-project feature network of the textures (evaluation/texture_features.py).

The proxy task: which of the 7 default source images (data/textures.py) a 32x32 crop
comes from; chance is 1/7 = 0.143. Training crops come from the top 80 % of every
image's rows, the held-out ones from the bottom 20 %. References: the crops' labels
from the dataset, float64 NumPy for the last layer, scipy's sqrtm formula for the
Frechet distance, dm-pix for the blur.
"""

import warnings

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.linalg

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.evaluation import feature_nets
from asyncpatch_jax.evaluation import texture_features

STEPS = 300                     # the default is 600 (measured 0.90 held-out accuracy)
CHANCE = 1.0 / 7.0


@pytest.fixture(scope="module")
def trained():
  extractor, accuracy = feature_nets.TextureFeatures.train(jax.random.key(0), STEPS)
  x_test, y_test, num_classes = texture_features.crops("test", 1024)
  return extractor, accuracy, x_test, y_test, num_classes


def _frechet_sqrtm(a, b):
  """pytorch-fid's formula in float64 (scipy sqrtm of the non-symmetric product)."""
  mu1, mu2 = a.mean(0), b.mean(0)
  c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  with warnings.catch_warnings():             # dead (always 0) ReLU features: singular
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
  return float(((mu1 - mu2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))


@pytest.mark.slow
def test_held_out_accuracy_is_far_above_chance_and_features_are_the_penultimate_layer(trained):
  extractor, accuracy, x_test, y_test, num_classes = trained
  assert num_classes == 7 and extractor.image_shape == (32, 32, 3)
  # Measured 0.84 after 300 steps (0.90 after the default 600): chance is 0.14.
  assert accuracy > 4 * CHANCE
  f = np.asarray(feature_nets.extract(extractor, x_test, batch_size=300), np.float64)
  assert f.shape == (1024, 128) and f.min() >= 0.0                       # post-ReLU
  head = extractor.params["Dense_1"]
  logits = f @ np.asarray(head["kernel"], np.float64) + np.asarray(head["bias"], np.float64)
  np.testing.assert_allclose(logits, np.asarray(texture_features.logits(extractor.params, x_test)),
                             rtol=1e-4, atol=1e-4)
  # The accuracy it reports is that of these logits on the dataset's labels.
  assert accuracy == pytest.approx(np.mean(np.argmax(logits, -1) == y_test), abs=2 / 1024)


def test_frechet_distance_separates_blurred_and_shifted_crops(trained):
  """Two halves of the held-out crops are close; blurring or brightening one half is not.

  Measured (300 steps): held-out vs held-out 3.3, vs the blurred half (Gaussian, sigma 1)
  12.9, vs the half brightened by 0.1 7.4; train crops vs held-out crops 149 (the
  held-out band is another part of each photo: evaluate.reference_split is 'train').
  """
  extractor, _, x_test, _, _ = trained
  a, b = x_test[:512], x_test[512:]
  feats = lambda x: np.asarray(feature_nets.extract(extractor, x, batch_size=256), np.float64)
  fa, fb = feats(a), feats(b)
  blurred = np.asarray(pix.gaussian_blur(jnp.asarray(b), 1.0, 5))
  brighter = np.clip(b + 0.1, -1.0, 1.0)
  same, blur, bright = (_frechet_sqrtm(fa, f) for f in (fb, feats(blurred), feats(brighter)))
  assert same < 6.0
  assert blur > 3 * same and bright > 1.8 * same
  # The library's stable formula (and its naming) agree with the sqrtm reference.
  out = feature_nets.feature_metrics(extractor, a, blurred, k=5, batch_size=256)
  assert set(out) == {"fd_textures", "precision_textures", "recall_textures", "density_textures",
                      "coverage_textures"}
  assert out["fd_textures"] == pytest.approx(blur, rel=1e-6)
  assert feature_nets.metric_names("textures")["frechet"] == "fd_textures"


def test_training_is_deterministic_per_key():
  a, shape, acc_a = texture_features.train_classifier(jax.random.key(5), 8, num_train=256,
                                                      num_test=64)
  b, _, acc_b = texture_features.train_classifier(jax.random.key(5), 8, num_train=256,
                                                  num_test=64)
  c, _, _ = texture_features.train_classifier(jax.random.key(6), 8, num_train=256, num_test=64)
  assert shape == (32, 32, 3) and acc_a == acc_b
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert any(not np.array_equal(np.asarray(x), np.asarray(z))
             for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(c)))


@pytest.mark.slow
def test_in_project_networks_and_their_refusals(trained):
  extractor = trained[0]
  assert set(feature_nets.IN_PROJECT) == {"digits", "textures"}
  with pytest.raises(checks.InputError, match=r"trained on crops of \(32, 32, 3\)"):
    extractor(np.zeros((2, 16, 16, 3), np.float32))
  with pytest.raises(checks.InputError, match="'sudoku' has no in-project feature network"):
    feature_nets.in_project("sudoku", jax.random.key(0))
  with pytest.raises(checks.InputError, match="take the 16x16 digits"):
    feature_nets.in_project("digits", jax.random.key(0), options={"image_size": 32})
