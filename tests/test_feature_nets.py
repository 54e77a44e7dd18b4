"""FID Inception-v3 and LPIPS against their reference implementations on the same random weights.

tests/fixtures/feature_nets_reference.npz holds outputs computed once by
tests/fixtures/make_feature_fixtures.py with pytorch-fid 0.3.0 (`fid_inception_v3`,
`InceptionV3([3])`, resize to 299) and the `lpips` 0.1.4 package (AlexNet and VGG
trunks), on weights drawn by tests/fixtures/feature_weights.py from fixed seeds (one
NumPy stream per tensor name) and inputs drawn by its `inputs(seed, shape)`. Here the
same weights are drawn again in NumPy for the names our flax modules expect, loaded
through a weights file, and our outputs are compared with the stored ones.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.evaluation import inception
from asyncpatch_jax.evaluation import lpips
from fixtures import feature_weights

REF = np.load(os.path.join(os.path.dirname(__file__), "fixtures", "feature_nets_reference.npz"))


def _weights_file(tmp_path, expected, seed, fmt="npz"):
  tensors = feature_weights.random_tensors(expected, seed)
  path = str(tmp_path / f"weights.{fmt}")
  if fmt == "npz":
    np.savez(path, **tensors)
  else:
    from safetensors.numpy import save_file
    save_file(tensors, path)
  return path, tensors


def test_inception_pool3_equals_pytorch_fid(tmp_path):
  path, _ = _weights_file(tmp_path, inception.expected_tensors(), feature_weights.SEEDS["inception"])
  net = inception.load(path)
  seed, shape = feature_weights.INCEPTION_INPUT
  got = np.asarray(net(feature_weights.inputs(seed, shape)))
  ref = REF["inception_features"]
  assert got.shape == (2, 2048)
  np.testing.assert_allclose(got, ref, atol=1e-4 * np.abs(ref).max())


def test_resize_to_299_equals_torch_bilinear():
  seed, shape = feature_weights.RESIZE_INPUT                 # 320 x 300 -> 299 x 299 (downsampling)
  got = np.asarray(inception.resize_299(jnp.asarray(feature_weights.inputs(seed, shape))))
  s = feature_weights.RESIZE_STRIDE
  np.testing.assert_allclose(got[:, ::s, ::s], REF["resize_299_subsampled"], atol=1e-5)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_lpips_equals_the_lpips_package(tmp_path, net):
  path, _ = _weights_file(tmp_path, lpips.expected_tensors(net), feature_weights.SEEDS[net],
                          fmt="safetensors" if net == "vgg" else "npz")
  dist = lpips.load(path)                         # the trunk is detected from the file
  assert dist.net == net
  (sx, sy), shape = feature_weights.LPIPS_INPUTS[net]
  x, y = feature_weights.inputs(sx, shape), feature_weights.inputs(sy, shape)
  got = np.asarray(dist(x, y))
  np.testing.assert_allclose(got, REF[f"lpips_{net}"], rtol=1e-5)
  np.testing.assert_allclose(REF[f"lpips_{net}_layers"].sum(0), REF[f"lpips_{net}"], rtol=1e-5)
  assert np.all(np.abs(np.asarray(dist(x, x))) < 1e-7)          # LPIPS(x, x) = 0
  np.testing.assert_allclose(np.asarray(dist(y, x)), got, rtol=1e-5)   # symmetric


def test_mismatched_weight_files_name_the_first_bad_tensor(tmp_path):
  expected = lpips.expected_tensors("alex")
  tensors = feature_weights.random_tensors(expected, 0)
  first = next(iter(expected))
  missing = dict(tensors)
  del missing[first]
  np.savez(tmp_path / "missing.npz", **missing)
  with pytest.raises(checks.InputError, match=f"tensor '{first}'.*is missing"):
    lpips.load(str(tmp_path / "missing.npz"), net="alex")
  bad = dict(tensors)
  bad["lin2.model.1.weight"] = np.zeros((1, 385, 1, 1), np.float32)
  np.savez(tmp_path / "bad.npz", **bad)
  with pytest.raises(checks.InputError,
                     match=r"'lin2.model.1.weight' has shape \(1, 385, 1, 1\); expected \(1, 384, 1, 1\)"):
    lpips.load(str(tmp_path / "bad.npz"), net="alex")
  # LPIPS weights are not Inception weights.
  with pytest.raises(checks.InputError, match="FID Inception-v3 weights: tensor 'Conv2d_1a_3x3"):
    inception.load(str(tmp_path / "bad.npz"))
  with pytest.raises(checks.InputError, match="does not exist"):
    inception.load(str(tmp_path / "nope.npz"))
  with pytest.raises(checks.InputError, match="expected a .npz or .safetensors"):
    open(tmp_path / "w.pth", "w").close()
    inception.load(str(tmp_path / "w.pth"))


def test_digit_features_are_the_classifier_penultimate_layer_and_name_the_metrics():
  import jax
  from asyncpatch_jax.evaluation import digit_classifier, feature_nets
  params = digit_classifier.DigitClassifier().init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"]
  images = feature_weights.inputs(7, (40, 16, 16, 1))
  extractor = feature_nets.DigitFeatures(params)
  f = np.asarray(feature_nets.extract(extractor, images, batch_size=16))   # ragged last batch
  assert f.shape == (40, 128) and f.min() >= 0.0                          # post-ReLU
  # The last Dense layer applied to the features gives the classifier's logits.
  logits = digit_classifier.DigitClassifier().apply({"params": params}, jnp.asarray(images))
  head = params["Dense_1"]
  np.testing.assert_allclose(f @ np.asarray(head["kernel"]) + np.asarray(head["bias"]),
                             np.asarray(logits), rtol=1e-5, atol=1e-5)
  with pytest.warns(RuntimeWarning, match="rank deficient"):      # 20 samples of 128-d
    out = feature_nets.feature_metrics(extractor, images[:20], images[:20], k=3)
  assert set(out) == {"fd_digits", "precision_digits", "recall_digits", "density_digits",
                      "coverage_digits"}
  assert abs(out["fd_digits"]) < 1e-6 and out["precision_digits"] == 1.0
  assert feature_nets.metric_names("inception")["frechet"] == "fid"
  with pytest.raises(checks.InputError, match=r"take the digits dataset's \[B, 16, 16, 1\]"):
    extractor(np.zeros((2, 32, 32, 1)))


@pytest.mark.parametrize("devices", [8, 3])
def test_feature_extraction_sharded_over_a_mesh_equals_one_device(devices):
  """37 images, batch 10: rounded up to a multiple of the device count (16 or 12), every
  batch split over all devices, the ragged last one padded and the padding dropped."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from asyncpatch_jax.evaluation import digit_classifier, feature_nets
  from asyncpatch_jax.runtime import sharding
  params = digit_classifier.DigitClassifier().init(jax.random.key(1),
                                                   jnp.zeros((1, 16, 16, 1)))["params"]
  extractor = feature_nets.DigitFeatures(params)
  images = feature_weights.inputs(11, (37, 16, 16, 1))
  single = feature_nets.extract(extractor, images, batch_size=10)
  mesh = sharding.sampling_mesh(jax.devices()[:devices])
  seen = []

  class Recording:
    name = "digits"

    def __call__(self, x):
      seen.append((x.shape[0], x.sharding))
      return extractor(x)

  sharded = feature_nets.extract(Recording(), images, batch_size=10, mesh=mesh)
  batch = -(-10 // devices) * devices
  assert [b for b, _ in seen] == [batch] * -(-37 // batch)
  assert all(s.is_equivalent_to(NamedSharding(mesh, P("data")), 4) for _, s in seen)
  # float32 convolutions on 2-5 images a device against 10 on one: equal to rounding
  # (measured here: bitwise equal, features up to 0.76; allowed 1e-5 relative).
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-6)
  with pytest.warns(RuntimeWarning, match="rank deficient"):
    a = feature_nets.feature_metrics(extractor, images[:20], images[17:], k=3)
    b = feature_nets.feature_metrics(extractor, images[:20], images[17:], k=3, mesh=mesh)
  assert a.keys() == b.keys()
  for name in a:
    assert b[name] == pytest.approx(a[name], rel=1e-5, abs=1e-6), name
