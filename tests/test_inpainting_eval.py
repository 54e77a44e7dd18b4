"""Benchmark measurements (evaluation/inpainting_eval.py) against independent references.

Fakes instead of trained networks: a point-mass velocity field (data = one image x*,
so v(z, t) = (z - x*) / t and every correct sampler ends exactly at x*), a recording
method and generator (pure functions), and a linear feature extractor. References:
float64 NumPy PSNR, SSIM (Wang et al. 2004 with dm-pix's window), Frechet distance
(scipy sqrtm) and PRDC (Naeem et al. 2020, enumeration); the RePaint count in closed
form; the digits by their documented construction from scikit-learn.
"""

import numpy as np
import pytest
import scipy.linalg
import scipy.stats

import jax
import jax.numpy as jnp

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.generation import generate
from asyncpatch_jax.diffusion import flow
from asyncpatch_jax.evaluation import feature_nets
from asyncpatch_jax.evaluation import inpainting_eval as ie
from asyncpatch_jax.evaluation import statistics

H, W, C = 8, 8, 1


# ----------------------------------------------------------------------- run_inpainting


def _recording_method(calls):
  """fn(x, m, key): known pixels kept, unknown ones set to a number drawn from the key."""
  def fn(x, m, key):
    calls.append((np.array(x), np.array(m), np.asarray(jax.random.key_data(key))))
    fill = jax.random.uniform(key, ())
    return jnp.where(jnp.asarray(m)[..., None] > 0, x, fill)
  return fn


class _Bar:
  def __init__(self):
    self.n = 0

  def update(self, k):
    self.n += k


@pytest.mark.parametrize("asked,multiple_of", [(4, 1), (3, 2), (4, 4)])
def test_run_inpainting_batches_pads_keys_and_keeps_known_pixels(monkeypatch, asked, multiple_of):
  """Batch = min(asked, n) rounded up to a multiple of multiple_of (here always 4)."""
  rng = np.random.default_rng(0)
  n, batch = 10, 4
  images = rng.uniform(-1, 1, (n, H, W, C)).astype(np.float32)
  masks = (rng.uniform(size=(n, H, W)) < 0.5).astype(np.float32)
  key = jax.random.key(7)
  clock = [0.0]
  monkeypatch.setattr(ie.time, "perf_counter", lambda: clock[0])
  calls = []
  record = _recording_method(calls)

  def fn(x, m, k):
    clock[0] += 2.0                      # every call "takes" 2 s on the fake clock
    return record(x, m, k)

  bar = _Bar()
  out, timing = ie.run_inpainting(fn, images, masks, key, asked, bar=bar,
                                  multiple_of=multiple_of)
  assert out.shape == images.shape
  starts = [0, 4, 8]
  assert len(calls) == len(starts) == bar.n
  for (x, m, k), s in zip(calls, starts):
    assert x.shape == (batch, H, W, C) and m.shape == (batch, H, W)   # one compiled shape
    idx = np.minimum(np.arange(s, s + batch), n - 1)    # ragged last: repeats image n - 1
    np.testing.assert_array_equal(x, images[idx])
    np.testing.assert_array_equal(m, masks[idx])
    np.testing.assert_array_equal(k, jax.random.key_data(jax.random.fold_in(key, s)))
  fills = np.array([float(jax.random.uniform(jax.random.fold_in(key, s), ())) for s in starts])
  expected = np.where(masks[..., None] > 0, images, fills[np.arange(n) // batch][:, None, None, None])
  np.testing.assert_array_equal(out, expected)
  # Timing: the first (compiling) batch apart; later ones per real image: 2 s per batch of 4.
  assert timing["first_batch_seconds"] == 2.0
  assert timing["seconds_per_image"] == pytest.approx(2.0 / batch)


def test_run_inpainting_single_batch_times_include_compilation(monkeypatch):
  """Fewer images than the batch: one call of all of them (padded only to multiple_of)."""
  clock = [0.0]
  monkeypatch.setattr(ie.time, "perf_counter", lambda: clock[0])
  calls = []
  record = _recording_method(calls)

  def fn(x, m, k):
    clock[0] += 3.0
    return record(x, m, k)

  images = np.arange(3, dtype=np.float32)[:, None, None, None] * np.ones((1, H, W, C), np.float32)
  masks = np.ones((3, H, W), np.float32)
  out, timing = ie.run_inpainting(fn, images, masks, jax.random.key(0), 8)
  assert len(calls) == 1 and calls[0][0].shape[0] == 3
  assert timing == {"seconds_per_image": 1.0, "first_batch_seconds": 3.0}
  out, timing = ie.run_inpainting(fn, images, masks, jax.random.key(0), 8, multiple_of=4)
  np.testing.assert_array_equal(calls[1][0][:, 0, 0, 0], [0, 1, 2, 2])   # padded with the last
  np.testing.assert_array_equal(out, images)
  assert timing == {"seconds_per_image": 3.0 / 4, "first_batch_seconds": 3.0}


# ------------------------------------------------------------------ method (fake model)


class _PointMass:
  """A stand-in for the UNet: data is the single image x*(y) = target + 0.1 y.

  Counts its evaluations (a host callback per call of the compiled loop's body).
  """
  num_classes = 3
  null_label = 3

  def __init__(self):
    self.calls = []

  def apply(self, variables, z, t, y=None):
    jax.debug.callback(lambda: self.calls.append(1))
    target = variables["params"]["target"] + 0.1 * jnp.asarray(y, jnp.float32)[:, None, None, None]
    return (z - target) / jnp.maximum(flow.expand_time(t, z.ndim), 1e-6)


def _repaint_model_steps(num_steps, jump_length, jump_n_sample):
  """num_steps + (jump_n_sample - 1) jump_length per multiple j of jump_length, j < N - jl."""
  return num_steps + (jump_n_sample - 1) * jump_length * (num_steps // jump_length - 1)


def test_method_evaluation_counts():
  gen = generate.Generator(_PointMass(), mesh=None)
  count = lambda name, **kw: ie.method(name, gen, {}, num_steps=10, eta=0.0, **kw)[1]
  assert count("asyncpatch") == 10
  assert count("asyncpatch_input_guidance") == 20              # two evaluations a step
  assert count("progressive", num_stripes=4) == 8               # 4 stripes x floor(10 / 4)
  assert count("progressive", num_stripes=20) == 20             # at least one step a stripe
  assert count("repaint") == _repaint_model_steps(250, 10, 10) == 2410   # RePaint's defaults
  assert count("repaint", repaint_params=(12, 3, 4)) == _repaint_model_steps(12, 3, 4) == 39


@pytest.mark.parametrize("name", ["asyncpatch", "asyncpatch_input_guidance", "progressive",
                                  "repaint"])
def test_methods_keep_known_pixels_and_end_at_the_point_mass(name):
  """Known pixels bit-exact; the generated ones at x*(null label): the methods run the
  model unconditionally (null label 3: x* = target + 0.3); the evaluations counted."""
  rng = np.random.default_rng(1)
  target = rng.uniform(-0.5, 0.5, (H, W, C)).astype(np.float32)
  params = {"target": jnp.asarray(target)}
  model = _PointMass()
  gen = generate.Generator(model, mesh=None)
  fn, nfe = ie.method(name, gen, params, num_steps=4, eta=0.25, num_stripes=2,
                      repaint_params=(4, 2, 2))
  x = rng.uniform(-1, 1, (2, H, W, C)).astype(np.float32)
  m = np.zeros((2, H, W), np.float32)
  m[0, :, :4] = 1.0
  m[1, 2:6, 2:6] = 1.0
  out = np.asarray(fn(x, m, jax.random.key(3)))
  assert len(model.calls) == nfe        # the reported cost is the evaluations that ran
  assert nfe == {"asyncpatch": 4, "asyncpatch_input_guidance": 8, "progressive": 4,
                 "repaint": _repaint_model_steps(4, 2, 2)}[name]
  known = m[..., None] > 0
  np.testing.assert_array_equal(np.where(known, out, 0), np.where(known, x, 0))
  expected = np.broadcast_to(target + 0.3, out.shape)
  np.testing.assert_allclose(out[~np.broadcast_to(known, out.shape)],
                             expected[~np.broadcast_to(known, out.shape)], atol=2e-5)


def test_unknown_method_is_a_one_line_input_error():
  gen = generate.Generator(_PointMass(), mesh=None)
  for bad, hint in (("asyncpach", "'asyncpatch'"), ("repiant", "'repaint'")):
    with pytest.raises(checks.InputError, match=f"Did you mean {hint}") as err:
      ie.method(bad, gen, {}, num_steps=4, eta=0.0)
    assert "\n" not in str(err.value) and "inpainting method" in str(err.value)


# ------------------------------------------------------------------- sample (fake generator)


class _RecordingGenerator(generate.Generator):
  """A pixel model's Generator whose sampler records its calls; image i of the run (in call
  order) is the constant i."""

  def __init__(self, num_classes):
    super().__init__(type("M", (), {"num_classes": num_classes})(), mesh=None)
    self.calls = []
    self.made = 0

  def __call__(self, params, tau, *, key, shape, labels, guidance_weight, eta):
    self.calls.append(dict(tau=np.asarray(tau), key=np.asarray(jax.random.key_data(key)),
                           shape=shape, labels=None if labels is None else np.asarray(labels),
                           guidance_weight=guidance_weight, eta=eta, params=params))
    b, self.made = shape[0], self.made + shape[0]
    return np.broadcast_to(np.arange(self.made - b, self.made, dtype=np.float32)[:, None, None, None],
                           shape)


@pytest.mark.parametrize("num_classes,asked,multiple_of,batch", [(3, 4, 1, 4), (0, 4, 1, 4),
                                                                  (3, 5, 4, 8)])
def test_sample_cycles_labels_keys_and_uses_the_synchronous_schedule(num_classes, asked,
                                                                     multiple_of, batch):
  """Batches of min(asked, num) rounded up to multiple_of, the last one padded and trimmed.

  Images 6 x 9 (not square: catches swapped axes)."""
  gen = _RecordingGenerator(num_classes)
  key = jax.random.key(11)
  bar = _Bar()
  out = ie.sample(gen, "P", 10, (6, 9, C), num_steps=5, eta=0.25, key=key, batch=asked,
                  guidance_weight=1.5, bar=bar, multiple_of=multiple_of)
  starts = list(range(0, 10, batch))
  assert out.shape == (10, 6, 9, C) and bar.n == len(starts)
  np.testing.assert_array_equal(                 # order kept, padding of the last call dropped
      out[:, 0, 0, 0], np.concatenate([np.arange(s, min(s + batch, 10)) - s + j * batch
                                       for j, s in enumerate(starts)]))
  assert [c["shape"] for c in gen.calls] == [(batch, 6, 9, C)] * len(starts)
  ramp = 1.0 - np.arange(6) / 5.0                                        # tau[k] = 1 - k / N
  for c, s in zip(gen.calls, starts):
    np.testing.assert_allclose(c["tau"], np.broadcast_to(ramp[:, None, None], (6, 6, 9)),
                               atol=1e-12)
    np.testing.assert_array_equal(c["key"], jax.random.key_data(jax.random.fold_in(key, s)))
    assert (c["guidance_weight"], c["eta"], c["params"]) == (1.5, 0.25, "P")
    if num_classes:                                # image j of the run has label j mod 3
      np.testing.assert_array_equal(c["labels"], [(s + j) % 3 for j in range(batch)])
    else:
      assert c["labels"] is None


# ------------------------------------------------------------------------------- quality


class _LinearFeatures:
  """features = flatten(images) @ P, a fixed random 4-d projection of [N, h, w, C] images."""
  name = "toy"

  def __init__(self, h, w):
    self.proj = np.random.default_rng(5).standard_normal((h * w * C, 4)).astype(np.float32)

  def __call__(self, images):
    return jnp.asarray(images).reshape(len(images), -1) @ self.proj


def _ssim_ref(a, b, size, sigma=1.5, k1=0.01, k2=0.03):
  """Wang et al. 2004 in float64 on [0, 1] images, Gaussian window, valid filtering."""
  a, b = (np.asarray(a, np.float64) + 1) / 2, (np.asarray(b, np.float64) + 1) / 2
  g = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
  g /= g.sum()
  n = a.shape[1] - size + 1, a.shape[2] - size + 1

  def filt(z):
    return sum(g[i] * g[j] * z[:, i:i + n[0], j:j + n[1]] for i in range(size)
               for j in range(size))

  mu_a, mu_b = filt(a), filt(b)
  var_a, var_b = filt(a * a) - mu_a ** 2, filt(b * b) - mu_b ** 2
  cov = filt(a * b) - mu_a * mu_b
  c1, c2 = k1 ** 2, k2 ** 2
  s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2) /
       ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
  return s.mean(axis=(1, 2, 3))


def _prdc_ref(real, fake, k):
  d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
  d_ff = np.linalg.norm(fake[:, None] - fake[None], axis=-1)
  d_rf = np.linalg.norm(real[:, None] - fake[None], axis=-1)          # [real, fake]
  r_real = np.sort(d_rr, axis=1)[:, k]                                # k-th neighbour, self excluded
  r_fake = np.sort(d_ff, axis=1)[:, k]
  inside = d_rf < r_real[:, None]                                     # fake j in real ball i
  return {"precision": inside.any(axis=0).mean(),
          "recall": (d_rf < r_fake[None, :]).any(axis=1).mean(),
          "density": inside.sum(axis=0).mean() / k,
          "coverage": inside.any(axis=1).mean()}


@pytest.mark.parametrize("h,w,window,several", [(8, 8, 7, True), (6, 9, 5, False)])
def test_quality_against_float64_references(h, w, window, several):
  """PSNR, SSIM (window: the largest odd size <= min(11, h, w)), Frechet distance, PRDC.

  several: a list of two extractors, the first with its real features given (reused, so it
  sees only the outputs).
  """
  rng = np.random.default_rng(2)
  n = 40
  originals = rng.uniform(-1, 1, (n, h, w, C)).astype(np.float32)
  outputs = np.clip(originals + 0.3 * rng.standard_normal(originals.shape), -1, 1
                    ).astype(np.float32)
  toy = _LinearFeatures(h, w)
  if several:
    seen = []
    spy = type("Spy", (), {"name": "toy", "__call__": lambda self, z: (seen.append(len(z)),
                                                                        toy(z))[1]})()
    real = {"toy": np.asarray(toy(originals))}
    got = ie.quality(outputs, originals, [spy, _ConstantFeatures()], batch=16, k=3,
                     real_features=real)
    assert sum(seen) == -(-n // 16) * 16              # outputs only (padded to the batch)
  else:
    got = ie.quality(outputs, originals, toy, batch=16, k=3)
  o64, x64 = outputs.astype(np.float64), originals.astype(np.float64)
  mse01 = (((o64 - x64) / 2) ** 2).mean(axis=(1, 2, 3))
  assert got["psnr"] == pytest.approx(np.mean(10 * np.log10(1.0 / mse01)), rel=1e-5)
  assert got["ssim"] == pytest.approx(_ssim_ref(o64, x64, window).mean(), abs=2e-5)
  extractors = {"toy": lambda z: z.reshape(n, -1) @ toy.proj.astype(np.float64)}
  if several:
    extractors["const"] = lambda z: np.stack([z.mean(axis=(1, 2, 3)), z[:, 0, 0, 0] ** 2], 1)
  for ex_name, feats in extractors.items():
    fr, ff = feats(x64), feats(o64)
    c_r, c_f = np.cov(fr, rowvar=False), np.cov(ff, rowvar=False)
    fd = (np.sum((fr.mean(0) - ff.mean(0)) ** 2) + np.trace(c_r) + np.trace(c_f)
          - 2 * np.trace(scipy.linalg.sqrtm(c_r @ c_f)).real)
    assert got[f"fd_{ex_name}"] == pytest.approx(fd, rel=1e-4, abs=1e-6)
    for name, value in _prdc_ref(fr, ff, 3).items():
      assert got[f"{name}_{ex_name}"] == pytest.approx(value, abs=1e-6), (ex_name, name)
  assert len(got) == 2 + 5 * len(extractors) and "lpips" not in got


def test_quality_lpips_upsamples_small_images_to_64():
  """Constant images stay constant under bilinear upsampling: LPIPS of the fake = mean (a - b)^2."""
  seen = []

  def fake_lpips(a, b):
    seen.append(a.shape)
    return jnp.mean((a - b) ** 2, axis=(1, 2, 3))

  rng = np.random.default_rng(4)
  n, h, w = 40, 6, 9                      # the shapes of a quality test above: SSIM compiled once
  a_val, b_val = rng.uniform(-1, 1, n), rng.uniform(-1, 1, n)
  a = np.broadcast_to(a_val[:, None, None, None], (n, h, w, C)).astype(np.float32)
  b = np.broadcast_to(b_val[:, None, None, None], (n, h, w, C)).astype(np.float32)
  got = ie.quality(a, b, _ConstantFeatures(), lpips_fn=fake_lpips, batch=16, k=2)
  assert seen == [(16, 64, 96, C), (16, 64, 96, C), (8, 64, 96, C)]   # 64 rows, aspect kept
  assert got["lpips"] == pytest.approx(np.mean((a_val.astype(np.float32)
                                                - b_val.astype(np.float32)) ** 2), rel=1e-5)


class _ConstantFeatures:
  name = "const"

  def __call__(self, images):
    x = jnp.asarray(images)
    return jnp.stack([x.mean(axis=(1, 2, 3)), x[:, 0, 0, 0] ** 2], axis=1)


# ------------------------------------------------------------------------ dataset_images


def test_dataset_images_are_the_documented_digits():
  """sklearn digits, per-class last 20% = test, x / 8 - 1, 2x nearest upsampling to 16."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top
  d = sk_datasets.load_digits()
  test_idx = np.sort(np.concatenate([
      np.flatnonzero(d.target == c)[int(round(0.8 * np.sum(d.target == c))):] for c in range(10)]))
  ref = np.repeat(np.repeat(d.images[test_idx] / 8.0 - 1.0, 2, axis=1), 2, axis=2)[..., None]
  got = ie.dataset_images("digits", "test", 5)
  assert got.shape == (5, 16, 16, 1) and got.dtype == np.float32
  np.testing.assert_allclose(got, ref[:5], atol=1e-7)
  everything = ie.dataset_images("digits", "test", 10_000)       # more than there are: all
  assert everything.shape == (359, 16, 16, 1) == ie.dataset_images("digits", "test").shape
  np.testing.assert_allclose(everything, ref, atol=1e-7)


def test_quality_intervals_resample_each_original_with_its_inpainting():
  """interval_resamples: PSNR/SSIM intervals are the bootstrap of the NumPy per-image values;
  the Frechet interval resamples original-output pairs together (a float64 NumPy/scipy
  basic bootstrap of the pairs agrees within Monte Carlo error), so outputs equal to the originals
  give exactly [0, 0], where resampling the outputs alone would not."""
  rng = np.random.default_rng(5)
  n, h, w = 60, 8, 8
  originals = rng.uniform(-1, 1, (n, h, w, C)).astype(np.float32)
  outputs = np.clip(originals + 0.4 * rng.standard_normal(originals.shape), -1, 1
                    ).astype(np.float32)
  toy = _LinearFeatures(h, w)
  got = ie.quality(outputs, originals, toy, batch=32, k=3, interval_resamples=400,
                   per_image=True)
  o64, x64 = outputs.astype(np.float64), originals.astype(np.float64)
  psnr = 10 * np.log10(1.0 / (((o64 - x64) / 2) ** 2).mean(axis=(1, 2, 3)))
  np.testing.assert_allclose(got["per_image"]["psnr"], psnr, rtol=1e-5)
  ref = statistics.interval(psnr, resamples=400)
  assert (got["psnr_interval"]["low"], got["psnr_interval"]["high"]) == pytest.approx(
      (ref.low, ref.high), rel=1e-4)
  assert got["ssim_interval"]["low"] < got["ssim"] < got["ssim_interval"]["high"]
  feats = lambda z: z.reshape(len(z), -1) @ toy.proj.astype(np.float64)
  fr, ff = feats(x64), feats(o64)

  def fd(a, b):
    c_a, c_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    return (np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(c_a) + np.trace(c_b)
            - 2 * np.trace(scipy.linalg.sqrtm(c_a @ c_b)).real)
  draws = np.random.default_rng(11).integers(0, n, (1000, n))
  boot = [fd(fr[i], ff[i]) for i in draws]
  est = fd(fr, ff)
  low, high = 2 * est - np.percentile(boot, [97.5, 2.5])     # the basic (bias-corrected) one
  iv = got["fd_toy_interval"]
  assert iv["estimate"] == pytest.approx(est, rel=1e-4) and iv["method"] == "basic"
  assert iv["low"] == pytest.approx(low, rel=0.15) and iv["high"] == pytest.approx(high, rel=0.15)
  # PRDC intervals: scipy's BCa bootstrap (same seed) of the float64 per-point values, the
  # fake points for precision and density, the real points for recall and coverage.
  d_rr, d_ff, d_rf = (np.linalg.norm(a[:, None] - b[None], axis=-1)
                      for a, b in ((fr, fr), (ff, ff), (fr, ff)))
  inside = d_rf < np.sort(d_rr, axis=1)[:, 3][:, None]                # [real, fake], k = 3
  values = {"precision": inside.any(0), "density": inside.sum(0) / 3,
            "recall": (d_rf < np.sort(d_ff, axis=1)[:, 3][None, :]).any(1),
            "coverage": inside.any(1)}
  for name, v in values.items():
    v = v.astype(np.float64)
    assert got[f"{name}_toy"] == pytest.approx(v.mean(), abs=1e-12), name
    ci = scipy.stats.bootstrap((v,), np.mean, n_resamples=400, method="BCa",
                               rng=np.random.default_rng(0)).confidence_interval
    assert (got[f"{name}_toy_interval"]["low"], got[f"{name}_toy_interval"]["high"]) == \
        pytest.approx((ci.low, ci.high), abs=1e-12), name
  same = feature_nets.feature_metrics(toy, originals, originals, k=3, batch_size=32,
                                      interval_resamples=100, paired=True)["fd_toy_interval"]
  assert abs(same["low"]) < 1e-6 and abs(same["high"]) < 1e-6
  unpaired = feature_nets.feature_metrics(toy, originals, originals, k=3, batch_size=32,
                                          interval_resamples=100)["fd_toy_interval"]
  # resampling one side alone has spread (and, the sets being the same images, no bias for
  # the basic interval to remove: it lies below 0)
  assert unpaired["high"] - unpaired["low"] > 1e-3 and unpaired["high"] < 0
