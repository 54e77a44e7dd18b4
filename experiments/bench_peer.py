"""Our train step and sampler against the same UNet in PyTorch eager, side by side in one run.

  pip install -e '.[bench]'
  python experiments/bench_peer.py --out results/bench/bench_peer.json

The peer is `experiments/torch_unet.py`: the project's UNet ported layer for layer to
PyTorch (same parameter count, checked; the flax parameters are copied into it and
both must compute the same velocity before anything is timed). Both sides run the
same work:

* train step: rectified-flow velocity loss with the SiD2 sigmoid weighting, Adam
  with global-norm clipping, the EMA update. Ours is the library's real
  `train.train_step` (one jit, donated state, the config's timestep sampler, so
  per-pixel time maps). PyTorch eager draws a per-image time (the untuned peer) and,
  as a second row, a per-pixel time map of 4x4 patches (the same conditioning work).
* sampling: 50 DDIM steps (eta = 0.25, the null label, no guidance); ours is the
  library's `samplers.Sampler` (one `lax.scan` in one jit), PyTorch a Python loop
  under `torch.inference_mode`.

Repetitions alternate between the stacks (ours, torch, ours, torch, ...) so that
both see the same machine load; medians and spreads are reported, compile time
separately. `ours_over_torch_time` < 1 means we are faster. On a GPU the same script
runs unchanged (torch on CUDA when available) and reports our MFU against the
device peak (`bench_train.device_peak`).
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import sys
import time

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from asyncpatch_jax import base_config  # noqa: E402
from asyncpatch_jax.diffusion import guidance, samplers, schedules  # noqa: E402
from asyncpatch_jax.training import sharding, train  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_integer("reps", 5, "Timed repetitions per stack (alternating).")
flags.DEFINE_integer("train_steps", 3, "Train steps per timed repetition.")
flags.DEFINE_list("cases", ["train_default", "train_60m", "sample_default"], "What to measure.")
flags.DEFINE_integer("threads", 0, "torch intra-op threads (0: os.cpu_count()).")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = {  # name -> (config, image size, batch)
    "train_default": ("default", 16, 64),
    "train_60m": ("imagenet64_60m", 64, 8),
    "sample_default": ("default", 16, 64),
}


def load_config(name: str, size: int, batch: int):
  config = base_config.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
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


def torch_model(config, params, size):
  import torch_unet  # pylint: disable=import-outside-toplevel
  model = torch_unet.TorchUNet(config.model, size)
  n_torch = sum(p.numel() for p in model.parameters())
  if n_torch != count(params):
    raise SystemExit(f"parameter counts differ: ours {count(params)}, torch {n_torch}")
  torch_unet.load_flax_params(model, params)
  return model


def check_equal(setup, params, tmodel, torch, size, batch) -> float:
  """max |v_ours - v_torch| on a random input with a per-pixel time map and labels."""
  c = setup.image_shape[-1]
  rng = np.random.default_rng(0)
  z = rng.standard_normal((min(batch, 4), size, size, c)).astype(np.float32)
  t = rng.uniform(size=(z.shape[0], size, size)).astype(np.float32)
  y = np.arange(z.shape[0]) % max(setup.model.num_classes, 1) if setup.model.num_classes else None
  ours = np.asarray(setup.model.apply({"params": params}, z, t, y))
  with torch.no_grad():
    th = tmodel(torch.from_numpy(z).permute(0, 3, 1, 2), torch.from_numpy(t),
                None if y is None else torch.from_numpy(y)).permute(0, 2, 3, 1).numpy()
  err = float(np.max(np.abs(ours - th)))
  scale = float(np.max(np.abs(ours)))
  if err > 1e-3 * max(scale, 1.0):
    raise SystemExit(f"the torch port disagrees with the flax UNet: max error {err} (scale {scale})")
  return err


def torch_train_step(tmodel, ema, opt, cfg, x, y, per_pixel, torch):
  b, c, h, w = x.shape
  if per_pixel:  # 4x4 patches, one uniform time each
    t = torch.rand(b, h // 4, w // 4).repeat_interleave(4, 1).repeat_interleave(4, 2)
  else:
    t = torch.rand(b)
  eps = torch.randn_like(x)
  t4 = t[:, None, None, None] if t.ndim == 1 else t[:, None]
  z = (1 - t4) * x + t4 * eps
  drop = torch.rand(b) < cfg.train.label_dropout
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


def torch_sample(tmodel, x_shape, y, steps, eta, torch):
  """The library's DDIM update (samplers.ddim_step) as a PyTorch loop."""
  z = torch.randn(x_shape)
  ts = torch.linspace(1.0, 0.0, steps + 1)
  with torch.inference_mode():
    for k in range(steps):
      t, s = float(ts[k]), float(ts[k + 1])
      v = tmodel(z, torch.full((x_shape[0],), t), y)
      x_hat, eps_hat = z - t * v, z + (1 - t) * v
      ratio = (1 - t) / (1 - s)
      c = eta * (s / t) * max(t * t - (ratio * s) ** 2, 0.0) ** 0.5
      z = (1 - s) * x_hat + max(s * s - c * c, 0.0) ** 0.5 * eps_hat + c * torch.randn_like(z)
  return z


def timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def summary(times) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "all_s": times}


def bench_train(name, torch) -> dict:
  cfg_name, size, batch = CASES[name]
  config = load_config(cfg_name, size, batch)
  c = config.model.out_channels
  setup = train.Setup(config, devices=jax.devices()[:1], image_shape=(size, size, c))
  state = jax.jit(setup.init_state)(jax.random.key(0))
  state = state.replace(params=perturbed(state.params, jax.random.key(5)))
  tmodel = torch_model(config, state.params, size)
  err = check_equal(setup, state.params, tmodel, torch, size, batch)
  data = {"image": jax.random.uniform(jax.random.key(1), (batch, size, size, c), minval=-1.0),
          "label": jnp.arange(batch, dtype=jnp.int32) % max(config.model.num_classes, 1)}
  step = jax.jit(functools.partial(train.train_step, setup=setup, root_key=jax.random.key(2)),
                 donate_argnums=(0,))
  t0 = time.perf_counter()
  compiled = step.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  flops = compiled.cost_analysis().get("flops", 0.0)
  state, _ = compiled(state, data)
  jax.block_until_ready(state)

  x = torch.from_numpy(np.asarray(data["image"])).permute(0, 3, 1, 2).contiguous()
  y = torch.from_numpy(np.asarray(data["label"])).long()
  opt = torch.optim.Adam(tmodel.parameters(), lr=config.optim.learning_rate,
                         betas=(config.optim.b1, config.optim.b2), eps=config.optim.eps,
                         foreach=True)
  ema = [p.detach().clone() for p in tmodel.parameters()]
  tmodel.train()
  for per_pixel in (False, True):  # warm-up (allocator, kernels)
    torch_train_step(tmodel, ema, opt, config, x, y, per_pixel, torch)

  n = FLAGS.train_steps
  ours, th_image, th_pixel = [], [], []

  def run_ours():
    nonlocal state
    for _ in range(n):
      state, _ = compiled(state, data)
    jax.block_until_ready(state)

  for _ in range(FLAGS.reps):
    ours.append(timed(run_ours) / n)
    th_image.append(timed(lambda: [torch_train_step(tmodel, ema, opt, config, x, y, False, torch)
                                   for _ in range(n)]) / n)
    th_pixel.append(timed(lambda: [torch_train_step(tmodel, ema, opt, config, x, y, True, torch)
                                   for _ in range(n)]) / n)
  out = {"config": cfg_name, "batch": batch, "image_size": size, "params": count(state.params),
         "max_abs_diff_flax_vs_torch": err, "ours_compile_s": compile_s,
         "ours": summary(ours), "torch_per_image": summary(th_image),
         "torch_per_pixel": summary(th_pixel), "gflops_per_step_ours": flops / 1e9}
  out["ours_over_torch"] = out["ours"]["median_s"] / out["torch_per_image"]["median_s"]
  out["ours_over_torch_per_pixel"] = out["ours"]["median_s"] / out["torch_per_pixel"]["median_s"]
  print(name, json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}), flush=True)
  return out


def bench_sample(name, torch) -> dict:
  cfg_name, size, batch = CASES[name]
  config = load_config(cfg_name, size, batch)
  c = config.model.out_channels
  setup = train.Setup(config, devices=jax.devices()[:1], image_shape=(size, size, c))
  params = perturbed(jax.jit(setup.init_state)(jax.random.key(0)).params, jax.random.key(5))
  tmodel = torch_model(config, params, size)
  err = check_equal(setup, params, tmodel, torch, size, batch)
  steps, eta = 50, 0.25
  sampler = samplers.Sampler(guidance.model_velocity_fn(setup.model),
                             mesh=sharding.sampling_mesh(jax.devices()[:1]))
  tau = schedules.synchronous(steps, size, size)
  y = jnp.full((batch,), setup.model.null_label, jnp.int32) if setup.model.num_classes else None
  kw = dict(params=params, **({"y": y} if y is not None else {}))
  t0 = time.perf_counter()
  jax.block_until_ready(sampler(tau, key=jax.random.key(0), shape=(batch, size, size, c), eta=eta,
                                **kw))
  first_s = time.perf_counter() - t0
  ty = None if y is None else torch.from_numpy(np.asarray(y)).long()
  tmodel.eval()
  torch_sample(tmodel, (batch, c, size, size), ty, 2, eta, torch)  # warm-up
  ours, th = [], []
  for r in range(FLAGS.reps):
    ours.append(timed(lambda: jax.block_until_ready(
        sampler(tau, key=jax.random.key(r), shape=(batch, size, size, c), eta=eta, **kw))))
    th.append(timed(lambda: torch_sample(tmodel, (batch, c, size, size), ty, steps, eta, torch)))
  out = {"config": cfg_name, "batch": batch, "image_size": size, "steps": steps,
         "params": count(params), "max_abs_diff_flax_vs_torch": err,
         "ours_first_call_s (compile + run)": first_s, "ours": summary(ours),
         "torch": summary(th)}
  out["ours_over_torch"] = out["ours"]["median_s"] / out["torch"]["median_s"]
  print(name, json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}), flush=True)
  return out


def main(argv):
  del argv
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(FLAGS.threads or os.cpu_count())
  torch.manual_seed(0)
  results = {"device": jax.devices()[0].device_kind, "jax_devices": jax.device_count(),
             "jax": jax.__version__, "torch": torch.__version__,
             "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
             "xla_flags": os.environ.get("XLA_FLAGS", ""), "cases": {}}
  for name in FLAGS.cases:
    fn = bench_sample if name.startswith("sample") else bench_train
    results["cases"][name] = fn(name, torch)
  results["ours_over_torch_time"] = {k: v["ours_over_torch"] for k, v in results["cases"].items()}
  results["ours_over_torch_time_per_pixel_peer"] = {
      k: v["ours_over_torch_per_pixel"] for k, v in results["cases"].items()
      if "ours_over_torch_per_pixel" in v}
  print(json.dumps(results["ours_over_torch_time"], indent=2))
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  with open(FLAGS.out, "w") as f:
    json.dump(results, f, indent=2)


if __name__ == "__main__":
  flags.mark_flags_as_required(["out"])
  app.run(main)
