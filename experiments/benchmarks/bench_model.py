"""Cost of per-pixel vs per-image time conditioning, and sampler throughput, side by side.

  python -m experiments.benchmarks.bench_model --out=results/bench/bench_model.json

For the default config (16x16x1) and the paper's 60M config (64x64x3), batch 8: the
XLA cost-analysis FLOPs and the wall time of one forward pass with a per-pixel time
map [B, H, W] and with a per-image time [B] (same parameters, same compiled shapes
otherwise), and the compiled sampler's steps/s (per-pixel schedule, batch 8). `--tiny`: the
test config, one repetition.
"""

from __future__ import annotations

import json
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.diffusion import guidance
from asyncpatch_jax import models
from asyncpatch_jax.diffusion import samplers
from asyncpatch_jax.diffusion import schedules
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_integer("batch", 8, "Batch size.")
flags.DEFINE_integer("repeats", 3, "Timed repetitions (median).")
flags.DEFINE_integer("sampler_steps", 8, "Steps of the timed sampler run.")
flags.DEFINE_list("configs", ["default", "imagenet64_60m"], "Configs to measure.")
common.define_tiny(dict(configs=["test"], repeats=1))

SIZES = {"test": 16, "default": 16, "imagenet64_60m": 64}


def _median_time(fn, *args):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(FLAGS.repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def bench(name: str) -> dict:
  config = common.load_config(name)
  model = models.build_model(config.model)
  hw, c, b = SIZES[name], config.model.out_channels, FLAGS.batch
  params = models.init_params(model, jax.random.key(0), (hw, hw, c))
  z = jax.random.normal(jax.random.key(1), (b, hw, hw, c))
  y = jnp.zeros((b,), jnp.int32) if model.num_classes else None
  t_img = jax.random.uniform(jax.random.key(2), (b,))
  t_map = jax.random.uniform(jax.random.key(3), (b, hw, hw))
  apply = jax.jit(lambda p, z, t: model.apply({"params": p}, z, t, y))
  out = {}
  for kind, t in (("per_pixel", t_map), ("per_image", t_img)):
    compiled = apply.lower(params, z, t).compile()
    out[f"{kind}_gflops"] = compiled.cost_analysis()["flops"] / 1e9
    out[f"{kind}_seconds"] = _median_time(compiled, params, z, t)
  sampler = samplers.Sampler(guidance.model_velocity_fn(model), mesh=None)
  mask = np.zeros((hw, hw)); mask[:, : hw // 2] = 1
  tau = schedules.progressive(mask, 2, FLAGS.sampler_steps // 2)
  cond = {"params": params, **({"y": y} if y is not None else {})}
  run = lambda: sampler(tau, key=jax.random.key(4), x=z, eta=0.25, **cond)
  seconds = _median_time(run)
  out["sampler_steps_per_s"] = FLAGS.sampler_steps / seconds
  out["params"] = int(sum(x.size for x in jax.tree.leaves(params)))
  print(name, json.dumps(out))
  return out


def main(argv):
  del argv
  results = {name: bench(name) for name in FLAGS.configs}
  summary = {
      "device": str(jax.devices()[0].device_kind), "batch": FLAGS.batch,
      "per_pixel_over_per_image_flops": {
          k: v["per_pixel_gflops"] / v["per_image_gflops"] for k, v in results.items()},
      "per_pixel_over_per_image_time": {
          k: v["per_pixel_seconds"] / v["per_image_seconds"] for k, v in results.items()},
      "sampler_steps_per_s": {k: v["sampler_steps_per_s"] for k, v in results.items()},
      "details": results,
  }
  common.write_json(FLAGS.out, summary)
  print(json.dumps({k: summary[k] for k in list(summary)[:5]}, indent=2))


if __name__ == "__main__":
  common.run(main, required=("out",))
