"""Cost of schedule policies and the uncertainty head, side by side with the tensor sampler.

  python -m experiments.benchmarks.bench_adaptive --out=results/adaptive/bench_adaptive.json \
      --repeats=7

Same UNet (a config's architecture; random parameters: the cost does not depend on
training), same batch and the same number of steps: the wall time per step of the
fixed-tensor sampler (samplers.Sampler with tau, one lax.scan) against the policy
sampler (one lax.while_loop) for every built-in policy with the uncertainty head, for
uncertainty_accelerated without a head (the loop and the policy alone), and for the same
tau run as a policy (the loop alone). The runs are
interleaved, repetition by repetition, and the median is reported (goal: a policy
costs <= 1.15x the tensor sampler per step). The head's FLOPs against one UNet forward
pass come from XLA's cost analysis of the compiled programs (goal: <= 5 %). `--tiny`: the
test config, batch 8, 6 steps, one repetition.
"""

from __future__ import annotations

import json
import time

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax import models
from asyncpatch_jax.diffusion import guidance
from asyncpatch_jax.diffusion import policies
from asyncpatch_jax.diffusion import samplers
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.models import uncertainty_head
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_string("config", "default", "Config (configs/<name>.py) whose UNet is timed.")
flags.DEFINE_integer("image_size", 16, "Image height and width.")
flags.DEFINE_integer("batch", 64, "Batch size.")
flags.DEFINE_integer("steps", 32, "Sampler steps (the policies' budget).")
flags.DEFINE_integer("repeats", 5, "Interleaved timed repetitions (median).")
common.define_tiny(dict(config="test", steps=6, repeats=1, batch=8))


def _flops(fn, *args) -> float:
  return float(jax.jit(fn).lower(*args).compile().cost_analysis()["flops"])


def main(argv):
  del argv
  config = common.load_config(FLAGS.config)
  model = models.build_model(config.model)
  head = uncertainty_head.build_head(config.uncertainty)
  s, c, b, n = FLAGS.image_size, config.model.out_channels, FLAGS.batch, FLAGS.steps
  shape = (b, s, s, c)
  params = models.init_params(model, jax.random.key(0), shape[1:])
  head_params = jax.jit(head.init)(jax.random.key(1), *uncertainty_head.example_inputs(
      shape[1:]))["params"]
  y = jnp.full((b,), model.null_label, jnp.int32) if model.num_classes else None

  # FLOPs of one forward pass of each, batch b, per-pixel time map.
  z = jax.random.normal(jax.random.key(2), shape)
  t = jax.random.uniform(jax.random.key(3), shape[:3])
  unet_flops = _flops(lambda p, z, t: model.apply({"params": p}, z, t, y), params, z, t)
  head_flops = _flops(lambda p, z, t, v: head.apply({"params": p}, z, t, v), head_params, z, t, z)

  velocity_fn = guidance.model_velocity_fn(model)
  plain = samplers.Sampler(velocity_fn)
  with_head = samplers.Sampler(velocity_fn, uncertainty_fn=uncertainty_head.uncertainty_fn(head))
  tau = schedules.synchronous(n, s, s)
  cond = {"params": params} if y is None else {"params": params, "y": y}
  ucond = {"head_params": head_params}
  runs = {
      "tensor": lambda k: plain(tau, key=k, shape=shape, eta=0.25, **cond),
      # The same tau through the policy loop: the while_loop's own cost.
      "schedule_policy": lambda k: plain(policies.schedule(tau), key=k, shape=shape, budget=n,
                                         eta=0.25, **cond),
      "accelerated_no_head": lambda k: plain(policies.uncertainty_accelerated(2.0), key=k,
                                             shape=shape, budget=n, eta=0.25, **cond),
  }
  for name, policy in (("uncertainty_accelerated", policies.uncertainty_accelerated(2.0)),
                       ("uncertainty_ordered", policies.uncertainty_ordered((2, 2), 0.5)),
                       ("look_ahead", policies.look_ahead(1.4, 0.4, (4, 4))),
                       ("dual_loop", policies.dual_loop(4, 0.4, (4, 4)))):
    runs[name] = (lambda p: lambda k: with_head(p, key=k, shape=shape, budget=n, eta=0.25,
                                                uncertainty_cond=ucond, **cond))(policy)
  # The steps each run takes (a policy loop may stop before its budget).
  steps_taken = {}
  for name, fn in runs.items():
    out = jax.block_until_ready(fn(jax.random.key(0)))            # compiles
    steps_taken[name] = n if name == "tensor" else int(np.asarray(out.evaluations).max())
  times = {name: [] for name in runs}
  for r in range(FLAGS.repeats):
    for name, fn in runs.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn(jax.random.key(r + 1)))
      times[name].append(time.perf_counter() - t0)
  per_step = {name: float(np.median(v)) / steps_taken[name] for name, v in times.items()}
  result = {
      "config": FLAGS.config, "image": list(shape[1:]), "batch": b, "steps": n,
      "repeats": FLAGS.repeats, "device": str(jax.devices()[0]),
      "unet_forward_gflops": unet_flops / 1e9, "head_forward_gflops": head_flops / 1e9,
      "head_flops_over_unet": head_flops / unet_flops,
      "seconds_per_step": per_step,
      "ratio_to_tensor_per_step": {k: v / per_step["tensor"] for k, v in per_step.items()},
      "steps_taken": steps_taken,
  }
  print(json.dumps(result, indent=2))
  common.write_json(FLAGS.out, result)


if __name__ == "__main__":
  common.run(main, required=("out",))
