"""Peak memory per device of the real train step against the per-device batch, remat and FSDP.

  python -m experiments.benchmarks.bench_memory --out=results/dit/memory.json

For the UNets of configs/imagenet64_60m.py and configs/imagenet64_620m.py (64 x 64 x 3)
and DiT-B/2 and DiT-XL/2 (configs/dit.py:imagenet256,<size>) on 32 x 32 x 4 latents with
1000 classes (the DiT paper's ImageNet 256 setting, without the autoencoder; the velocity
has the latents' 4 channels), each with model.remat none, block and full: the train step
that training runs (`loop.jit_step`: train.train_step jitted over the ('data', 'fsdp') mesh
of 8 XLA:CPU host devices, state donated) is compiled on abstract inputs at several
per-device batches, nothing allocated, and `Compiled.memory_analysis()` gives the bytes per
device (arguments, outputs, aliased, temporaries, generated code); the peak is
`memory.StepMemory.peak`, what the trainer's memory check compares with the devices'
memory. A line peak = a + b * batch is fitted (least squares) to the `--fit_batches`
points and checked against one more compile at `--check_batch`; from it, the largest
per-device batch within each of `--limits_gib`; then compiles from there until a batch fits
and the next does not (`search_largest`). The default batches (16 to 128 per device)
are where the activations set the peak: at a few examples per device the optimizer's
batch-independent temporaries do, and the peak is above the line (DiT-B/2, remat full: 2.91
GiB at 4 per device, against 2.6 GiB on the line through 16, 32 and 64). DiT-XL/2 is also
compiled with fsdp=8 (its state split over the 8 devices), with the state's bytes per device
against fsdp=1.

These are XLA:CPU's buffer assignment, an estimate of what a TPU's would be
(experiments/benchmarks/README.md, "Memory"). Compiles run with XLA's backend optimisation
off (`--opt_level=0`: half the compile time); `--opt_level_check` compiles the first point
of each model again at the default level and records whether the memory analysis is the
same (the buffer assignment is made on the HLO, before the backend's code generation).
`--float32_check` compiles two points of each bfloat16 model with float32 compute.
`--tiny`: a two-block DiT on 16 x 16 x 4, remat none and full, fsdp 1 and 8, limits of 0.02 and
0.03 GiB (27 compiles of a few seconds each).
"""

from __future__ import annotations

import datetime
import math
import time

from absl import flags
import jax
import jaxlib
import numpy as np

from asyncpatch_jax.runtime import sharding
from asyncpatch_jax.training import loop
from asyncpatch_jax.training import memory
from asyncpatch_jax.training import train
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_list("models", ["DiT-B/2", "DiT-XL/2", "UNet-60M", "UNet-620M"], "Models (MODELS).")
flags.DEFINE_list("remat", ["none", "block", "full"], "model.remat settings.")
flags.DEFINE_list("fit_batches", ["16", "32", "64"], "Per-device batches the line is fitted to.")
flags.DEFINE_integer("check_batch", 128, "Per-device batch that checks the fitted line.")
flags.DEFINE_list("fsdp_models", ["DiT-XL/2"], "Models also compiled with --fsdp.")
flags.DEFINE_integer("fsdp", 8, "The fsdp axis of the FSDP runs (divides --devices).")
flags.DEFINE_integer("devices", 8, "XLA:CPU host devices (the mesh: data x fsdp).")
flags.DEFINE_list("limits_gib", ["16", "32"], "Device memories for the largest batch, GiB.")
flags.DEFINE_integer("opt_level", 0, "xla_backend_optimization_level of the compiles "
                     "(-1: XLA's default).")
flags.DEFINE_bool("float32_check", True, "Compile each bfloat16 model's first two points "
                  "(remat none, fsdp 1) with float32 compute too.")
flags.DEFINE_bool("opt_level_check", True, "Compile each model's first point at XLA's "
                  "default level too and record whether the analysis is the same.")
common.define_tiny(dict(models=["tiny-DiT"], remat=["none", "full"], fsdp_models=["tiny-DiT"],
                        fit_batches=["1", "2"], check_batch=4, limits_gib=["0.02", "0.03"]))

GIB = 2 ** 30
# name -> (config, image or latent shape [H, W, C], config overrides by section).
_DIT_LATENTS = {"latent": {"autoencoder_workdir": ""}, "model": {"out_channels": 4}}
MODELS = {
    "UNet-60M": ("imagenet64_60m", (64, 64, 3), {}),
    "UNet-620M": ("imagenet64_620m", (64, 64, 3), {}),
    "DiT-B/2": ("configs/dit.py:imagenet256,B/2", (32, 32, 4), _DIT_LATENTS),
    "DiT-XL/2": ("configs/dit.py:imagenet256,XL/2", (32, 32, 4), _DIT_LATENTS),
    # --tiny: widths whose large leaves are above sharding.MIN_FSDP_SIZE (FSDP splits them).
    "tiny-DiT": ("configs/dit.py:imagenet256,S/2", (16, 16, 4),
                 {**_DIT_LATENTS, "model": {"out_channels": 4, "depth": 2, "hidden_size": 128,
                                            "num_heads": 2}}),
    "tiny-UNet": ("imagenet64_60m", (16, 16, 3), {"model": common.TINY_UNET}),
}


def make_setup(name: str, remat: str, fsdp: int, devices, dtype: str | None = None
               ) -> train.Setup:
  """The trainer of model `name` as training builds it (optimizer flattened at fsdp 1);
  dtype: another compute dtype than the config's."""
  spec, shape, overrides = MODELS[name]
  config = common.updated(common.load_config(spec), overrides)
  common.updated(config, {"model": {"remat": remat},
                          "train": {"fsdp": fsdp, "batch_size": len(devices)}})
  if dtype is not None:
    common.updated(config, {"model": {"dtype": dtype}})
  return train.Setup(config, devices, image_shape=shape)


def compile_point(setup: train.Setup, mesh, per_device: int, opt_level: int) -> dict:
  """Memory analysis of the train step at `per_device` examples per device, in bytes."""
  jitted, abstract_args = loop.jit_step(setup, mesh, jax.random.key(0), setup.frozen(mesh))
  options = None if opt_level < 0 else {"xla_backend_optimization_level": opt_level}
  start = time.time()
  compiled = jitted.lower(*abstract_args(per_device * mesh.size)).compile(
      compiler_options=options)
  seconds = time.time() - start
  analysis = compiled.memory_analysis()
  step = memory.StepMemory.of(compiled)
  return {"per_device_batch": per_device, "global_batch": per_device * mesh.size,
          "arguments": step.arguments, "outputs": step.outputs, "aliased": step.aliased,
          "temporaries": step.temporaries,
          "generated_code": int(analysis.generated_code_size_in_bytes), "peak": step.peak,
          "compile_seconds": round(seconds, 1)}


def state_bytes(setup: train.Setup, mesh) -> dict:
  """Bytes per device of the train state's parts under the mesh's shardings (from shapes)."""
  state = setup.abstract_state
  shardings = sharding.state_shardings(state, mesh)
  parts = {k: memory.bytes_per_device(memory.with_shardings(getattr(state, k),
                                                            getattr(shardings, k)))
           for k in ("params", "ema_params", "opt_state")}
  parts["total"] = memory.bytes_per_device(memory.with_shardings(state, shardings))
  return parts


def fit_line(points: list[dict]) -> dict:
  """peak = a + b * per-device batch, least squares; the largest residual relative to peak."""
  x = np.array([p["per_device_batch"] for p in points], np.float64)
  y = np.array([p["peak"] for p in points], np.float64)
  b, a = np.polyfit(x, y, 1)
  residual = float(np.max(np.abs(a + b * x - y) / y))
  return {"a_bytes": float(a), "b_bytes_per_example": float(b), "max_rel_residual": residual}


def largest_batch(fit: dict, limit_bytes: float) -> int:
  """The largest per-device batch whose fitted peak is within `limit_bytes` (0: none)."""
  a, b = fit["a_bytes"], fit["b_bytes_per_example"]
  if b <= 0:
    raise ValueError(f"the fitted peak does not grow with the batch (b = {b}).")
  return max(0, math.floor((limit_bytes - a) / b))


def search_largest(compile_at, compiled: dict, guess: int, limit: float, fit: dict,
                   budget: int = 6) -> dict:
  """The largest per-device batch whose compiled peak is within `limit`, from the line's `guess`.

  Compiles until it holds a batch n that fits and n + 1 that does not (`exact`), or
  `budget` compiles are spent (then the bracket found). Each next batch is the secant
  between the compiled points around the crossing (the fitted slope beyond the last one),
  clamped inside the bracket; `compiled` ({batch: point}) holds every point so far and
  receives the new ones. The peak is taken to grow with the batch.
  """
  fits = lambda n: n == 0 or compiled[n]["peak"] <= limit
  peak = lambda n: 0.0 if n == 0 else compiled[n]["peak"]
  spent, n = 0, guess
  while True:
    lo = max([k for k in compiled if fits(k)], default=0)
    hi = min([k for k in compiled if not fits(k)], default=None)
    if (hi is not None and hi - lo <= 1) or spent == budget:
      break
    if spent or n in compiled or n == 0:     # the guess is known: the secant's next batch
      if hi is None:
        n = lo + math.floor((limit - peak(lo)) / fit["b_bytes_per_example"])
      elif lo == 0:
        n = hi - math.ceil((peak(hi) - limit) / fit["b_bytes_per_example"])
      else:
        n = lo + math.floor((limit - peak(lo)) / (peak(hi) - peak(lo)) * (hi - lo))
    n = max(lo + 1, n if hi is None else min(n, hi - 1))
    if n not in compiled:
      compiled[n] = compile_at(n)
      spent += 1
  return {"line": guess, "largest": lo, "peak_at_largest": peak(lo) if lo else None,
          "smallest_not_fitting": hi, "peak_at_smallest_not_fitting": None if hi is None
          else peak(hi), "exact": hi is not None and hi - lo == 1, "compiles": spent}


def series(name: str, remat: str, fsdp: int, devices, fit_batches, check_batch) -> dict:
  """Every point of one (model, remat, fsdp), the fitted line, its check and the largest batches."""
  setup = make_setup(name, remat, fsdp, devices)
  mesh = sharding.make_mesh(fsdp, devices)
  points = []
  for per_device in fit_batches:
    points.append(compile_point(setup, mesh, per_device, FLAGS.opt_level))
    print(f"{name} fsdp={fsdp} remat={remat} batch {per_device}/device: peak "
          f"{points[-1]['peak'] / GIB:.2f} GiB (temp {points[-1]['temporaries'] / GIB:.2f}), "
          f"compiled in {points[-1]['compile_seconds']:.0f} s", flush=True)
  fit = fit_line(points)
  check = compile_point(setup, mesh, check_batch, FLAGS.opt_level)
  predicted = fit["a_bytes"] + fit["b_bytes_per_example"] * check_batch
  out = {"points": points, "fit": fit,
         "check": {**check, "predicted_peak": predicted,
                   "rel_error": (predicted - check["peak"]) / check["peak"]},
         "largest_per_device_batch": {f"{g}GiB": largest_batch(fit, float(g) * GIB)
                                      for g in FLAGS.limits_gib}}
  # Below the fitted batches the line can only underestimate the peak: there the optimizer's
  # batch-independent temporaries, not the activations, set it.
  out["below_fitted_batches"] = [k for k, n in out["largest_per_device_batch"].items()
                                 if n < min(fit_batches)]
  compiled = {p["per_device_batch"]: p for p in (*points, check)}
  out["largest_compiled"] = {
      f"{g}GiB": search_largest(
          lambda n: compile_point(setup, mesh, n, FLAGS.opt_level), compiled,
          out["largest_per_device_batch"][f"{g}GiB"], float(g) * GIB, fit)
      for g in FLAGS.limits_gib}
  found = {k: (v["largest"], v["smallest_not_fitting"]) for k, v in out["largest_compiled"].items()}
  print(f"{name} fsdp={fsdp} remat={remat}: peak = {fit['a_bytes'] / GIB:.2f} GiB + "
        f"{fit['b_bytes_per_example'] / 2 ** 20:.1f} MiB x batch; at {check_batch}: predicted "
        f"{predicted / GIB:.2f}, compiled {check['peak'] / GIB:.2f} GiB; largest batch "
        f"{out['largest_per_device_batch']}, compiled (fits, does not): {found}", flush=True)
  return out


def opt_level_check(name: str, remat: str, point: dict, devices) -> dict:
  """`point` (compiled at --opt_level, fsdp 1) compiled again at XLA's default level."""
  setup = make_setup(name, remat, 1, devices)
  default = compile_point(setup, sharding.make_mesh(1, devices), point["per_device_batch"], -1)
  keys = ("arguments", "outputs", "aliased", "temporaries", "generated_code")
  return {"model": name, "remat": remat, "per_device_batch": point["per_device_batch"],
          "opt_level": FLAGS.opt_level, "same": all(point[k] == default[k] for k in keys),
          "at_opt_level": {k: point[k] for k in (*keys, "compile_seconds")},
          "at_default_level": {k: default[k] for k in (*keys, "compile_seconds")}}


def float32_check(name: str, points: list[dict], devices) -> dict:
  """`points` (the config's bfloat16 compute, remat none, fsdp 1) compiled with float32
  compute: XLA:CPU computes bfloat16 in float32, so the activations it keeps may not shrink."""
  setup = make_setup(name, "none", 1, devices, dtype="float32")
  mesh = sharding.make_mesh(1, devices)
  f32 = [compile_point(setup, mesh, p["per_device_batch"], FLAGS.opt_level) for p in points]
  slope = lambda ps: ((ps[1]["peak"] - ps[0]["peak"])
                      / (ps[1]["per_device_batch"] - ps[0]["per_device_batch"]))
  return {"model": name, "per_device_batches": [p["per_device_batch"] for p in points],
          "bfloat16_peaks": [p["peak"] for p in points], "float32_peaks": [p["peak"] for p in f32],
          "bfloat16_b": slope(points), "float32_b": slope(f32)}


def main(argv):
  del argv
  # Before anything starts a JAX backend: the host devices of the mesh.
  sharding.configure_cpu_devices(requested=FLAGS.devices)
  unknown = [m for m in (*FLAGS.models, *FLAGS.fsdp_models) if m not in MODELS]
  if unknown:
    raise SystemExit(f"unknown models {unknown}; choose from {sorted(MODELS)}.")
  devices = jax.devices()[:FLAGS.devices]
  if len(devices) != FLAGS.devices:
    raise SystemExit(f"{FLAGS.devices} devices asked for, {len(devices)} found.")
  fit_batches = [int(b) for b in FLAGS.fit_batches]
  result = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "jaxlib": jaxlib.__version__, "platform": devices[0].platform,
            "device_kind": devices[0].device_kind, "devices": len(devices),
            "opt_level": FLAGS.opt_level, "fit_batches": fit_batches,
            "check_batch": FLAGS.check_batch, "limits_gib": [float(g) for g in FLAGS.limits_gib],
            "models": {}, "opt_level_checks": [], "float32_checks": []}
  for name in FLAGS.models:
    spec, shape, _ = MODELS[name]
    setup = make_setup(name, "none", 1, devices)
    fsdps = [1] + ([FLAGS.fsdp] if name in FLAGS.fsdp_models and FLAGS.fsdp != 1 else [])
    entry = {"config": spec, "image_shape": list(shape),
             "dtype": setup.config.model.dtype,
             "parameters": int(sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))),
             "fsdp": {}}
    for fsdp in fsdps:
      mesh = sharding.make_mesh(fsdp, devices)
      entry["fsdp"][str(fsdp)] = {
          "mesh": dict(mesh.shape),
          "state_bytes_per_device": state_bytes(make_setup(name, "none", fsdp, devices), mesh),
          "remat": {r: series(name, r, fsdp, devices, fit_batches, FLAGS.check_batch)
                    for r in FLAGS.remat}}
    result["models"][name] = entry
    if FLAGS.opt_level_check and FLAGS.opt_level >= 0:
      first = entry["fsdp"]["1"]["remat"][FLAGS.remat[0]]["points"][0]
      check = opt_level_check(name, FLAGS.remat[0], first, devices)
      print(f"{name}: memory analysis at opt level {FLAGS.opt_level} "
            f"{'equals' if check['same'] else 'DIFFERS FROM'} the default level's", flush=True)
      result["opt_level_checks"].append(check)
    if FLAGS.float32_check and entry["dtype"] == "bfloat16" and "none" in FLAGS.remat:
      check = float32_check(name, entry["fsdp"]["1"]["remat"]["none"]["points"][:2], devices)
      print(f"{name}: {check['bfloat16_b'] / 2 ** 20:.0f} MiB per example with bfloat16 compute, "
            f"{check['float32_b'] / 2 ** 20:.0f} with float32", flush=True)
      result["float32_checks"].append(check)
    common.write_json(FLAGS.out, dict(result))  # after each model: a long run keeps its part
  common.write_json(FLAGS.out, result)


if __name__ == "__main__":
  common.run(main, required=("out",))
