"""Our train step and sampler against the same UNet in PyTorch eager, side by side in one run.

  pip install -e '.[bench]'
  python -m experiments.benchmarks.bench_peer --out=results/bench/bench_peer.json
  python -m experiments.benchmarks.bench_peer --out=/tmp/quick.json \
      --cases=train_default,sample_default

The peer is `torch_unet.py` (next to this file): the project's UNet ported layer for layer to
PyTorch (same parameter count, checked; the flax parameters are copied into it and
both must compute the same velocity before anything is timed). Both sides run the
same work:

* train step: rectified-flow velocity loss with the SiD2 sigmoid weighting, Adam
  with global-norm clipping, the EMA update. Ours is the library's real
  `train.train_step` (one jit, donated state, the config's timestep sampler, so
  per-pixel time maps). PyTorch eager draws a per-image time (the untuned peer) and,
  as a second row, a per-pixel time map of 4x4 patches (the same conditioning work).
* sampling: 50 DDIM steps (eta = 0.25, the null label, no guidance); ours is the
  library's `samplers.Sampler` (one `lax.scan` in one jit; its time map is always
  per pixel), PyTorch a Python loop under `torch.inference_mode` with a per-image
  time and, as a second row, the full per-pixel time map.

Ours runs as the library runs by default: on CPU `sharding.configure_cpu_devices`
gives XLA:CPU its host devices from the core count (--host_devices overrides) and the
batch is sharded over them (the train step over the ('data', 'fsdp') mesh as in
`train_and_evaluate`, the sampler over `sharding.sampling_mesh()`). PyTorch uses one
intra-op thread per available core (--threads), no torch.compile. Under `taskset -c 0`
both stacks get one core (the library then picks one host device): a per-core
comparison that other jobs on a shared machine disturb far less than the 2-core one.

Repetitions alternate between the stacks (ours, torch, ours, torch, ...) so that
both see the same machine load; medians and spreads are reported, compile time
separately, and the 1-minute load average around every case (the development
machine is shared). `ours_over_torch_time` < 1 means we are faster. On a GPU the same
script runs unchanged (torch on CUDA) and reports our MFU: XLA's cost-analysis FLOPs
per step / step time / the device's dense peak (PEAK_TFLOPS by device kind, or
--peak_tflops). A Markdown table goes next to the JSON (FILE.md). `--tiny`: the default
config's cases, one repetition of one step.
"""

from __future__ import annotations

import collections
import functools
import glob
import json
import os
import re
import statistics
import tempfile
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.data import input_pipeline
from asyncpatch_jax.diffusion import guidance, samplers, schedules
from asyncpatch_jax.runtime import sharding
from asyncpatch_jax.training import train
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_integer("reps", 5, "Timed repetitions per stack (alternating).")
flags.DEFINE_integer("train_steps", 3, "Train steps per timed repetition.")
flags.DEFINE_list("cases", ["train_default", "sample_default", "train_60m", "conv_default",
                            "conv_60m"], "What to measure (train_60m takes minutes on a CPU).")
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: the cores this process may use, "
                     "its affinity mask).")
flags.DEFINE_integer("host_devices", 0, "XLA:CPU host devices for ours (0: the library's "
                     "default from the core count, sharding.configure_cpu_devices).")
flags.DEFINE_bool("profile", True, "Trace our train steps (jax.profiler) and report where "
                  "their time goes, per XLA op and per kind of op.")
flags.DEFINE_float("peak_tflops", 0.0, "Device peak TFLOP/s for MFU (0: PEAK_TFLOPS by "
                   "device kind; no MFU on CPU).")
common.define_tiny(dict(cases=["train_default", "sample_default", "conv_default"], reps=1,
                        train_steps=1))

CASES = {  # name -> (config, image size, batch)
    "train_default": ("default", 16, 64),
    "train_60m": ("imagenet64_60m", 64, 8),
    "sample_default": ("default", 16, 64),
    # One 3x3 convolution, forward + both gradients, at a resolution level of each model
    # (where the train step's time goes; one device, float32, NHWC vs NCHW).
    "conv_default": ("default", 16, 64),
    "conv_60m": ("imagenet64_60m", 64, 8),
}
# Dense float32 peak TFLOP/s from the vendors' spec sheets (the benchmark runs float32).
PEAK_TFLOPS = {"NVIDIA H100": 67.0, "NVIDIA H200": 67.0, "NVIDIA A100": 19.5,
               "NVIDIA L4": 30.3, "NVIDIA A10": 31.2}


def device_peak() -> tuple[float | None, str]:
  """Peak FLOP/s of jax's device for MFU, and where it comes from (None on CPU)."""
  if FLAGS.peak_tflops:
    return FLAGS.peak_tflops * 1e12, "--peak_tflops"
  kind = jax.devices()[0].device_kind
  for name, tflops in PEAK_TFLOPS.items():
    if kind.startswith(name):
      return tflops * 1e12, f"spec sheet, float32 ({name})"
  return None, f"no peak known for {kind!r}"


def load_average() -> float:
  return round(os.getloadavg()[0], 2)


def load_config(name: str, size: int, batch: int):
  config = common.load_config(name)
  with config.unlocked():
    config.model.dtype = "float32"
    config.train.batch_size = batch
    config.train.fsdp = 1
  return config


def count(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def perturbed(params, key):
  """Random-init parameters with the zero-initialised layers (FiLM, outputs) made nonzero,
  so that the equivalence check exercises every path."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [p + 0.02 * jax.random.normal(k, p.shape)
                                   for p, k in zip(leaves, keys)])


def torch_model(config, params, size, device):
  from experiments.benchmarks import torch_unet  # pylint: disable=import-outside-toplevel
  model = torch_unet.TorchUNet(config.model, size)
  n_torch = sum(p.numel() for p in model.parameters())
  if n_torch != count(params):
    raise SystemExit(f"parameter counts differ: ours {count(params)}, torch {n_torch}")
  torch_unet.load_flax_params(model, params)
  return model.to(device), n_torch


def check_equal(setup, params, tmodel, torch, size, batch, device) -> float:
  """max |v_ours - v_torch| on a random input with a per-pixel time map and labels."""
  c = setup.image_shape[-1]
  rng = np.random.default_rng(0)
  z = rng.standard_normal((min(batch, 4), size, size, c)).astype(np.float32)
  t = rng.uniform(size=(z.shape[0], size, size)).astype(np.float32)
  y = np.arange(z.shape[0]) % max(setup.model.num_classes, 1) if setup.model.num_classes else None
  ours = np.asarray(setup.model.apply({"params": params}, z, t, y))
  with torch.no_grad():
    th = tmodel(torch.from_numpy(z).permute(0, 3, 1, 2).to(device), torch.from_numpy(t).to(device),
                None if y is None else torch.from_numpy(y).to(device))
    th = th.permute(0, 2, 3, 1).cpu().numpy()
  err = float(np.max(np.abs(ours - th)))
  scale = float(np.max(np.abs(ours)))
  if err > 1e-3 * max(scale, 1.0):
    raise SystemExit(f"the torch port disagrees with the flax UNet: max error {err} (scale {scale})")
  return err


def torch_train_step(tmodel, ema, opt, cfg, x, y, per_pixel, torch):
  b, c, h, w = x.shape
  if per_pixel:  # 4x4 patches, one uniform time each
    t = torch.rand(b, h // 4, w // 4, device=x.device)
    t = t.repeat_interleave(4, 1).repeat_interleave(4, 2)
  else:
    t = torch.rand(b, device=x.device)
  eps = torch.randn_like(x)
  t4 = t[:, None, None, None] if t.ndim == 1 else t[:, None]
  z = (1 - t4) * x + t4 * eps
  drop = torch.rand(b, device=x.device) < cfg.train.label_dropout
  y = torch.where(drop, torch.full_like(y, cfg.model.num_classes), y)
  v_hat = tmodel(z, t, y)
  err = ((eps - x - v_hat) ** 2).mean(1)                      # [B, H, W]
  tm = t[:, None, None].expand_as(err) if t.ndim == 1 else t
  weight = tm * (1 - tm) / (tm * tm + np.exp(-cfg.loss.bias) * (1 - tm) ** 2)
  loss = (weight * err).mean()
  opt.zero_grad(set_to_none=True)
  loss.backward()
  torch.nn.utils.clip_grad_norm_(tmodel.parameters(), cfg.optim.grad_clip)
  opt.step()
  with torch.no_grad():
    params = list(tmodel.parameters())
    torch._foreach_lerp_(ema, params, 1.0 - cfg.train.ema_decay)  # pylint: disable=protected-access
  return loss


def torch_sample(tmodel, x_shape, y, steps, eta, torch, device, per_pixel=False):
  """The library's DDIM update (samplers.ddim_step) as a PyTorch loop.

  per_pixel: the model gets the time as a full [B, H, W] map (the per-pixel FiLM path).
  """
  z = torch.randn(x_shape, device=device)
  ts = np.linspace(1.0, 0.0, steps + 1)
  t_shape = (x_shape[0], *x_shape[2:]) if per_pixel else (x_shape[0],)
  with torch.inference_mode():
    for k in range(steps):
      t, s = float(ts[k]), float(ts[k + 1])
      v = tmodel(z, torch.full(t_shape, t, device=device), y)
      x_hat, eps_hat = z - t * v, z + (1 - t) * v
      ratio = (1 - t) / (1 - s)
      c = eta * (s / t) * max(t * t - (ratio * s) ** 2, 0.0) ** 0.5
      z = (1 - s) * x_hat + max(s * s - c * c, 0.0) ** 0.5 * eps_hat + c * torch.randn_like(z)
  return z


def timed(fn, sync=None) -> float:
  t0 = time.perf_counter()
  fn()
  if sync is not None:
    sync()
  return time.perf_counter() - t0


def summary(times) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "all_s": times}


def our_train_step(setup, config, size, c, batch):
  """The library's sharded train step (as `train_and_evaluate` builds it), its state and data."""
  mesh = sharding.make_mesh(1)
  shardings = sharding.state_shardings(setup.abstract_state, mesh)
  state = jax.jit(setup.init_state, out_shardings=shardings)(jax.random.key(0))
  params = perturbed(state.params, jax.random.key(5))
  state = state.replace(params=jax.device_put(params, sharding.state_shardings(params, mesh)))
  rng = np.random.default_rng(1)
  data = input_pipeline.make_global_batch(
      {"image": rng.uniform(-1, 1, (batch, size, size, c)).astype(np.float32),
       "label": np.arange(batch, dtype=np.int32) % max(config.model.num_classes, 1)}, mesh)
  step = jax.jit(functools.partial(train.train_step, setup=setup, root_key=jax.random.key(2)),
                 in_shardings=(shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
  return step, state, data


def bench_train(name, torch, device) -> dict:
  cfg_name, size, batch = CASES[name]
  config = load_config(cfg_name, size, batch)
  c = config.model.out_channels
  load_before = load_average()
  setup = train.Setup(config, image_shape=(size, size, c))
  step, state, data = our_train_step(setup, config, size, c, batch)
  tmodel, n_torch = torch_model(config, state.params, size, device)
  err = check_equal(setup, state.params, tmodel, torch, size, batch, device)
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  flops = float(cost.get("flops", 0.0)) * jax.device_count()  # per-device program
  state, m = compiled(state, data)
  jax.block_until_ready(m)

  x = torch.from_numpy(np.array(data["image"])).permute(0, 3, 1, 2).contiguous().to(device)
  y = torch.from_numpy(np.array(data["label"])).long().to(device)
  opt = torch.optim.Adam(tmodel.parameters(), lr=config.optim.learning_rate,
                         betas=(config.optim.b1, config.optim.b2), eps=config.optim.eps,
                         foreach=True)
  ema = [p.detach().clone() for p in tmodel.parameters()]
  tmodel.train()
  sync = torch.cuda.synchronize if device.type == "cuda" else None
  for per_pixel in (False, True):  # warm-up (allocator, kernels)
    torch_train_step(tmodel, ema, opt, config, x, y, per_pixel, torch)

  n = FLAGS.train_steps if size <= 16 else 1
  ours, th_image, th_pixel = [], [], []

  def run_ours():
    nonlocal state
    for _ in range(n):
      state, metrics = compiled(state, data)
    jax.block_until_ready(metrics)

  def run_torch(per_pixel):
    for _ in range(n):
      torch_train_step(tmodel, ema, opt, config, x, y, per_pixel, torch)

  for _ in range(FLAGS.reps):
    ours.append(timed(run_ours) / n)
    th_image.append(timed(lambda: run_torch(False), sync) / n)
    th_pixel.append(timed(lambda: run_torch(True), sync) / n)
  out = {"config": cfg_name, "batch": batch, "image_size": size, "params_ours": count(state.params),
         "params_torch": n_torch, "max_abs_diff_flax_vs_torch": err,
         "ours_compile_s": compile_s, "steps_per_rep": n,
         "ours": summary(ours), "torch_per_image": summary(th_image),
         "torch_per_pixel": summary(th_pixel), "gflops_per_step_ours": flops / 1e9,
         "load_average_1min": [load_before, load_average()]}
  out["ours_over_torch"] = out["ours"]["median_s"] / out["torch_per_image"]["median_s"]
  out["ours_over_torch_per_pixel"] = out["ours"]["median_s"] / out["torch_per_pixel"]["median_s"]
  if FLAGS.profile:
    def run_steps(k):
      nonlocal state
      for _ in range(k):
        state, metrics = compiled(state, data)
      jax.block_until_ready(metrics)
    out["ours_profile"] = profile_train(compiled, run_steps, 2 * n)
  peak, _ = device_peak()
  out["ours_tflops"] = flops / out["ours"]["median_s"] / 1e12
  if peak:
    out["ours_mfu"] = flops / out["ours"]["median_s"] / peak
  print(name, json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}), flush=True)
  return out


def bench_sample(name, torch, device) -> dict:
  cfg_name, size, batch = CASES[name]
  config = load_config(cfg_name, size, batch)
  c = config.model.out_channels
  load_before = load_average()
  setup = train.Setup(config, image_shape=(size, size, c))
  params = perturbed(jax.jit(setup.init_state)(jax.random.key(0)).params, jax.random.key(5))
  tmodel, n_torch = torch_model(config, params, size, device)
  err = check_equal(setup, params, tmodel, torch, size, batch, device)
  steps, eta = 50, 0.25
  sampler = samplers.Sampler(guidance.model_velocity_fn(setup.model),
                             mesh=sharding.sampling_mesh())
  tau = schedules.synchronous(steps, size, size)
  y = jnp.full((batch,), setup.model.null_label, jnp.int32) if setup.model.num_classes else None
  kw = dict(params=params, **({"y": y} if y is not None else {}))

  def run_ours(k):
    jax.block_until_ready(sampler(tau, key=jax.random.key(k), shape=(batch, size, size, c),
                                  eta=eta, **kw))
  first_s = timed(lambda: run_ours(0))
  ty = None if y is None else torch.from_numpy(np.asarray(y)).long().to(device)
  tmodel.eval()
  sync = torch.cuda.synchronize if device.type == "cuda" else None
  shape = (batch, c, size, size)
  for per_pixel in (False, True):  # warm-up
    torch_sample(tmodel, shape, ty, 2, eta, torch, device, per_pixel)
  ours, th, th_pixel = [], [], []
  for r in range(FLAGS.reps):
    ours.append(timed(lambda: run_ours(r + 1)))
    th.append(timed(lambda: torch_sample(tmodel, shape, ty, steps, eta, torch, device), sync))
    th_pixel.append(timed(lambda: torch_sample(tmodel, shape, ty, steps, eta, torch, device,
                                               per_pixel=True), sync))
  out = {"config": cfg_name, "batch": batch, "image_size": size, "steps": steps,
         "params_ours": count(params), "params_torch": n_torch,
         "max_abs_diff_flax_vs_torch": err, "ours_first_call_s": first_s,
         "ours_compile_s": first_s - statistics.median(ours),   # first call minus a run
         "ours": summary(ours), "torch_per_image": summary(th), "torch_per_pixel": summary(th_pixel),
         "load_average_1min": [load_before, load_average()]}
  out["ours_over_torch"] = out["ours"]["median_s"] / out["torch_per_image"]["median_s"]
  out["ours_over_torch_per_pixel"] = out["ours"]["median_s"] / out["torch_per_pixel"]["median_s"]
  print(name, json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}), flush=True)
  return out


def _op_kinds(hlo_text: str) -> dict[str, str]:
  """HLO instruction name -> a kind: convolution, dot, ynn/xnn fusion, loop fusion, copy, ..."""
  called = {}        # computation name -> its text
  for m in re.finditer(r"^(?:ENTRY )?%?([\w.\-]+) [^\n]*\{\n(.*?)^\}", hlo_text, re.M | re.S):
    called[m.group(1)] = m.group(2)
  kinds = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^=]*?\b([a-z][\w\-]*)\((.*)$", hlo_text,
                       re.M):
    name, opcode, rest = m.groups()
    kind = opcode
    if opcode == "fusion":
      callee = re.search(r"calls=%?([\w.\-]+)", rest)
      body = called.get(callee.group(1), "") if callee else ""
      if " convolution(" in body:
        kind = "fusion with convolution"
      elif " dot(" in body:
        kind = "fusion with dot"
      elif " reduce(" in body:
        kind = "fusion with reduce"
      elif re.search(r"kind=k(\w+)", rest):
        kind = "fusion (" + re.search(r"kind=k(\w+)", rest).group(1) + ")"
      if re.search(r'"kind":"__[xy]nn', rest):       # XLA:CPU's XNNPACK/YNNPACK fusions
        kind = "ynn/xnn " + kind
    elif opcode == "convolution":
      window = re.search(r"window=\{size=(\d+)x(\d+)", rest)
      if window and min(map(int, window.groups())) > 3:   # window = the image: dL/dkernel
        kind = "convolution (kernel gradient)"
    kinds[name] = kind
  return kinds


def profile_train(compiled, run_steps, steps: int) -> dict:
  """Where the train step's time goes: a jax.profiler trace of `steps` steps, per XLA op.

  XLA:CPU records one event per executed op (thunk) with its HLO name; summed per op
  and per kind of op (from the compiled HLO), as shares of the summed op time, and
  the op time over wall time x cores (how busy XLA kept the cores).
  """
  from jax.profiler import ProfileData  # pylint: disable=import-outside-toplevel
  kinds = _op_kinds(compiled.as_text())
  with tempfile.TemporaryDirectory() as d:
    t0 = time.perf_counter()
    with jax.profiler.trace(d):
      run_steps(steps)
    wall = time.perf_counter() - t0
    files = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
    data = ProfileData.from_file(files[0])
    per_op = collections.defaultdict(float)
    for plane in data.planes:
      for line in plane.lines:
        for ev in line.events:
          stats = dict(ev.stats)
          if "hlo_op" in stats and "train_step" in str(stats.get("hlo_module", "")):
            per_op[stats["hlo_op"]] += ev.duration_ns * 1e-9
  total = sum(per_op.values())
  per_kind = collections.defaultdict(float)
  for op, sec in per_op.items():
    per_kind[kinds.get(op, "other")] += sec
  top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
  return {"steps": steps, "wall_s": wall, "op_time_s": total,
          "op_time_over_wall_x_cores": total / (wall * sharding.available_cores()),
          "share_by_kind": {k: v / total for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])},
          "top_ops": [{"op": op, "kind": kinds.get(op, "other"), "share": sec / total,
                       "s_per_step": sec / steps} for op, sec in top]}


def bench_conv(name, torch, device) -> dict:
  """One 3x3 conv layer (the model's first-level width), loss = sum(y^2), grads w and x."""
  cfg_name, size, batch = CASES[name]
  ch = load_config(cfg_name, size, batch).model.base_channels
  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, size, size, ch)).astype(np.float32)
  w = (rng.standard_normal((3, 3, ch, ch)) / (3 * ch ** 0.5)).astype(np.float32)

  def loss(w, x):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y * y)
  f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
  xj, wj = jax.device_put(x, jax.devices()[0]), jax.device_put(w, jax.devices()[0])
  jax.block_until_ready(f(wj, xj))
  xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(device).requires_grad_()
  wt = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous().to(device).requires_grad_()

  def run_torch():
    y = torch.nn.functional.conv2d(xt, wt, padding=1)
    (y * y).sum().backward()
  run_torch()
  sync = torch.cuda.synchronize if device.type == "cuda" else None
  n, ours, th = 10, [], []
  for _ in range(FLAGS.reps):
    ours.append(timed(lambda: [jax.block_until_ready(f(wj, xj)) for _ in range(n)]) / n)
    th.append(timed(lambda: [run_torch() for _ in range(n)], sync) / n)
  flops = 3 * 2 * batch * size * size * 9 * ch * ch      # forward, dL/dx, dL/dw
  out = {"config": cfg_name, "shape_nhwc": [batch, size, size, ch], "gflops": flops / 1e9,
         "ours": summary(ours), "torch": summary(th),
         "ours_tflops": flops / statistics.median(ours) / 1e12,
         "torch_tflops": flops / statistics.median(th) / 1e12,
         "load_average_1min": [load_average()]}
  out["ours_over_torch"] = out["ours"]["median_s"] / out["torch"]["median_s"]
  print(name, json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}), flush=True)
  return out


def markdown(results) -> str:
  """The README's table: medians (min-max) per stack and the ratios."""
  rows = ["| case | ours | PyTorch eager, per-image t | PyTorch eager, per-pixel t | "
          "ours / PyTorch (per-image t) | ours / PyTorch (per-pixel t) | ours compile | load |",
          "|---|---|---|---|---|---|---|---|"]
  what = {"train_default": "train step, default, batch 64",
          "train_60m": "train step, 60M, 64x64, batch 8",
          "sample_default": "50-step sampling, default, batch 64"}

  def cell(d):
    return f"{d['median_s']:.3g} s ({d['min_s']:.3g}-{d['max_s']:.3g})"
  convs = {k: v for k, v in results["cases"].items() if k.startswith("conv")}
  if len(convs) == len(results["cases"]):
    rows = []
  for name, r in results["cases"].items():
    if name in convs:
      continue
    load = "-".join(f"{x:.1f}" for x in r["load_average_1min"])
    rows.append(f"| {what.get(name, name)} | {cell(r['ours'])} | {cell(r['torch_per_image'])} | "
                f"{cell(r['torch_per_pixel'])} | **{r['ours_over_torch']:.2f}x** | "
                f"{r['ours_over_torch_per_pixel']:.2f}x | {r['ours_compile_s']:.0f} s | {load} |")
  if convs:
    rows += ["" if rows else None, "| one 3x3 conv, forward + both gradients, NHWC | ours | PyTorch | ours / PyTorch |"
             " ours / PyTorch TFLOP/s |", "|---|---|---|---|---|"]
    for name, r in convs.items():
      rows.append(f"| {'x'.join(map(str, r['shape_nhwc']))} ({r['config']}) | {cell(r['ours'])} | "
                  f"{cell(r['torch'])} | **{r['ours_over_torch']:.2f}x** | "
                  f"{r['ours_tflops']:.3f} / {r['torch_tflops']:.3f} |")
  return "\n".join(r for r in rows if r is not None) + "\n"


def main(argv):
  del argv
  # Before anything starts a JAX backend: the library's CPU default (or --host_devices).
  host_devices = sharding.configure_cpu_devices(
      other_batch_sizes=[CASES[n][2] for n in FLAGS.cases if n in CASES],
      requested=FLAGS.host_devices or None)
  unknown = [n for n in FLAGS.cases if n not in CASES]
  if unknown:
    raise SystemExit(f"unknown cases {unknown}; choose from {sorted(CASES)}.")
  import torch  # pylint: disable=import-outside-toplevel
  device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  torch.set_num_threads(FLAGS.threads or sharding.available_cores())
  torch.manual_seed(0)
  peak, peak_source = device_peak()
  results = {"device": jax.devices()[0].device_kind, "jax_devices": jax.device_count(),
             "host_devices_set": host_devices, "jax": jax.__version__,
             "torch": torch.__version__, "torch_device": str(device),
             "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
             "cores_available": sharding.available_cores(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "reps": FLAGS.reps,
             "peak_tflops": None if peak is None else peak / 1e12, "peak_source": peak_source,
             "load_average_1min_start": load_average(), "cases": {}}
  for name in FLAGS.cases:
    fn = (bench_sample if name.startswith("sample") else bench_conv if name.startswith("conv")
          else bench_train)
    results["cases"][name] = fn(name, torch, device)
  results["load_average_1min_end"] = load_average()
  results["ours_over_torch_time"] = {k: v["ours_over_torch"] for k, v in results["cases"].items()}
  results["ours_over_torch_time_per_pixel_peer"] = {
      k: v["ours_over_torch_per_pixel"] for k, v in results["cases"].items()
      if "ours_over_torch_per_pixel" in v}
  print(json.dumps(results["ours_over_torch_time"], indent=2))
  common.write_json(FLAGS.out, results)
  table = markdown(results)
  common.write_table(FLAGS.out, table)


if __name__ == "__main__":
  common.run(main, required=("out",))
