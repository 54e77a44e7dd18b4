"""Train-step throughput and model FLOPs utilisation (MFU), float32 and bfloat16.

  python -m experiments.benchmarks.bench_train --out=results/bench/bench_train.json
  python -m experiments.benchmarks.bench_train --out=gpu.json --configs=imagenet64_60m \
      --dtypes=bfloat16 --batch=imagenet64_60m:256          # on a GPU/TPU

MFU = XLA cost-analysis FLOPs of one compiled train step / step time / peak FLOP/s.
Peaks: a table of accelerators (dense bf16 / f32 spec-sheet numbers); on CPU the
peak is *measured* as the best float32 matmul throughput, and named as such.
The step is the real `train.train_step` (donated state, one jit) on one device
(experiments/benchmarks/mfu.py, shared with gpu_dit.py). `--tiny`:
the test config in float32 at batch 8, one step.
"""

from __future__ import annotations

import json

from absl import flags
import jax

from experiments import common
from experiments.benchmarks import mfu

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_list("configs", ["default", "imagenet64_60m"], "Configs to measure.")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes.")
flags.DEFINE_list("batch", ["default:64", "imagenet64_60m:8"], "config:batch pairs.")
flags.DEFINE_integer("steps", 5, "Timed steps (after one warm-up step).")
flags.DEFINE_float("peak_tflops", 0.0, "Override the device peak (TFLOP/s).")
common.define_tiny(dict(configs=["test"], dtypes=["float32"], steps=1, batch=["test:8"]))


def bench(name: str, dtype: str, batch: int) -> dict:
  out = mfu.unet_train_step(name, dtype, batch, FLAGS.steps, FLAGS.peak_tflops)
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
