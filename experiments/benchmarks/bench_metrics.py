"""Metric throughput and the cost of RePaint vs AsyncPatch inpainting, side by side in one run.

  python -m experiments.benchmarks.bench_metrics --out=results/evaluation/bench_metrics.json

Measured on the default device (wall time of compiled calls, median of --repeats, compile
excluded and reported apart; the Frechet distance also in process CPU seconds, which a
shared machine does not inflate):
  - feature extraction, images/s: FID Inception-v3 (64x64 inputs resized to 299),
    LPIPS-AlexNet and LPIPS-VGG (64x64 pairs), the digit features (16x16); the networks
    run on seeded random weights (throughput does not depend on the values);
  - the Frechet distance of two 2048-d statistics in float64 (this library's symmetric
    eigendecomposition trace; pytorch-fid's `scipy.linalg.sqrtm` formula beside it), and
    the streaming statistics of 10k x 2048 features;
  - PRDC of 10k x 10k 2048-d features (k = 5), blockwise;
  - inpainting a batch with the default digits UNet (configs/default.py, random
    weights): AsyncPatch inpainting (Eq. 4 schedule, one network evaluation a step) at
    the config's step count and at RePaint's 250, and RePaint with its defaults
    (250 / 10 / 10: 2410 network evaluations); network evaluations and seconds per image.
`--tiny`: small sizes, the digit features only, the test config, RePaint 8 / 2 / 2.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

from asyncpatch_jax import models
from asyncpatch_jax.data import datasets
from asyncpatch_jax.data import masks
from asyncpatch_jax.diffusion import guidance
from asyncpatch_jax.diffusion import repaint
from asyncpatch_jax.diffusion import samplers
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.evaluation import digit_classifier
from asyncpatch_jax.evaluation import inception
from asyncpatch_jax.evaluation import lpips
from asyncpatch_jax.evaluation import metrics
from asyncpatch_jax.evaluation import weights_file
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")
flags.DEFINE_integer("feature_batch", 16, "Batch of the Inception / LPIPS throughput.")
flags.DEFINE_integer("prdc_n", 10000, "Samples per set of the PRDC benchmark.")
flags.DEFINE_integer("dim", 2048, "Feature width of the Frechet/PRDC benchmarks.")
flags.DEFINE_integer("inpaint_batch", 8, "Batch of the inpainting cost benchmark.")
flags.DEFINE_list("repaint", ["250", "10", "10"], "RePaint num_steps, jump_length, jump_n_sample.")
flags.DEFINE_string("config", "configs/default.py", "Model config of the inpainting benchmark.")
flags.DEFINE_integer("compare_steps", 250, "AsyncPatch steps set beside RePaint (its t_T).")
flags.DEFINE_list("feature_nets", ["inception", "alex", "vgg", "digits"], "Feature networks timed.")
# The Frechet distance (LAPACK on the host) runs first: after JAX work, XLA's CPU thread
# pool competes with OpenBLAS's threads and the same call measured 10x slower here.
flags.DEFINE_list("parts", ["frechet", "features", "prdc", "inpainting"],
                  "Parts to run; the others are kept from an existing --out file.")
common.define_tiny(dict(prdc_n=200, dim=32, repaint=["8", "2", "2"], feature_batch=1,
                        repeats=1, feature_nets=["digits"], config="configs/test.py",
                        compare_steps=8))


def _median(fn, repeats=None):
  jax.block_until_ready(fn())
  times = []
  for _ in range(repeats or FLAGS.repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def _random_weights(expected, seed):
  rng = np.random.default_rng(seed)
  return {k: (rng.normal(0, np.sqrt(2.0 / np.prod(s[1:])), s) if len(s) == 4 else
              rng.uniform(0.5, 1.5, s)).astype(np.float32) for k, s in expected.items()}


def bench_features() -> dict:
  b = FLAGS.feature_batch
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.uniform(-1, 1, (b, 64, 64, 3)), jnp.float32)
  y = jnp.asarray(rng.uniform(-1, 1, (b, 64, 64, 3)), jnp.float32)
  out = {}
  if "inception" in FLAGS.feature_nets:
    net = inception.InceptionFeatures(weights_file.load_variables(
        _random_weights(inception.expected_tensors(), 0), inception.variable_shapes(), "inception"))
    out["inception_images_per_s"] = b / _median(lambda: net(x))
  for name in [n for n in ("alex", "vgg") if n in FLAGS.feature_nets]:
    dist = lpips.LPIPSDistance(weights_file.load_variables(
        _random_weights(lpips.expected_tensors(name), 1), lpips.variable_shapes(name), name), name)
    out[f"lpips_{name}_pairs_per_s"] = b / _median(lambda: dist(x, y))
  params = digit_classifier.DigitClassifier().init(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))["params"]
  digits = jnp.asarray(rng.uniform(-1, 1, (256, 16, 16, 1)), jnp.float32)
  out["digit_features_images_per_s"] = 256 / _median(lambda: digit_classifier.features(params, digits))
  out["feature_batch"] = b
  print("features", json.dumps(out))
  return out


def bench_frechet() -> dict:
  d, rng = FLAGS.dim, np.random.default_rng(1)
  stats = []
  for i in range(2):
    a = rng.normal(size=(d, d)) / np.sqrt(d)
    stats.append((rng.normal(size=d) * 0.1 * i, a @ a.T + 0.01 * np.eye(d)))
  (mu1, c1), (mu2, c2) = stats
  ours = _median(lambda: metrics.frechet_distance(mu1, c1, mu2, c2))

  def sqrtm_formula():   # pytorch-fid's calculate_frechet_distance (without its eps retry)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(c1) + np.trace(c2) - 2 * np.trace(covmean))

  t, cpu = time.perf_counter(), time.process_time()
  value = metrics.frechet_distance(mu1, c1, mu2, c2)
  ours_cpu = time.process_time() - cpu
  t = time.perf_counter()
  ref_value = sqrtm_formula()
  sqrtm_seconds = time.perf_counter() - t
  feats = rng.normal(size=(10000, d)).astype(np.float32)
  t = time.perf_counter()
  st = metrics.FeatureStats()
  for i in range(0, len(feats), 500):
    st.update(feats[i:i + 500])
  st.mean_cov()
  out = {"frechet_seconds": ours, "frechet_cpu_seconds": ours_cpu, "frechet_value": value, "sqrtm_formula_seconds": sqrtm_seconds,
         "sqrtm_formula_value": ref_value, "streaming_stats_10k_seconds": time.perf_counter() - t,
         "dim": d}
  print("frechet", json.dumps(out))
  return out


def bench_prdc() -> dict:
  n, d, rng = FLAGS.prdc_n, FLAGS.dim, np.random.default_rng(2)
  real = rng.normal(size=(n, d)).astype(np.float32)
  fake = rng.normal(size=(n, d)).astype(np.float32)        # the same law: PRDC near 1
  t = time.perf_counter()
  value = metrics.prdc(real, fake, k=5)
  first = time.perf_counter() - t
  seconds = _median(lambda: metrics.prdc(real, fake, k=5), repeats=1)
  out = {"prdc_seconds": seconds, "prdc_first_call_seconds": first, "n": n, "dim": d,
         "block_rows": 1024, "largest_block_mb": 1024 * n * 4 / 2 ** 20, **value}
  print("prdc", json.dumps(out))
  return out


def bench_inpainting() -> dict:
  config = common.load_config(FLAGS.config)
  model = models.build_model(config.model)
  h, w, c = datasets.get_dataset(config.data.dataset, "test").image_shape
  b = FLAGS.inpaint_batch
  params = models.init_params(model, jax.random.key(0), (h, w, c))
  cond = {"params": params}
  if model.num_classes:
    cond["y"] = jnp.full((b,), model.null_label, jnp.int32)
  x = jnp.asarray(np.random.default_rng(3).uniform(-1, 1, (b, h, w, c)), jnp.float32)
  mask = masks.make_masks("square", 1, h, w)[0]
  fn = guidance.model_velocity_fn(model)
  out = {"batch": b, "image_shape": [h, w, c], "config": FLAGS.config}

  def timed(run, args):
    t = time.perf_counter()
    compiled = run.lower(*args).compile()
    compile_s = time.perf_counter() - t
    seconds = _median(lambda: compiled(*args), repeats=1)
    return compile_s, seconds

  sample_loop = jax.jit(lambda tau, x, key, eta, cond: samplers.sample_loop(fn, tau, x, key, eta, cond))
  for steps in sorted({config.sample.num_steps, FLAGS.compare_steps}):
    tau = jnp.asarray(schedules.inpainting(mask, steps), jnp.float32)
    compile_s, seconds = timed(sample_loop, (tau, x, jax.random.key(1), jnp.float32(0.25), cond))
    out[f"asyncpatch_{steps}"] = {"network_evals": steps, "seconds_per_image": seconds / b,
                                  "compile_seconds": compile_s}
    print(f"asyncpatch inpainting {steps} steps", json.dumps(out[f"asyncpatch_{steps}"]))
  ns, jl, jn = (int(v) for v in FLAGS.repaint)
  ts = repaint.jump_schedule(ns, jl, jn)
  times = jnp.asarray(repaint.schedule_times(ts, ns))
  loop = jax.jit(lambda t, x, m, key, eta, cond: repaint.repaint_loop(fn, t, x, m, key, eta, cond))
  m = jnp.asarray(np.broadcast_to(mask, (b, h, w)))
  compile_s, seconds = timed(loop, (times, x, m, jax.random.key(2), jnp.float32(1.0), cond))
  out["repaint"] = {"params": [ns, jl, jn], "network_evals": repaint.num_model_steps(ts),
                    "renoise_steps": int(np.sum(ts[1:] > ts[:-1])),
                    "seconds_per_image": seconds / b, "compile_seconds": compile_s}
  print("repaint", json.dumps(out["repaint"]))
  ref = out[f"asyncpatch_{FLAGS.compare_steps}"]
  out["repaint_over_asyncpatch"] = {"asyncpatch_steps": FLAGS.compare_steps,
      "network_evals": out["repaint"]["network_evals"] / ref["network_evals"],
      "seconds": out["repaint"]["seconds_per_image"] / ref["seconds_per_image"]}
  return out


def main(argv):
  del argv
  parts = {"features": bench_features, "frechet": bench_frechet, "prdc": bench_prdc,
           "inpainting": bench_inpainting}
  results = {}
  if os.path.exists(FLAGS.out) and set(FLAGS.parts) != set(parts):
    with open(FLAGS.out) as f:
      results = json.load(f)
    for key in ("command", "wall_seconds"):       # this run's, not the kept parts'
      results.pop(key, None)
  results["device"] = str(jax.devices()[0].device_kind)
  for name in FLAGS.parts:
    results[name] = parts[name]()
  common.write_json(FLAGS.out, results)
  print(_table(results))


def _table(results: dict) -> str:
  rows = ["| quantity | value |", "|---|---|"]
  for k, v in results.get("features", {}).items():
    rows.append(f"| {k} | {v:.1f} |")
  if "frechet" in results:
    fr = results["frechet"]
    rows.append(f"| Frechet distance {fr['dim']}-d, float64 | {fr['frechet_seconds']:.2f} s wall, "
                f"{fr['frechet_cpu_seconds']:.2f} s CPU (scipy sqrtm formula "
                f"{fr['sqrtm_formula_seconds']:.2f} s wall) |")
  if "prdc" in results:
    pr = results["prdc"]
    rows.append(f"| PRDC {pr['n']} x {pr['n']} x {pr['dim']}, k = 5 | {pr['prdc_seconds']:.1f} s |")
  inp = results.get("inpainting", {})
  for k in sorted(inp):
    if k.startswith("asyncpatch_") or k == "repaint":
      rows.append(f"| inpainting, {k}: network evaluations, s per image | "
                  f"{inp[k]['network_evals']}, {inp[k]['seconds_per_image']:.3f} |")
  if "repaint_over_asyncpatch" in inp:
    r = inp["repaint_over_asyncpatch"]
    rows.append(f"| RePaint / AsyncPatch ({r['asyncpatch_steps']} steps): evaluations, time | "
                f"{r['network_evals']:.2f}x, "
                f"{r['seconds']:.2f}x |")
  return "\n".join(rows)


if __name__ == "__main__":
  common.run(main, required=("out",))
