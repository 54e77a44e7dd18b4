"""The DiT and UNet on one accelerator: bf16 MFU, sampling speed, the PyTorch peer, GPU = CPU.

  python -m experiments.benchmarks.gpu_dit --out=results/dit/gpu_dit.json    # on one GPU

One script, meant to finish in under 8 minutes on one GPU (most of it compilation), that
writes one JSON with every field below (None where a part cannot run, with the reason):

* dit_train: the DiT-B/2 train step (dit_steps.py: rectified-flow MSE, label dropout,
  AdamW; one jit, donated state) in bf16 on 32 x 32 x 4 latents at batch 256 (DiT's):
  seconds per step, images/s, XLA cost-analysis FLOPs, MFU against the device's dense bf16
  peak (mfu.py's table; on CPU its measured float32 matmul peak).
* unet_train: the 60M UNet's real `train.train_step` (configs/imagenet64_60m.py, 64 x 64,
  batch 256, bf16), timed by mfu.py as bench_train.py does.
* dit_sampling: 50 Euler steps of the same DiT in one jit, images/s.
* torch_peer: the PyTorch reference DiT (torch_dit.py) on CUDA with bf16 autocast, the same
  weights: its train step and sampling, alternating with ours (--reps), their medians and
  ours_over_torch, its MFU from our FLOP count, and the forward difference from ours in
  float32 on the device. Runs when torch with CUDA is installed (--torch_device=cpu forces
  the CPU, as --tiny does).
* agreement: the same parameters and inputs through the DiT forward pass on the CPU and on
  the default device (float32 at 'highest' and default matmul precision, bf16): max abs
  difference and the output's scale.

`--tiny`: a 2-block DiT at 8 x 8, the test config's UNet, batch 2, 2 sampling steps, the
peer on torch's CPU; it runs on CPU in the test suite (tests/test_dit_peer.py).
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from experiments.benchmarks import dit_steps
from experiments.benchmarks import mfu

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_string("model", "B2", "DiT size and patch (models/dit.py's SIZES; T: tiny).")
flags.DEFINE_string("dtype", "bfloat16", "Compute dtype of the timed steps.")
flags.DEFINE_integer("image_size", 32, "Latent side (DiT's ImageNet 256: 32).")
flags.DEFINE_integer("channels", 4, "Latent channels.")
flags.DEFINE_integer("num_classes", 1000, "Classes.")
flags.DEFINE_integer("batch", 256, "DiT train and sampling batch.")
flags.DEFINE_string("unet_config", "imagenet64_60m", "The UNet's config (mfu.SIZES names).")
flags.DEFINE_integer("unet_batch", 256, "The UNet's train batch.")
flags.DEFINE_integer("steps", 10, "Timed train steps per repetition.")
flags.DEFINE_integer("sample_steps", 50, "Euler steps of a sampling run.")
flags.DEFINE_integer("reps", 3, "Alternating repetitions (ours, torch) of each timed part.")
flags.DEFINE_string("torch_device", "cuda", "Where the PyTorch peer runs (cuda: only if "
                    "available; cpu: always, if torch is installed).")
flags.DEFINE_float("peak_tflops", 0.0, "Override the device peak (TFLOP/s).")
common.define_tiny(dict(model="T2", image_size=8, num_classes=10, batch=2, unet_config="test",
                        unet_batch=2, steps=1, sample_steps=2, reps=1, torch_device="cpu"))


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def summary(times) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times)}


def our_parts(model, params, shape, b):
  """Our compiled train step (and its state) and sampler, with their compile times."""
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.uniform(-1, 1, (b, *shape)), jnp.float32)
  y = jnp.asarray(np.arange(b) % FLAGS.num_classes, jnp.int32)
  z0 = jnp.asarray(rng.standard_normal((b, *shape)), jnp.float32)
  tx = dit_steps.optimizer()
  state = {"params": params, "opt": jax.jit(tx.init)(params), "step": 0}
  step = dit_steps.ours_train_step(model, tx, jax.random.key(2))
  t0 = time.perf_counter()
  compiled = step.lower(state["params"], state["opt"], x, y, 0).compile()
  train_compile = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  flops = float((cost[0] if isinstance(cost, (list, tuple)) else cost)["flops"])

  def train(k):
    for _ in range(k):
      state["params"], state["opt"], loss = compiled(state["params"], state["opt"], x, y,
                                                     state["step"])
      state["step"] += 1
    jax.block_until_ready(loss)

  sampler = dit_steps.ours_sampler(model, FLAGS.sample_steps)
  sample_params = jax.tree.map(jnp.copy, params)           # the train step donates `params`
  t0 = time.perf_counter()
  sample_compiled = sampler.lower(sample_params, z0, y).compile()
  sample_compile = time.perf_counter() - t0
  sample = lambda: jax.block_until_ready(sample_compiled(sample_params, z0, y))
  return train, sample, flops, train_compile, sample_compile, (x, y, z0)


def torch_peer(model, params, data, flops, peak, train, sample) -> dict:
  """The reference DiT in PyTorch on --torch_device, alternating with ours."""
  fields = ["device", "train_step_seconds", "train_mfu", "ours_over_torch_train",
            "ours_train_step_seconds_alternating", "sampling_seconds", "sampling_images_per_s",
            "ours_over_torch_sampling", "ours_sampling_seconds_alternating",
            "max_abs_diff_flax_vs_torch_float32", "output_scale"]
  out = {"available": False, "reason": "", **{k: None for k in fields}}
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    out["reason"] = "torch is not installed (pip install -e '.[bench]')"
    return out
  if FLAGS.torch_device == "cuda" and not torch.cuda.is_available():
    out["reason"] = f"torch {torch.__version__} has no CUDA device"
    return out
  from experiments.benchmarks import torch_dit  # pylint: disable=import-outside-toplevel
  device = torch.device(FLAGS.torch_device)
  x, y, z0 = (np.array(a) for a in data)                   # writable copies for torch
  tmodel = torch_dit.from_flax_model(model, FLAGS.image_size, FLAGS.channels)
  torch_dit.load_flax_params(tmodel, params)
  tmodel = tmodel.to(device).eval()
  f32 = model.clone(dtype=jnp.float32)
  t = np.linspace(0.1, 0.9, len(y)).astype(np.float32)
  ours = np.asarray(f32.apply({"params": params}, x, t, y))
  with torch.no_grad():
    th = torch_dit.velocity(tmodel, x, t, y)
  out["max_abs_diff_flax_vs_torch_float32"] = float(np.abs(ours - th).max())
  out["output_scale"] = float(np.abs(ours).max())

  sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device)
  zt = torch.from_numpy(z0).permute(0, 3, 1, 2).contiguous().to(device)
  yt = torch.from_numpy(y).long().to(device)
  opt = dit_steps.torch_optimizer(tmodel)

  def torch_train(k):
    tmodel.train()
    for _ in range(k):
      dit_steps.torch_train_step(tmodel, opt, xt, yt, FLAGS.dtype)
    sync()

  def torch_sample():
    tmodel.eval()
    dit_steps.torch_sample(tmodel, zt, yt, FLAGS.sample_steps, FLAGS.dtype)
    sync()

  torch_train(1)
  torch_sample()                                                # warm-up
  o_train, t_train, o_sample, t_sample = [], [], [], []
  for _ in range(FLAGS.reps):
    o_train.append(timed(lambda: train(FLAGS.steps)) / FLAGS.steps)
    t_train.append(timed(lambda: torch_train(FLAGS.steps)) / FLAGS.steps)
    o_sample.append(timed(sample))
    t_sample.append(timed(torch_sample))
  tt, ts = statistics.median(t_train), statistics.median(t_sample)
  out.update({"available": True, "reason": f"torch {torch.__version__} on {device}",
              "device": (torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
              "train_step_seconds": tt, "train_mfu": flops / tt / peak,
              "ours_train_step_seconds_alternating": statistics.median(o_train),
              "ours_over_torch_train": statistics.median(o_train) / tt,
              "sampling_seconds": ts, "sampling_images_per_s": len(y) / ts,
              "ours_sampling_seconds_alternating": statistics.median(o_sample),
              "ours_over_torch_sampling": statistics.median(o_sample) / ts})
  return out


def agreement(model, params) -> dict:
  """The DiT forward pass on the CPU and on the default device, same parameters and inputs."""
  cpu, dev = jax.devices("cpu")[0], jax.devices()[0]
  rng = np.random.default_rng(4)
  b = 2
  x = rng.standard_normal((b, FLAGS.image_size, FLAGS.image_size, FLAGS.channels))
  t = np.array([0.2, 0.9], np.float32)
  y = np.array([3 % FLAGS.num_classes, FLAGS.num_classes], np.int32)
  args = (x.astype(np.float32), t, y)

  def run(m, device, precision=None):
    put = lambda a: jax.device_put(a, device)
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
      f = jax.jit(lambda p, *a: m.apply({"params": p}, *a))
      return np.asarray(f(put(params), *map(put, args)))

  f32, low = model.clone(dtype=jnp.float32), model.clone(dtype=jnp.dtype(FLAGS.dtype))
  ref = run(f32, cpu, "highest")
  return {"cpu": cpu.device_kind, "default_device": dev.device_kind, "batch": b,
          "output_scale": float(np.abs(ref).max()),
          "max_abs_diff_float32_highest": float(np.abs(run(f32, dev, "highest") - ref).max()),
          "max_abs_diff_float32_default": float(np.abs(run(f32, dev) - ref).max()),
          f"max_abs_diff_{FLAGS.dtype}": float(np.abs(run(low, dev) - run(low, cpu)).max())}


def main(argv):
  del argv
  size, patch = FLAGS.model[:-1], int(FLAGS.model[-1])
  shape = (FLAGS.image_size, FLAGS.image_size, FLAGS.channels)
  b = FLAGS.batch
  results = {"device": jax.devices()[0].device_kind, "platform": jax.default_backend(),
             "jax": jax.__version__, "dtype": FLAGS.dtype, "tiny": bool(FLAGS.tiny)}
  model = dit_steps.make_model(size, patch, FLAGS.channels, FLAGS.num_classes, FLAGS.dtype)
  params = dit_steps.random_params(model, shape, jax.random.key(0))
  host_params = jax.device_get(params)                     # for the peer and the CPU check
  peak, peak_source = mfu.device_peak(FLAGS.dtype, FLAGS.peak_tflops)
  train, sample, flops, train_compile, sample_compile, data = our_parts(model, params, shape, b)
  train(1)
  sample()                                                 # warm-up
  step_s = min(timed(lambda: train(FLAGS.steps)) / FLAGS.steps for _ in range(FLAGS.reps))
  sample_s = min(timed(sample) for _ in range(FLAGS.reps))
  name = f"DiT-{size}/{patch}"
  results["dit_train"] = {
      "model": name, "batch": b, "image": list(shape), "params": dit_steps.count(host_params),
      "step_seconds": step_s, "images_per_s": b / step_s, "gflops_per_step": flops / 1e9,
      "achieved_tflops": flops / step_s / 1e12, "peak_tflops": peak / 1e12,
      "peak_source": peak_source, "mfu": flops / step_s / peak, "compile_s": train_compile}
  results["dit_sampling"] = {"model": name, "batch": b, "steps": FLAGS.sample_steps,
                             "seconds": sample_s, "images_per_s": b / sample_s,
                             "compile_s": sample_compile}
  print("dit", json.dumps([results["dit_train"], results["dit_sampling"]]), flush=True)
  results["torch_peer"] = torch_peer(model, host_params, data, flops, peak, train, sample)
  print("torch_peer", json.dumps(results["torch_peer"]), flush=True)
  results["unet_train"] = {"config": FLAGS.unet_config, **mfu.unet_train_step(
      FLAGS.unet_config, FLAGS.dtype, FLAGS.unet_batch, FLAGS.steps, FLAGS.peak_tflops)}
  print("unet", json.dumps(results["unet_train"]), flush=True)
  results["agreement"] = agreement(model, host_params)
  print("agreement", json.dumps(results["agreement"]), flush=True)
  common.write_json(FLAGS.out, results)


if __name__ == "__main__":
  common.run(main, required=("out",))
