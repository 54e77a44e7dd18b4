"""How many XLA:CPU host devices to give a CPU run: train step and 50-step sampling per setting.

  python -m experiments.benchmarks.bench_host_devices --out=results/bench/host_devices.json
  python -m experiments.benchmarks.bench_host_devices --out=/tmp/hd.json --cases=train_60m \
      --variants=1,2

The measurements behind `training.sharding.cpu_host_device_count` (the library's CPU
default). The process starts with as many host devices as the largest variant asks
for; a variant `<n>[:<xla option>=<value>[+...]]` runs the real sharded
`train.train_step` (batch over a ('data', 'fsdp') mesh of the first n devices, as
`train_and_evaluate` does; the XLA options are passed to that one compilation) and
`samplers.Sampler` on a `data` mesh of the first n devices. Every variant is compiled
first (compile time reported separately); then the timed repetitions alternate
between the variants (1, 2, 4, 1, 2, 4, ...), so that all of them see the same load
on a shared machine. Medians and spreads per variant, and speed-ups over the first.
`--tiny`: the test config (train_test, sample_test), variants 1 and 2, one repetition.
"""

from __future__ import annotations

import functools
import json
import os
import statistics
import time

from absl import flags

from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_list("variants", ["1", "2", "4"],
                  "host devices[:xla_option=value+...] per variant, e.g. 2:xla_cpu_use_xnnpack=true")
flags.DEFINE_list("cases", ["train_default", "sample_default"],
                  "train_default, sample_default, train_60m (train_test, sample_test: --tiny).")
flags.DEFINE_integer("reps", 5, "Timed repetitions per variant (alternating).")
flags.DEFINE_integer("train_steps", 3, "Train steps per repetition (1 for train_60m).")
common.define_tiny(dict(cases=["train_test", "sample_test"], variants=["1", "2"], reps=1,
                        train_steps=1))
CASES = {"train_default": ("default", 16, 1, 64), "sample_default": ("default", 16, 1, 64),
         "train_test": ("test", 16, 1, 16), "sample_test": ("test", 16, 1, 16),  # --tiny's
         "train_60m": ("imagenet64_60m", 64, 3, 8)}


def parse_variant(variant: str) -> tuple[int, dict]:
  count, _, extra = variant.partition(":")
  options = {}
  for item in filter(None, extra.split("+")):
    key, _, value = item.lstrip("-").partition("=")
    options[key] = {"true": True, "false": False}.get(value.lower(), value)
  return int(count), options


def summary(times: list[float]) -> dict:
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "all_s": times}


def bench_case(name: str, variants: list[str]) -> dict:
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import numpy as np  # pylint: disable=import-outside-toplevel
  from asyncpatch_jax.data import input_pipeline  # pylint: disable=import-outside-toplevel
  from asyncpatch_jax.diffusion import guidance, samplers, schedules  # pylint: disable=import-outside-toplevel
  from asyncpatch_jax.runtime import sharding  # pylint: disable=import-outside-toplevel
  from asyncpatch_jax.training import train  # pylint: disable=import-outside-toplevel

  cfg_name, size, c, batch = CASES[name]
  config = common.load_config(cfg_name)
  with config.unlocked():
    config.model.dtype = "float32"
    config.train.batch_size = batch
    config.train.fsdp = 1
  runners, compile_s = {}, {}
  for v in variants:
    n, options = parse_variant(v)
    devices = jax.devices()[:n]
    setup = train.Setup(config, devices=devices, image_shape=(size, size, c))
    mesh = sharding.make_mesh(1, devices)
    shardings = sharding.state_shardings(setup.abstract_state, mesh)
    state = jax.jit(setup.init_state, out_shardings=shardings)(jax.random.key(0))
    t0 = time.perf_counter()
    if name.startswith("train"):
      rng = np.random.default_rng(1)
      data = input_pipeline.make_global_batch(
          {"image": rng.uniform(-1, 1, (batch, size, size, c)).astype(np.float32),
           "label": np.arange(batch, dtype=np.int32) % 10}, mesh)
      step = jax.jit(functools.partial(train.train_step, setup=setup, root_key=jax.random.key(2)),
                     in_shardings=(shardings, sharding.batch_sharding(mesh)),
                     out_shardings=(shardings, sharding.replicated(mesh)), donate_argnums=(0,))
      compiled = step.lower(state, data).compile(compiler_options=options or None)
      compile_s[v] = time.perf_counter() - t0
      steps = FLAGS.train_steps if size <= 16 else 1
      holder = {"state": state}

      def run(_, compiled=compiled, data=data, holder=holder, steps=steps):
        for _ in range(steps):
          holder["state"], m = compiled(holder["state"], data)
        jax.block_until_ready(m)
      run(0)
      runners[v] = (run, steps)
    else:
      if options:
        raise SystemExit(f"variant {v}: XLA options are only passed to the train step; set "
                         "XLA_FLAGS for the sampler.")
      sampler = samplers.Sampler(guidance.model_velocity_fn(setup.model),
                                 mesh=sharding.sampling_mesh(devices))
      tau = schedules.synchronous(50, size, size)
      y = jnp.full((batch,), setup.model.null_label, jnp.int32)

      def run(k, sampler=sampler, params=state.params, tau=tau, y=y):
        jax.block_until_ready(sampler(tau, key=jax.random.key(k), eta=0.25,
                                      shape=(batch, size, size, c), params=params, y=y))
      run(0)
      compile_s[v] = time.perf_counter() - t0      # compile + one run
      runners[v] = (run, 1)
  times = {v: [] for v in variants}
  cpu = {v: [] for v in variants}
  loads = []
  for r in range(FLAGS.reps):
    for v in variants:
      fn, per = runners[v]
      t, c0 = time.perf_counter(), time.process_time()
      fn(r + 1)
      times[v].append((time.perf_counter() - t) / per)
      cpu[v].append((time.process_time() - c0) / per)
    loads.append(os.getloadavg()[0])
  out = {"config": cfg_name, "batch": batch, "image_size": size,
         "load_average_1min": loads, "compile_s": compile_s,
         "variants": {v: summary(times[v]) for v in variants},
         # CPU time of this process (all threads) per step/run: the work done, which
         # the other jobs on a shared machine inflate less than the wall time.
         "cpu_s_median": {v: statistics.median(cpu[v]) for v in variants}}
  base = out["variants"][variants[0]]["median_s"]
  out["speedup_over_" + variants[0]] = {v: base / out["variants"][v]["median_s"]
                                        for v in variants}
  print(name, json.dumps({"speedup": out["speedup_over_" + variants[0]],
                          "median_s": {v: out["variants"][v]["median_s"] for v in variants},
                          "cpu_s": out["cpu_s_median"],
                          "load": loads}), flush=True)
  return out


def main(argv):
  del argv
  most = max(parse_variant(v)[0] for v in FLAGS.variants)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={most}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax  # pylint: disable=import-outside-toplevel
  result = {"cpu_count": os.cpu_count(), "affinity_cores": len(os.sched_getaffinity(0)),
            "jax": jax.__version__, "xla_flags": os.environ["XLA_FLAGS"], "reps": FLAGS.reps,
            "cases": {name: bench_case(name, FLAGS.variants) for name in FLAGS.cases}}
  if FLAGS.out:
    common.write_json(FLAGS.out, result)


if __name__ == "__main__":
  common.run(main)
