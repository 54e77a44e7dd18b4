"""What a step costs when only the noisy tokens are computed (models/dit_cache.py), against
the full computation of the same clean-context DiT.

  python -m experiments.benchmarks.bench_skip --out=results/skip/cost_digits.json \
      --workdir=/tmp/asyncpatch_dit_vs_unet/dit_clean_s0 \
      --head_workdir=/tmp/asyncpatch_dit_vs_unet/head_dit_clean_s0

Rows: inpainting with each LaMa mask family (its known share), autoregressive generation
with 2, 4, 8 and 16 stages, and the uncertainty-accelerated policy at budgets 8 and 16 (its
tokens finish at different steps). For each row, on one batch:
  - FLOPs per network evaluation and image: the full model's forward pass (XLA cost
    analysis of the compiled program) against the cached sampler's, which is the active
    pass at each step's capacity plus, spread over the run, its cache refreshes (the clean
    passes), each from XLA's cost analysis of that pass (dit_cache.pass_flops; the plan of
    passes is dit_cache.plan's replay of the sampler's rule on the run's token times);
  - `ideal`: the full cost times the mean share of noisy tokens (what a step would cost if
    a noisy token cost its share of the full pass and nothing else did), and the cached
    active passes' excess over it (goal: within 10 %), with the refreshes stated apart;
    the images are sorted by noisy count into groups of 16 that each take their own capacity
    (dit_cache.velocity); `active_over_batch_max_ideal` is the cost against one capacity
    for the whole batch (its largest count), and `refreshes` counts refreshes per group;
  - wall seconds per sample of both samplers, compiled once and then interleaved
    repetition by repetition (median), and the largest difference of their samples.
Without --workdir the model is configs/dit.py:digits,clean with random parameters (the
FLOPs of a row do not depend on the weights; the policy's finishing order does, so its
rows then use a random head and say so).
"""

from __future__ import annotations

import time

from absl import flags
import jax
import numpy as np

from asyncpatch_jax import models
from asyncpatch_jax.data import masks as masks_lib
from asyncpatch_jax.diffusion import policies
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.diffusion import tokens
from asyncpatch_jax.generation import generate
from asyncpatch_jax.models import dit as dit_lib
from asyncpatch_jax.models import dit_cache
from asyncpatch_jax.models import uncertainty_head
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_string("config", "configs/dit.py:digits,clean", "Config without --workdir.")
flags.DEFINE_string("workdir", "", "A trained clean-context DiT run (else random weights).")
flags.DEFINE_string("head_workdir", "", "Its uncertainty head (the policy rows).")
flags.DEFINE_integer("batch", 64, "Images per sampler call.")
flags.DEFINE_integer("num_steps", 48, "Sampler steps of the inpainting rows.")
flags.DEFINE_list("families", list(masks_lib.FAMILIES), "Mask families.")
flags.DEFINE_list("stages", ["2", "4", "8", "16"], "Autoregressive stage counts.")
flags.DEFINE_list("budgets", ["8", "16"], "Budgets of the uncertainty-accelerated policy.")
flags.DEFINE_integer("repeats", 3, "Interleaved timed repetitions (median).")
common.define_tiny(dict(batch=4, num_steps=4, families=["thin"], stages=["2"],
                        budgets=["4"], repeats=1))

_GRIDS = {2: (1, 2), 4: (2, 2), 8: (2, 4), 16: (4, 4)}


def _model():
  if FLAGS.workdir:
    run = common.load_run(FLAGS.workdir, head_workdir=FLAGS.head_workdir or None)
    head_params = None if run.head is None else run.head_params
    return run.model, run.params, run.image_shape, run.head, head_params, "trained"
  config = common.load_config(FLAGS.config)
  if FLAGS.tiny:
    config.model.update(hidden_size=16, depth=1, num_heads=2)
  model = models.build_model(config.model)
  shape = (16, 16, config.model.out_channels)
  params = models.init_params(model, jax.random.key(0), shape)
  head = uncertainty_head.build_head(config.uncertainty)
  head_params = head.init(jax.random.key(1), *uncertainty_head.example_inputs(shape))["params"]
  return model, params, shape, head, head_params, "random"


class _Costs:
  """Per-capacity FLOPs of the passes (each lowered once)."""

  def __init__(self, model, shape):
    self.model, self.shape = model, shape
    self.full = dit_lib.forward_flops(model, shape, per_token=True)
    self._cache = {}

  def __call__(self, kind, capacity):
    if (kind, capacity) not in self._cache:
      self._cache[kind, capacity] = dit_cache.pass_flops(self.model, self.shape, kind,
                                                         capacity)
    return self._cache[kind, capacity]


def _flops(costs, token_times, num_tokens) -> dict:
  """Per network evaluation and image, from the replayed plan of passes."""
  caps = dit_cache.buckets(num_tokens)
  plan = dit_cache.plan(token_times, caps)
  steps, groups = len(plan["active"]), len(plan["active"][0])
  # Per image: each group's pass costs g images x the batch-1 pass at its capacity.
  active = sum(costs("active", c) for row in plan["active"] for c in row if c) / steps / groups
  refresh = sum(costs("clean", c) for row in plan["refresh"] for c in row if c > 0
                ) / steps / groups
  noisy = np.asarray(token_times) > 0                       # [K, B, N]
  noisy_share = float(np.mean(noisy))
  # Had the batch shared one capacity a step: the largest noisy count of its images.
  batch_max_share = float(np.mean(noisy.sum(axis=2).max(axis=1)) / num_tokens)
  ideal = costs.full * noisy_share
  return {"full": costs.full, "cached": active + refresh, "cached_active": active,
          "cached_refresh": refresh, "group_size": plan["group_size"],
          "refreshes": sum(c != 0 for row in plan["refresh"] for c in row) / groups,
          "noisy_token_share": noisy_share, "batch_max_noisy_share": batch_max_share,
          "ideal": ideal, "active_over_ideal": active / ideal if ideal else None,
          "active_over_batch_max_ideal": (active / (costs.full * batch_max_share)
                                          if batch_max_share else None),
          "cached_over_full": (active + refresh) / costs.full}


def _time(fns, repeats) -> tuple[list[float], object]:
  """Median seconds of each fn (compiled by a first call), interleaved."""
  outs = [fn() for fn in fns]
  times = [[] for _ in fns]
  for _ in range(repeats):
    for i, fn in enumerate(fns):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[i].append(time.perf_counter() - start)
  return [float(np.median(t)) for t in times], outs


def main(argv):
  del argv
  model, params, shape, head, head_params, weights = _model()
  if not getattr(model, "clean_context", False):
    raise ValueError("--workdir must be a clean-context DiT (configs/dit.py:<data>,clean).")
  b, p = FLAGS.batch, model.patch_size
  n_tokens = (shape[0] // p) * (shape[1] // p)
  full = generate.Generator(model, mesh=None, head=head)
  cached = generate.Generator(model, mesh=None, head=head, clean_cache=True)
  costs = _Costs(model, shape)
  labels = np.arange(b) % model.num_classes if model.num_classes else None
  x = np.random.default_rng(0).uniform(-1, 1, (b, *shape)).astype(np.float32)
  rows = []

  def add(name, extra, token_times, run_full, run_cached):
    (t_full, t_cached), (a, c) = _time([run_full, run_cached], FLAGS.repeats)
    a, c = np.asarray(getattr(a, "samples", a)), np.asarray(getattr(c, "samples", c))
    row = {"row": name, **extra, "flops_per_evaluation": _flops(costs, token_times, n_tokens),
           "seconds_per_sample": {"full": t_full / b, "cached": t_cached / b,
                                  "cached_over_full": t_cached / t_full},
           "max_abs_difference": float(np.abs(a - c).max())}
    rows.append(row)
    f = row["flops_per_evaluation"]
    print(f"{name}: noisy {f['noisy_token_share']:.2f}, FLOPs cached/full "
          f"{f['cached_over_full']:.3f} (active/ideal {f['active_over_ideal']:.3f}), time "
          f"{row['seconds_per_sample']['cached_over_full']:.3f}", flush=True)

  key = jax.random.key(0)
  for family in FLAGS.families:
    mask = masks_lib.make_masks(family, b, shape[0], shape[1], seed=0)
    tau = schedules.inpainting(mask, FLAGS.num_steps)
    tasks = [g.task(tau, x, mask) for g in (full, cached)]
    tt = tokens.token_times(tasks[0].tau[:-1].reshape(-1, *shape[:2]), p).reshape(
        FLAGS.num_steps, b, n_tokens)
    add(f"inpaint {family}", {"kind": "inpaint", "family": family,
                              "known_pixel_share": float(mask.mean()),
                              "known_token_share": float(1 - tt[0].astype(bool).mean())},
        tt, lambda: full.generate(params, tasks[0], key=key, labels=labels),
        lambda: cached.generate(params, tasks[1], key=key, labels=labels))
  for stages in map(int, FLAGS.stages):
    steps = max(FLAGS.num_steps // stages, 1)
    tau = schedules.autoregressive(shape[0], shape[1], _GRIDS[stages], steps)
    tt = np.broadcast_to(tokens.token_times(tau[:-1], p)[:, None], (len(tau) - 1, b, n_tokens))
    add(f"autoregressive {stages} stages", {"kind": "autoregressive", "stages": stages,
                                            "steps_per_stage": steps}, tt,
        lambda: full(params, tau, key=key, shape=(b, *shape), labels=labels),
        lambda: cached(params, tau, key=key, shape=(b, *shape), labels=labels))
  for budget in map(int, FLAGS.budgets):
    policy = policies.uncertainty_accelerated(2.0)
    kw = dict(key=key, shape=(b, *shape), budget=budget, labels=labels,
              head_params=head_params, return_history=True)
    ref = full(params, policy, **kw)
    times = np.asarray(ref.history["times"])[: int(ref.history["num_steps"])]
    tt = tokens.token_times(times.reshape(-1, *shape[:2]), p).reshape(len(times), b, n_tokens)
    add(f"uncertainty_accelerated budget {budget}",
        {"kind": "policy", "budget": budget, "head": weights,
         "steps_run": int(ref.history["num_steps"])}, tt,
        lambda: full(params, policy, **kw), lambda: cached(params, policy, **kw))
  common.write_json(FLAGS.out, {
      "settings": {k: FLAGS[k].value for k in ("config", "workdir", "head_workdir", "batch",
                                               "num_steps", "repeats")},
      "weights": weights, "tokens": n_tokens, "buckets": list(dit_cache.buckets(n_tokens)),
      "device": jax.devices()[0].device_kind, "rows": rows})


if __name__ == "__main__":
  common.run(main, required=("out",))
