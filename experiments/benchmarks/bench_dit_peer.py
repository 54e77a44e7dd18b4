"""Our DiT against the PyTorch reference DiT, side by side in one process (train steps, sampling).

  pip install -e '.[bench]'
  python -m experiments.benchmarks.bench_dit_peer --out=results/dit/dit_peer.json

The peer is `torch_dit.py` (next to this file): facebookresearch/DiT's `models.py` ported to
PyTorch (adaLN-Zero, a per-image time, no learned sigma, NCHW). For each case our flax
parameters (models/dit.py), with every leaf perturbed (adaLN-Zero starts at zero), are
copied into it, the parameter counts must match and the outputs must agree (max abs
difference, checked against 1e-4 of the output's scale) before anything is timed. The
work on both sides is dit_steps.py's:

* train_S2, train_B2: one train step of DiT-S/2 / DiT-B/2 (forward, backward, AdamW;
  rectified-flow MSE, one time per image, label dropout 0.1): ours one jit with donated
  parameters and optimizer state, torch eager.
* sample_S2: 50 Euler steps of DiT-S/2 with given labels: ours one `lax.fori_loop` in one
  jit, torch a Python loop under `torch.inference_mode`. Both start from the same noise,
  and their samples are compared too.

Inputs are DiT's ImageNet-256 latents, 32 x 32 x 4 (256 tokens at p = 2), 1000 classes,
float32, a CPU-sized batch (--batch, --sample_batch; data are random: values do not change
the cost). Ours runs on the library's CPU default (sharding.configure_cpu_devices: XLA:CPU
host devices from the core count, the batch split over them; --host_devices overrides);
PyTorch with one intra-op thread per available core (--threads), no torch.compile.
Repetitions alternate (ours, torch, ours, ...), medians and spreads are reported, compile
time apart, and the 1-minute load average around every case (the machine is shared).
`ours_over_torch_time` < 1 means we are faster. `--tiny`: a 2-block DiT at 8 x 8, one
repetition, 2 sampling steps.
"""

from __future__ import annotations

import json
import os
import statistics
import time

from absl import flags
import jax
import numpy as np

from asyncpatch_jax.runtime import sharding
from experiments import common
from experiments.benchmarks import dit_steps

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_list("cases", ["train_S2", "train_B2", "sample_S2"],
                  "What to measure: train_<size><patch> or sample_<size><patch> (sizes: "
                  "models/dit.py's SIZES).")
flags.DEFINE_integer("reps", 5, "Timed repetitions per stack (alternating).")
flags.DEFINE_integer("train_steps", 1, "Train steps per timed repetition.")
flags.DEFINE_integer("batch", 8, "Train batch.")
flags.DEFINE_integer("sample_batch", 4, "Sampling batch.")
flags.DEFINE_integer("sample_steps", 50, "Euler steps of a sampling run.")
flags.DEFINE_integer("image_size", 32, "Latent side (DiT's ImageNet 256: 32).")
flags.DEFINE_integer("channels", 4, "Latent channels (DiT's: 4).")
flags.DEFINE_integer("num_classes", 1000, "Classes (DiT's ImageNet: 1000).")
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: the cores this process may use).")
flags.DEFINE_integer("host_devices", 0, "XLA:CPU host devices for ours (0: the library's "
                     "default from the core count, sharding.configure_cpu_devices).")
common.define_tiny(dict(cases=["train_T2", "sample_T2"], reps=1, train_steps=1, batch=2,
                        sample_batch=2, sample_steps=2, image_size=8, num_classes=10))

# The agreement the port must reach before timing (float32; measured ~1e-6 of the scale).
AGREEMENT = 1e-4


def parse_case(name: str) -> tuple[str, str, int]:
  """"train_B2" -> ("train", "B", 2)."""
  kind, _, model = name.partition("_")
  if kind not in ("train", "sample") or len(model) < 2 or not model[-1].isdigit():
    raise SystemExit(f"unknown case {name!r}: train_<size><patch> or sample_<size><patch>")
  size, patch = model[:-1], int(model[-1])
  if size != "T" and size not in dit_steps.dit.SIZES:
    raise SystemExit(f"unknown DiT size {size!r} in {name!r}")
  return kind, size, patch


def load_average() -> float:
  return round(os.getloadavg()[0], 2)


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def summary(times) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "all_s": times}


def setup_case(name, torch):
  """Our model and perturbed parameters, the torch port loaded with them, their agreement."""
  from experiments.benchmarks import torch_dit  # pylint: disable=import-outside-toplevel
  _, size, patch = parse_case(name)
  s, c = FLAGS.image_size, FLAGS.channels
  model = dit_steps.make_model(size, patch, c, FLAGS.num_classes)
  params = dit_steps.random_params(model, (s, s, c), jax.random.key(0))
  tmodel = torch_dit.from_flax_model(model, s, c)
  torch_dit.load_flax_params(tmodel, params)
  n_torch = torch_dit.num_trainable(tmodel)
  if n_torch != dit_steps.count(params):
    raise SystemExit(f"parameter counts differ: ours {dit_steps.count(params)}, torch {n_torch}")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, s, s, c)).astype(np.float32)
  t = np.array([0.3, 0.8], np.float32)
  y = np.array([1, FLAGS.num_classes], np.int32)          # a class and the null label
  ours = np.asarray(model.apply({"params": params}, x, t, y))
  tmodel.eval()
  with torch.no_grad():
    th = torch_dit.velocity(tmodel, x, t, y)
  err, scale = float(np.abs(ours - th).max()), float(np.abs(ours).max())
  if err > AGREEMENT * max(scale, 1.0):
    raise SystemExit(f"{name}: the torch port disagrees with our DiT: {err} (scale {scale})")
  info = {"model": f"DiT-{size}/{patch}", "params_ours": dit_steps.count(params),
          "params_torch": n_torch, "max_abs_diff_flax_vs_torch": err, "output_scale": scale}
  return model, params, tmodel, info


def mesh_shardings():
  """(replicated, batch-split) shardings over every device (the library's CPU default)."""
  mesh = sharding.make_mesh(1)
  return sharding.replicated(mesh), sharding.batch_sharding(mesh)


def bench_train(name, torch) -> dict:
  load_before = load_average()
  model, params, tmodel, out = setup_case(name, torch)
  s, c, b, n = FLAGS.image_size, FLAGS.channels, FLAGS.batch, FLAGS.train_steps
  rep, split = mesh_shardings()
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (b, s, s, c)).astype(np.float32)
  y = (np.arange(b) % FLAGS.num_classes).astype(np.int32)
  tx = dit_steps.optimizer()
  state = {"params": jax.device_put(params, rep)}
  state["opt"] = jax.device_put(jax.jit(tx.init)(state["params"]), rep)
  xs, ys = jax.device_put(x, split), jax.device_put(y, split)
  step_fn = dit_steps.ours_train_step(model, tx, jax.random.key(2))
  t0 = time.perf_counter()
  compiled = step_fn.lower(state["params"], state["opt"], xs, ys, 0).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) * jax.device_count()   # the per-device program
  counter = [0]

  def run_ours(k):
    for _ in range(k):
      state["params"], state["opt"], loss = compiled(state["params"], state["opt"], xs, ys,
                                                     counter[0])
      counter[0] += 1
    jax.block_until_ready(loss)

  run_ours(1)                                                   # warm-up
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
  yt = torch.from_numpy(y).long()
  opt = dit_steps.torch_optimizer(tmodel)
  tmodel.train()

  def run_torch(k):
    for _ in range(k):
      dit_steps.torch_train_step(tmodel, opt, xt, yt)

  run_torch(1)                                                  # warm-up
  ours, th = [], []
  for _ in range(FLAGS.reps):
    ours.append(timed(lambda: run_ours(n)) / n)
    th.append(timed(lambda: run_torch(n)) / n)
  out.update({"batch": b, "image": [s, s, c], "steps_per_rep": n, "ours_compile_s": compile_s,
              "ours": summary(ours), "torch": summary(th), "gflops_per_step_ours": flops / 1e9,
              "load_average_1min": [load_before, load_average()]})
  out["ours_over_torch"] = out["ours"]["median_s"] / out["torch"]["median_s"]
  out["ours_tflops"] = flops / out["ours"]["median_s"] / 1e12
  out["torch_tflops_same_flops"] = flops / out["torch"]["median_s"] / 1e12
  print(name, json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}), flush=True)
  return out


def bench_sample(name, torch) -> dict:
  load_before = load_average()
  model, params, tmodel, out = setup_case(name, torch)
  s, c, b, steps = FLAGS.image_size, FLAGS.channels, FLAGS.sample_batch, FLAGS.sample_steps
  rep, split = mesh_shardings()
  rng = np.random.default_rng(3)
  z0 = rng.standard_normal((b, s, s, c)).astype(np.float32)
  y = (np.arange(b) * 7 % FLAGS.num_classes).astype(np.int32)
  params = jax.device_put(params, rep)
  zs, ys = jax.device_put(z0, split), jax.device_put(y, split)
  t0 = time.perf_counter()
  sample = dit_steps.ours_sampler(model, steps).lower(params, zs, ys).compile()
  compile_s = time.perf_counter() - t0
  ours_x = np.asarray(jax.block_until_ready(sample(params, zs, ys)))     # warm-up
  tmodel.eval()
  zt = torch.from_numpy(z0).permute(0, 3, 1, 2).contiguous()
  yt = torch.from_numpy(y).long()
  th_x = dit_steps.torch_sample(tmodel, zt, yt, steps).permute(0, 2, 3, 1).numpy()  # warm-up
  ours, th = [], []
  for _ in range(FLAGS.reps):
    ours.append(timed(lambda: jax.block_until_ready(sample(params, zs, ys))))
    th.append(timed(lambda: dit_steps.torch_sample(tmodel, zt, yt, steps)))
  out.update({"batch": b, "image": [s, s, c], "steps": steps, "ours_compile_s": compile_s,
              "max_abs_diff_samples": float(np.abs(ours_x - th_x).max()),
              "sample_scale": float(np.abs(th_x).max()),
              "ours": summary(ours), "torch": summary(th),
              "load_average_1min": [load_before, load_average()]})
  out["ours_over_torch"] = out["ours"]["median_s"] / out["torch"]["median_s"]
  out["ours_images_per_s"] = b / out["ours"]["median_s"]
  out["torch_images_per_s"] = b / out["torch"]["median_s"]
  print(name, json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}), flush=True)
  return out


def main(argv):
  del argv
  cases = [(name, parse_case(name)[0]) for name in FLAGS.cases]
  # Before anything starts a JAX backend: the library's CPU default (or --host_devices).
  host_devices = sharding.configure_cpu_devices(
      other_batch_sizes=[FLAGS.batch, FLAGS.sample_batch], requested=FLAGS.host_devices or None)
  for b in (FLAGS.batch, FLAGS.sample_batch):
    if b % jax.device_count():
      raise SystemExit(f"batch {b} does not split over {jax.device_count()} devices")
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(FLAGS.threads or sharding.available_cores())
  torch.manual_seed(0)
  results = {"device": jax.devices()[0].device_kind, "jax_devices": jax.device_count(),
             "host_devices_set": host_devices, "jax": jax.__version__,
             "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
             "cpu_count": os.cpu_count(), "cores_available": sharding.available_cores(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "reps": FLAGS.reps,
             "dtype": "float32", "load_average_1min_start": load_average(), "cases": {}}
  for name, kind in cases:
    fn = bench_train if kind == "train" else bench_sample
    results["cases"][name] = fn(name, torch)
  results["load_average_1min_end"] = load_average()
  results["ours_over_torch_time"] = {k: v["ours_over_torch"] for k, v in results["cases"].items()}
  print(json.dumps(results["ours_over_torch_time"], indent=2))
  common.write_json(FLAGS.out, results)


if __name__ == "__main__":
  common.run(main, required=("out",))
