"""Model FLOPs utilisation: device peaks and the UNet train step's timed MFU.

Shared by bench_train.py and gpu_dit.py (no flags here, so both can import it).
MFU = XLA cost-analysis FLOPs of one compiled step / step time / peak FLOP/s. Peaks: a
table of accelerators (dense bf16 / f32 spec-sheet numbers); on CPU (or an unknown
device) the peak is *measured* as the best float32 matmul throughput, and named as such.
"""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp

from asyncpatch_jax.training import train
from experiments import common

SIZES = {"test": (16, 16, 1), "default": (16, 16, 1), "imagenet64_60m": (64, 64, 3),
         "imagenet64_620m": (64, 64, 3)}
# Dense peak TFLOP/s (bf16, f32) from the vendors' spec sheets.
PEAKS = {"TPU v4": (275, 275), "TPU v5 lite": (197, 197), "TPU v5e": (197, 197),
         "TPU v5p": (459, 459), "TPU v6 lite": (918, 918), "TPU v6e": (918, 918),
         "NVIDIA H100": (989, 67), "NVIDIA H200": (989, 67), "NVIDIA A100": (312, 19.5)}


def device_peak(dtype: str, peak_tflops: float = 0.0) -> tuple[float, str]:
  """Peak FLOP/s of jax's first device for `dtype`, and where it comes from (`peak_tflops`:
  a given value)."""
  if peak_tflops:
    return peak_tflops * 1e12, "given"
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


def unet_train_step(name: str, dtype: str, batch: int, steps: int,
                    peak_tflops: float = 0.0) -> dict:
  """The real `train.train_step` (donated state, one jit) of config `name` on one device:
  seconds per step over `steps` timed steps after a warm-up, FLOPs and MFU."""
  config = common.load_config(name)
  with config.unlocked():
    config.model.dtype = dtype
    config.train.batch_size = batch
    config.train.fsdp = 1
  # Only the image shape of the dataset is needed.
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
  for _ in range(steps):
    state, m = compiled(state, batch_data)
  jax.block_until_ready(state)
  dt = (time.perf_counter() - t) / steps
  peak, source = device_peak(dtype, peak_tflops)
  return {"batch": batch, "step_seconds": dt, "images_per_s": batch / dt,
          "gflops_per_step": flops / 1e9, "achieved_tflops": flops / dt / 1e12,
          "peak_tflops": peak / 1e12, "peak_source": source, "mfu": flops / dt / peak}
