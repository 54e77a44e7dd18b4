"""Train-step throughput and model FLOPs utilisation (MFU), float32 and bfloat16.

  python -m experiments.benchmarks.bench_train --out=results/bench/bench_train.json
  python -m experiments.benchmarks.bench_train --out=gpu.json --configs=imagenet64_60m \
      --dtypes=bfloat16 --batch=imagenet64_60m:256          # on a GPU/TPU

MFU = XLA cost-analysis FLOPs of one compiled train step / step time / peak FLOP/s.
Peaks: a table of accelerators (dense bf16 / f32 spec-sheet numbers); on CPU the
peak is *measured* as the best float32 matmul throughput, and named as such.
The step is the real `train.train_step` (donated state, one jit) on one device. `--tiny`:
the test config in float32 at batch 8, one step.
"""

from __future__ import annotations

import functools
import json
import time

from absl import flags
import jax
import jax.numpy as jnp

from asyncpatch_jax.training import train
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_list("configs", ["default", "imagenet64_60m"], "Configs to measure.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
flags.DEFINE_list("batch", ["default:64", "imagenet64_60m:8"], "config:batch pairs.")
flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")
flags.DEFINE_float("peak_tflops", 0.0, "Override the device peak (TFLOP/s).")
common.define_tiny(dict(configs=["test"], dtypes=["float32"], steps=1, batch=["test:8"]))

SIZES = {"test": (16, 16, 1), "default": (16, 16, 1), "imagenet64_60m": (64, 64, 3), "imagenet64_620m": (64, 64, 3)}
# Dense peak TFLOP/s (bf16, f32) from the vendors' spec sheets.
PEAKS = {"TPU v4": (275, 275), "TPU v5 lite": (197, 197), "TPU v5e": (197, 197),
         "TPU v5p": (459, 459), "TPU v6 lite": (918, 918), "TPU v6e": (918, 918),
         "NVIDIA H100": (989, 67), "NVIDIA H200": (989, 67), "NVIDIA A100": (312, 19.5)}


def device_peak(dtype: str) -> tuple[float, str]:
  if FLAGS.peak_tflops:
    return FLAGS.peak_tflops * 1e12, "given"
  kind = jax.devices()[0].device_kind
  for name, (bf16, f32) in PEAKS.items():
    if kind.startswith(name) or name in kind:
      return (bf16 if dtype == "bfloat16" else f32) * 1e12, f"spec sheet ({name})"
  return measured_matmul_peak(), "measured float32 matmul peak"


@functools.cache
def measured_matmul_peak() -> float:
  """CPU (or unknown device): the best float32 matmul throughput, measured once."""
  n = 2048
  a = jnp.ones((n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  best = 0.0
  for _ in range(10):
    t = time.perf_counter()
    f(a).block_until_ready()
    best = max(best, 2 * n ** 3 / (time.perf_counter() - t))
  return best


def bench(name: str, dtype: str, batch: int) -> dict:
  config = common.load_config(name)
  with config.unlocked():
    config.model.dtype = dtype
    config.train.batch_size = batch
    config.train.fsdp = 1
  # The real train step; only the image shape of the dataset is needed.
  setup = train.Setup(config, devices=jax.devices()[:1], image_shape=SIZES[name])
  state = jax.jit(setup.init_state)(jax.random.key(0))
  h, w, c = SIZES[name]
  batch_data = {"image": jax.random.uniform(jax.random.key(1), (batch, h, w, c), minval=-1),
                "label": jnp.zeros((batch,), jnp.int32)}
  step = jax.jit(functools.partial(train.train_step, setup=setup, root_key=jax.random.key(2)),
                 donate_argnums=(0,))
  compiled = step.lower(state, batch_data).compile()
  flops = compiled.cost_analysis()["flops"]
  state, m = compiled(state, batch_data)
  jax.block_until_ready(state)
  t = time.perf_counter()
  for _ in range(FLAGS.steps):
    state, m = compiled(state, batch_data)
  jax.block_until_ready(state)
  dt = (time.perf_counter() - t) / FLAGS.steps
  peak, source = device_peak(dtype)
  out = {"batch": batch, "step_seconds": dt, "images_per_s": batch / dt,
         "gflops_per_step": flops / 1e9, "achieved_tflops": flops / dt / 1e12,
         "peak_tflops": peak / 1e12, "peak_source": source, "mfu": flops / dt / peak}
  print(name, dtype, json.dumps(out), flush=True)
  return out


def main(argv):
  del argv
  batches = dict(item.split(":") for item in FLAGS.batch)
  results = {"device": jax.devices()[0].device_kind, "results": {}}
  for name in FLAGS.configs:
    for dtype in FLAGS.dtypes:
      results["results"][f"{name}/{dtype}"] = bench(name, dtype, int(batches.get(name, 8)))
  common.write_json(FLAGS.out, results)


if __name__ == "__main__":
  common.run(main, required=("out",))
