"""IPR on its constraint benchmarks (IPR Sec. 4.2-4.5): 4x4 Digit Sudoku, Even Pixels, Counting Polygons.

  python -m experiments.ipr.ipr_benchmarks --out=results/ipr   # trains (or resumes), evaluates
  python -m experiments.ipr.ipr_benchmarks --tiny --out=/tmp/ipr_tiny   # smoke run, workdirs in it

1. Training: `configs/sudoku4.py:cpu`, `configs/even_pixels.py:cpu` and
   `configs/polygons.py:cpu` (tiny widths for a 2-core CPU) with the sharded, resumable loop
   (`common.train_or_resume`) in <workdir_root>/sudoku4, even_pixels and polygons; a rerun
   resumes an interrupted run and skips a finished one.
2. x^(0): the paper's sequential initial generation (SRM), `policies.uncertainty_ordered`
   over the regions (4x4 cells / 8x8 patches of 4x4 pixels) with Table 1's hyperparameters:
   Sudoku init_overlap 0.0, 3 steps per patch, IPR overlap 0.8, 10 steps per patch; Even
   Pixels 0.9 / 30 / 0.9 / 30; Counting Polygons 0.9 / 10 / 0.9 / 10 (8x8 patches of 4x4
   pixels); stochasticity 0.5 (the sampler's eta). The budget of a run
   is steps_per_patch * ((n - 1)(1 - overlap) + 1) for its largest region count n.
   --orders: `raster`, the baseline every table reads (no head: the waiting regions go in
   raster order, the policy's ties going to the lowest id), and `uncertainty`, SRM's order as
   the paper runs it: an uncertainty head (configs/uncertainty_digits.py, --head_steps,
   trained or resumed in <workdir>_head) ranks the waiting regions by their predicted
   uncertainty, for x^(0) and for every round's regenerations. The SRM run repeats the
   main curve (Sudoku HARD, Even Pixels, Counting Polygons) on the same samples, labels and
   keys, so the JSON's srm_order holds its curve and the paired bootstrap interval (over
   samples) of SRM - raster at x^(0) and the last round, with the rule's verdict.
3. IPR (Alg. 1) for --num_rounds rounds, every round scored:
   Sudoku HARD (test grids, givens 0..5 fixed and excluded: the condition set), validity
   read by the in-project cell classifier (evaluation/constraints.py); K-corrupted valid
   grids (K in {1, 3, 5} swapped pairs, every cell may change); ablations on HARD:
   alpha in {0.1, 0.25, 0.5}, fixed noise, fixed regions (from the same x^(0)), each with
   the paired bootstrap interval (over the grids) of its last round - the main run's.
   Even Pixels: balance accuracy, mean count error, saturation / value std.
   Counting Polygons (class-conditional, the label = the number of polygons asked for, every
   count equally often, CFG): count accuracy (the exact reader of evaluation/polygon_count.py
   against the label), mean |count - label|, vertex uniformity; per count at x^(0) and the
   last round.
Writes <out>/ipr_sudoku.json, ipr_even_pixels.json, ipr_polygons.json, Markdown tables
(.md), curves (.png) and grids of the rounds (_rounds.png), with the command and wall times.
"""

from __future__ import annotations

import json
import math
import os
import time

from absl import flags, logging
import jax
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.generation import generate
from asyncpatch_jax.data import datasets
from asyncpatch_jax.data import even_pixels as even_pixels_lib
from asyncpatch_jax.data import image_io
from asyncpatch_jax.data import sudoku as sudoku_lib
from asyncpatch_jax.diffusion import ipr
from asyncpatch_jax.diffusion import policies
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.evaluation import constraints
from asyncpatch_jax.evaluation import digit_classifier
from asyncpatch_jax.evaluation import polygon_count
from asyncpatch_jax.evaluation import statistics
from asyncpatch_jax.runtime import progress
from experiments import common

# The orders of x^(0) and of the regenerations; raster is the baseline every table reads.
ORDERS = ("raster", "uncertainty")
ORDER_NAMES = {"raster": "raster (no head)", "uncertainty": "SRM uncertainty order (head)"}
FLAGS = flags.FLAGS
flags.DEFINE_string("workdir_root", "", "Workdirs sudoku4/, even_pixels/ and polygons/ below it "
                    "(default /tmp/ipr_benchmarks; with --tiny <out>/tiny_workdirs).")
flags.DEFINE_string("out", "results/ipr", "Results folder.")
BENCHMARKS = ("sudoku", "even_pixels", "polygons")
flags.DEFINE_list("benchmarks", list(BENCHMARKS), "Which benchmarks to run.")
flags.DEFINE_integer("num_rounds", 50, "IPR rounds R (the paper: 50).")
flags.DEFINE_integer("sudoku_samples", 64, "HARD test grids (main curve and ablations).")
flags.DEFINE_integer("corrupted_samples", 32, "Valid grids per K of the K-corrupted study.")
flags.DEFINE_integer("ablation_samples", 32, "HARD grids of each ablation (the first ones).")
flags.DEFINE_integer("even_pixels_samples", 48, "Even Pixels samples.")
flags.DEFINE_integer("polygons_samples", 48, "Counting Polygons samples (labels cycle over the "
                     "counts).")
flags.DEFINE_float("polygons_guidance", None, "CFG weight of the Counting Polygons samples "
                   "(default: configs/polygons.py's sample.guidance).")
flags.DEFINE_list("corruptions", ["1", "3", "5"], "K swapped pairs of the K-corrupted study.")
flags.DEFINE_list("ablation_alphas", ["0.1", "0.5"], "Resampling ratios besides --alpha.")
flags.DEFINE_float("alpha", 0.25, "Resampling ratio of the main runs (Table 1 / Sec. 4.1).")
flags.DEFINE_float("eta", 0.5, "Sampler stochasticity (Table 1: 0.5).")
flags.DEFINE_integer("classifier_steps", 600, "Training steps of the in-project cell classifier.")
flags.DEFINE_integer("seed", 0, "Root seed.")
flags.DEFINE_list("orders", list(ORDERS), "Orders of x^(0) and the regenerations: raster (no "
                  "head: the policy's ties go to the lowest region) and uncertainty (SRM's: an "
                  "uncertainty head trained on the benchmark's model in <its workdir>_head).")
flags.DEFINE_integer("head_steps", 600, "Training steps of each benchmark's uncertainty head.")
common.define_tiny(dict(num_rounds=2, sudoku_samples=2, corrupted_samples=2, ablation_samples=2,
                        even_pixels_samples=2, polygons_samples=4, classifier_steps=5),
                   "Smoke run: tiny UNets, 2 training steps, 2 samples, 2 rounds, 16x16 Even "
                   "Pixels, one IPR budget for every Sudoku run (writes every field).")

# IPR paper Table 1 (App. D.2).
TABLE1 = {
    "sudoku": dict(init_overlap=0.0, init_steps_per_patch=3, ipr_overlap=0.8,
                   ipr_steps_per_patch=10, stochasticity=0.5),
    "even_pixels": dict(init_overlap=0.9, init_steps_per_patch=30, ipr_overlap=0.9,
                        ipr_steps_per_patch=30, stochasticity=0.5),
    "polygons": dict(init_overlap=0.9, init_steps_per_patch=10, ipr_overlap=0.9,
                     ipr_steps_per_patch=10, stochasticity=0.5),
}
SUDOKU_N = 4            # the 4x4 variant (data/sudoku.py grid_size=4)
EP_PATCH = 4            # Even Pixels regions: 4x4-pixel patches (IPR Sec. 4.4)
# Counting Polygons regions: the paper's 8x8 patches of 128x128 images are a 16x16 grid; the
# 32x32 :cpu images take 4x4 patches (an 8x8 grid, as Even Pixels).
PG_PATCH = 4
SHOWN_ROUNDS = (0, 1, 2, 5, 10, 20, 30, 40, 50)


def _workdir_root() -> str:
  if FLAGS.workdir_root:
    return FLAGS.workdir_root
  return os.path.join(FLAGS.out, "tiny_workdirs") if FLAGS.tiny else "/tmp/ipr_benchmarks"


def _load_config(spec: str, tiny: bool):
  config = common.load_config(spec)
  if tiny:
    common.updated(config, {
        "model": common.TINY_UNET,
        "train": dict(batch_size=8, num_steps=2, log_every=1, checkpoint_every=2,
                      progress_bar=False),
        "optim": dict(warmup_steps=1), "sample": dict(num_images=0)})
    if config.data.dataset == "even_pixels":
      with config.unlocked():
        config.data.options = {"image_size": 16}
  return config


def _train_seconds(workdir: str) -> float:
  """Training time from the workdir's metrics.jsonl (steps / steps_per_s per log interval)."""
  path = os.path.join(workdir, "metrics.jsonl")
  total, last = 0.0, 0
  if os.path.exists(path):
    for line in open(path):
      rec = json.loads(line)
      if "steps_per_s" in rec and rec["steps_per_s"] > 0:
        total += (rec["step"] - last) / rec["steps_per_s"]
        last = rec["step"]
  return total


def budget(num_regions: int, steps_per_patch: int, overlap: float) -> int:
  """Steps of a sequential run over n regions: steps_per_patch ((n - 1)(1 - overlap) + 1)."""
  return max(int(math.ceil(steps_per_patch * ((num_regions - 1) * (1 - overlap) + 1) - 1e-9)),
             num_regions - 1 + int(math.ceil(1 / (1 - overlap) - 1e-9)))


def _with_head(workdir: str, config, tiny: bool):
  """The benchmark's trained run with an uncertainty head (SRM's order): the head
  (configs/uncertainty_digits.py, --head_steps steps, the model frozen, trained on the model's
  own data and timestep sampler) is trained or resumed in <workdir>_head. Returns the run
  and the head's description."""
  head_dir = workdir + "_head"
  head_config = common.load_config("uncertainty_digits")
  common.updated(head_config, {"uncertainty": dict(model_workdir=workdir),
                               "train": dict(num_steps=FLAGS.head_steps, progress_bar=False)})
  if tiny:
    common.updated(head_config, {"train": dict(batch_size=8, num_steps=2, log_every=1,
                                               checkpoint_every=2),
                                 "optim": dict(warmup_steps=1)})
  train_call_s = common.train_or_resume(head_config, head_dir)
  run = common.load_run(workdir, config, head_workdir=head_dir)
  info = {"config": "configs/uncertainty_digits.py", "workdir": head_dir,
          "train_steps": head_config.train.num_steps,
          "parameters": int(sum(x.size for x in jax.tree.leaves(run.head_params))),
          "train_time_s": _train_seconds(head_dir), "train_call_s": train_call_s}
  return run, info


def _paired(a: np.ndarray, b: np.ndarray) -> dict:
  """a - b for per-sample successes [B] on the same samples, labels and keys: the paired
  bootstrap interval (percentile; the values are 0/1) of the rate, with the rule's verdict."""
  d = statistics.paired(np.asarray(a, float), np.asarray(b, float), method="percentile")
  return dict(d.as_dict(), verdict=statistics.verdict(d))


def _ipr_gain(success: dict) -> dict:
  """What the rounds did, per order: `_paired` of the last round - x^(0).
  success: order -> per-sample success [rounds + 1, B] (None: the order was not run)."""
  return {order: _paired(ok[-1], ok[0]) for order, ok in success.items() if ok is not None}


def _order_comparison(raster: np.ndarray, srm: np.ndarray) -> dict:
  """SRM order - raster (`_paired`) at x^(0) and at the last round; raster, srm: per-sample
  success [rounds + 1, B]."""
  return {name: _paired(srm[r], raster[r]) for name, r in (("x0", 0), ("last", -1))}


def _rates(valid: np.ndarray) -> dict:
  """Validity [R + 1, B] -> per-round rate and its binomial standard error."""
  p = valid.mean(axis=1)
  return {"validity": p.tolist(), "stderr": np.sqrt(p * (1 - p) / valid.shape[1]).tolist(),
          "num_samples": int(valid.shape[1])}


def _shown(rounds: int) -> list[int]:
  return sorted({r for r in SHOWN_ROUNDS if r <= rounds} | {rounds})


# ----------------------------------------------------------------------------- Sudoku


def run_sudoku(key, rounds: int, tiny: bool, bar) -> dict:
  hp = TABLE1["sudoku"]
  workdir = os.path.join(_workdir_root(), "sudoku4")
  config = _load_config("sudoku4:cpu", tiny)
  train_call_s = common.train_or_resume(config, workdir)
  run = common.load_run(workdir, config)
  params = run.params
  gen = generate.Generator(run.model)
  h, w, c = run.image_shape
  n, cell = SUDOKU_N, h // SUDOKU_N
  regions = schedules.grid_regions(h, w, (n, n))
  n_main = FLAGS.sudoku_samples
  n_corrupt = FLAGS.corrupted_samples
  n_ablate = FLAGS.ablation_samples
  eta = FLAGS.eta

  t0 = time.time()
  cls_params, held_out = digit_classifier.train_classifier(
      jax.random.fold_in(key, 0), FLAGS.classifier_steps)
  test = datasets.get_dataset("sudoku", "test", grid_size=n,
                              num_examples=max(n_main, n_corrupt, 8 if tiny else 256))
  examples = [test[i] for i in range(len(test))]
  real = np.stack([e["image"] for e in examples])
  solutions = np.stack([e["solution"] for e in examples])
  cell_mask = np.stack([e["cell_mask"] for e in examples]) > 0
  read = constraints.sudoku_validity(cls_params, real, n)
  classifier = {"steps": FLAGS.classifier_steps,
                "held_out_accuracy_10_classes": held_out,
                "rendered_cell_accuracy": float(np.mean(read["grids"] == solutions)),
                "real_grid_validity": read["rate"], "num_real_grids": len(real),
                "wall_s": time.time() - t0}
  bar.update(1)

  def validity_history(history):
    history = np.asarray(history)
    return np.stack([constraints.sudoku_validity(cls_params, x, n)["valid"] for x in history])

  alphas = [FLAGS.alpha] + [float(a) for a in FLAGS.ablation_alphas]
  tiny_steps = max(budget(int(ipr.num_resampled(a, n * n, 0)), hp["ipr_steps_per_patch"],
                          hp["ipr_overlap"]) for a in alphas)

  def refine(x, k, alpha, condition, generator=gen, head_params=None, **options):
    n_free = n * n - (0 if condition is None else int(condition.reshape(len(x), -1).sum(1).min()))
    n_max = int(ipr.num_resampled(alpha, n * n, n * n - n_free))
    steps = budget(n_max, hp["ipr_steps_per_patch"], hp["ipr_overlap"])
    if tiny:   # one budget for every run: one compilation serves them (smoke run only)
      steps = tiny_steps
    _, history, _ = generator.refine(
        params, x, key=k, regions=regions, num_rounds=rounds, alpha=alpha, num_steps=steps,
        condition=None if condition is None else condition.reshape(len(x), -1), eta=eta,
        policy=policies.uncertainty_ordered(None, hp["ipr_overlap"]), return_history=True,
        head_params=head_params, **options)
    return history, steps

  # x^(0): sequential generation of the HARD test grids' free cells, clues given.
  t0 = time.time()
  init_steps = budget(n * n, hp["init_steps_per_patch"], hp["init_overlap"])
  x_clues = real[:n_main]
  known = sudoku_lib.cell_mask_to_pixels(cell_mask[:n_main].astype(np.float32), cell)
  x0 = np.asarray(gen(params, policies.uncertainty_ordered((n, n), hp["init_overlap"]),
                      key=jax.random.fold_in(key, 1), x=x_clues, budget=init_steps,
                      known=known, eta=eta).samples)
  init_s = time.time() - t0
  bar.update(1)

  runs, wall = {}, {"init": init_s}
  t0 = time.time()
  history, ipr_steps = refine(x0, jax.random.fold_in(key, 2), FLAGS.alpha, cell_mask[:n_main])
  hard_history = np.asarray(history)
  hard_valid = validity_history(hard_history)
  runs["hard"] = _rates(hard_valid)
  wall["hard"] = time.time() - t0
  bar.update(1)

  srm_order = srm_valid = None
  if "uncertainty" in FLAGS.orders:   # the same grids, clues and keys in SRM's order
    srun, head_info = _with_head(workdir, config, tiny)
    gen_srm = generate.Generator(srun.model, head=srun.head)
    t0 = time.time()
    x0_srm = np.asarray(gen_srm(params, policies.uncertainty_ordered((n, n), hp["init_overlap"]),
                                key=jax.random.fold_in(key, 1), x=x_clues, budget=init_steps,
                                known=known, eta=eta, head_params=srun.head_params).samples)
    history, _ = refine(x0_srm, jax.random.fold_in(key, 2), FLAGS.alpha, cell_mask[:n_main],
                        generator=gen_srm, head_params=srun.head_params)
    srm_valid = validity_history(np.asarray(history))
    srm_order = {"order": ORDER_NAMES["uncertainty"], "hard": _rates(srm_valid), "head": head_info,
                 "comparison": {"validity": _order_comparison(hard_valid, srm_valid)},
                 "wall_s": time.time() - t0}
    bar.update(1)

  corrupted = {}
  for kk in (int(k) for k in FLAGS.corruptions):
    t0 = time.time()
    images, _ = sudoku_lib.corrupt_by_swaps(real[:n_corrupt], solutions[:n_corrupt], kk,
                                            np.random.default_rng([FLAGS.seed, kk]), cell)
    history, _ = refine(images, jax.random.fold_in(key, 100 + kk), FLAGS.alpha, None)
    corrupted[str(kk)] = _rates(validity_history(history))
    wall[f"corrupted_{kk}"] = time.time() - t0
    bar.update(1)

  ablations = {}
  x_ab, cond_ab = x0[:n_ablate], cell_mask[:n_ablate]
  variants = [(f"alpha_{a}", float(a), {}) for a in FLAGS.ablation_alphas]
  variants += [("fixed_noise", FLAGS.alpha, {"fixed_noise": True}),
               ("fixed_regions", FLAGS.alpha, {"fixed_regions": True})]
  reference = hard_valid[:, :n_ablate]       # the main run on the same grids, x^(0) and keys
  for name, alpha, options in variants:
    t0 = time.time()
    history, steps = refine(x_ab, jax.random.fold_in(key, 2), alpha, cond_ab, **options)
    valid = validity_history(history)
    ablations[name] = dict(_rates(valid), alpha=alpha, ipr_steps=steps,
                           last_minus_main=_paired(valid[-1], reference[-1]))
    wall[name] = time.time() - t0
    bar.update(1)
  # The main run on the same first grids: the reference line of the ablations.
  ablations[f"alpha_{FLAGS.alpha}"] = dict(
      _rates(validity_history(hard_history[:, :n_ablate])), alpha=FLAGS.alpha,
      ipr_steps=ipr_steps)
  order = sorted((a for a in ablations if a.startswith("alpha_")), key=lambda a: float(a[6:]))
  ablations = {k: ablations[k] for k in order + ["fixed_noise", "fixed_regions"]}

  out_stem = os.path.join(FLAGS.out, "ipr_sudoku")
  shown = _shown(rounds)
  rows = hard_history[shown, :8]
  image_io.save_grid(rows.reshape(-1, h, w, c), out_stem + "_rounds.png",
                     ncols=rows.shape[1], scale=2)
  return {
      "benchmark": f"Digit Sudoku {n}x{n} HARD (givens {test.num_givens[0]}..{test.num_givens[1]} "
                   f"of {n * n}), {h}x{w} images",
      "rounds": list(range(rounds + 1)),
      "hard": runs["hard"], "corrupted": corrupted, "ablations": ablations,
      "classifier": classifier, "srm_order": srm_order,
      "ipr_gain": {"validity": _ipr_gain({"raster": hard_valid,
                                          "uncertainty": srm_valid})},
      "model": _model_info(config, run, "configs/sudoku4.py:cpu", train_call_s),
      "settings": dict(hp, alpha=FLAGS.alpha, eta=eta, num_rounds=rounds,
                       init_budget=init_steps, ipr_budget=ipr_steps,
                       order=ORDER_NAMES["raster"], orders=list(FLAGS.orders),
                       regions=f"{n}x{n} cells of {cell}x{cell} pixels",
                       hard_samples=n_main, corrupted_samples=n_corrupt,
                       ablation_samples=n_ablate),
      "wall_s": wall, "rounds_grid": out_stem + "_rounds.png", "rounds_shown": shown,
  }


# ------------------------------------------------------------------------- Even Pixels


def _patch_ipr(name: str, spec: str, patch: int, key, rounds: int, tiny: bool, bar, num: int,
               **cond) -> dict:
  """The patch benchmarks' protocol (IPR Table 1): train or resume `spec`'s model, draw x^(0)
  patch by patch, then `rounds` IPR rounds; cond: labels and guidance. In raster order
  (history) and, with "uncertainty" in --orders, again on the same keys in SRM's order with
  an uncertainty head (srm_history)."""
  hp = TABLE1[name]
  workdir = os.path.join(_workdir_root(), name)
  config = _load_config(spec, tiny)
  train_call_s = common.train_or_resume(config, workdir)
  run = common.load_run(workdir, config)
  h, w, c = run.image_shape
  grid = (h // patch, w // patch)
  n_regions = grid[0] * grid[1]
  init_steps = budget(n_regions, hp["init_steps_per_patch"], hp["init_overlap"])
  n_sel = int(ipr.num_resampled(FLAGS.alpha, n_regions, 0))
  ipr_steps = budget(n_sel, hp["ipr_steps_per_patch"], hp["ipr_overlap"])
  out = dict(hp=hp, config=config, run=run, train_call_s=train_call_s, wall={},
             init_steps=init_steps, ipr_steps=ipr_steps, n_sel=n_sel, srm_history=None,
             head=None)

  def sample(gen, head_params, wall):
    t0 = time.time()
    x0 = np.asarray(gen(run.params, policies.uncertainty_ordered(grid, hp["init_overlap"]),
                        key=jax.random.fold_in(key, 1), shape=(num, h, w, c),
                        budget=init_steps, eta=FLAGS.eta, head_params=head_params,
                        **cond).samples)
    wall["init"] = time.time() - t0
    bar.update(1)
    t0 = time.time()
    _, history, _ = gen.refine(run.params, x0, key=jax.random.fold_in(key, 2),
                               regions=schedules.grid_regions(h, w, grid), num_rounds=rounds,
                               alpha=FLAGS.alpha, num_steps=ipr_steps, eta=FLAGS.eta,
                               policy=policies.uncertainty_ordered(None, hp["ipr_overlap"]),
                               return_history=True, head_params=head_params, **cond)
    history = np.asarray(history)      # waits for the rounds (the call only dispatches them)
    wall["ipr"] = time.time() - t0
    return history

  out["history"] = sample(generate.Generator(run.model), None, out["wall"])
  if "uncertainty" in FLAGS.orders:
    srun, out["head"] = _with_head(workdir, config, tiny)
    out["srm_wall"] = {}
    out["srm_history"] = sample(generate.Generator(srun.model, head=srun.head),
                                srun.head_params, out["srm_wall"])
  return out


def _order_results(r: dict, metrics, success, main: str) -> tuple[dict | None, dict]:
  """(srm_order, ipr_gain) of `_patch_ipr`'s runs r. srm_order (None without an SRM run):
  the curves of metrics(images) -> dict per round, the head, the wall times, and the paired
  comparison with the raster run of the per-sample success(images) -> bool [B] (the `main`
  metric); ipr_gain: `_ipr_gain` of that success per order."""
  ok = {order: None if hist is None else np.stack([success(x) for x in hist])
        for order, hist in (("raster", r["history"]), ("uncertainty", r["srm_history"]))}
  gain = {main: _ipr_gain(ok)}
  if r["srm_history"] is None:
    return None, gain
  per_round = [metrics(x) for x in r["srm_history"]]
  block = {k: [m[k] for m in per_round] for k in per_round[0]}
  block.update(order=ORDER_NAMES["uncertainty"], head=r["head"], wall_s=r["srm_wall"],
               comparison={main: _order_comparison(ok["raster"], ok["uncertainty"])})
  return block, gain


def run_even_pixels(key, rounds: int, tiny: bool, bar) -> dict:
  num, eta = FLAGS.even_pixels_samples, FLAGS.eta
  r = _patch_ipr("even_pixels", "even_pixels:cpu", EP_PATCH, key, rounds, tiny, bar, num)
  hp, config, run, history, wall = r["hp"], r["config"], r["run"], r["history"], r["wall"]
  init_steps, ipr_steps, n_sel, train_call_s = (r[k] for k in (
      "init_steps", "ipr_steps", "n_sel", "train_call_s"))
  h, w, c = run.image_shape
  balanced = lambda x: even_pixels_lib.even_pixels_stats(x, second_peak="antipodal")["balanced"]
  srm, gain = _order_results(r, constraints.even_pixels_metrics, balanced, "balance_accuracy")
  per_round = [constraints.even_pixels_metrics(x) for x in history]
  bar.update(1)
  test = datasets.get_dataset("even_pixels", "test", num_examples=num,
                              **dict(config.data.options))
  data = constraints.even_pixels_metrics(np.stack([test[i]["image"] for i in range(num)]))
  out_stem = os.path.join(FLAGS.out, "ipr_even_pixels")
  shown = _shown(rounds)
  rows = history[shown, :8]
  image_io.save_grid(rows.reshape(-1, h, w, c), out_stem + "_rounds.png",
                     ncols=rows.shape[1], scale=2)
  result = {"benchmark": f"Even Pixels {h}x{w}, {EP_PATCH}x{EP_PATCH} patches",
            "rounds": list(range(rounds + 1))}
  for k in per_round[0]:
    result[k] = [m[k] for m in per_round]
  b = np.array(result["balance_accuracy"])
  result["balance_accuracy_stderr"] = np.sqrt(b * (1 - b) / num).tolist()
  result.update(
      srm_order=srm, ipr_gain=gain,
      data=data, model=_model_info(config, run, "configs/even_pixels.py:cpu", train_call_s),
      settings=dict(hp, alpha=FLAGS.alpha, eta=eta, num_rounds=rounds, init_budget=init_steps,
                    ipr_budget=ipr_steps, regions_per_round=n_sel,
                    order=ORDER_NAMES["raster"], orders=list(FLAGS.orders),
                    num_samples=num),
      wall_s=wall, rounds_grid=out_stem + "_rounds.png", rounds_shown=shown)
  return result


# --------------------------------------------------------------------- Counting Polygons


def _by_count(read_counts: np.ndarray, labels: np.ndarray, counts) -> dict:
  """Per asked count: the share read right and how the reads spread (count -> images)."""
  out = {}
  for k in counts:
    got = read_counts[labels == k]
    out[str(k)] = {"accuracy": float(np.mean(got == k)), "num_samples": int(len(got)),
                   "read": {str(int(v)): int(n) for v, n in zip(*np.unique(got, return_counts=True))}}
  return out


def run_polygons(key, rounds: int, tiny: bool, bar) -> dict:
  num, eta = FLAGS.polygons_samples, FLAGS.eta
  config = _load_config("polygons:cpu", tiny)
  guidance = (config.sample.guidance if FLAGS.polygons_guidance is None
              else FLAGS.polygons_guidance)
  options = dict(config.data.options)
  test = datasets.get_dataset("polygons", "test", num_examples=num, **options)
  counts = list(range(test.min_polygons, test.max_polygons + 1))
  labels = np.array([counts[i % len(counts)] for i in range(num)], np.int32)  # each count alike
  r = _patch_ipr("polygons", "polygons:cpu", PG_PATCH, key, rounds, tiny, bar, num,
                 labels=labels, guidance_weight=guidance)
  hp, config, run, history, wall = r["hp"], r["config"], r["run"], r["history"], r["wall"]
  init_steps, ipr_steps, n_sel, train_call_s = (r[k] for k in (
      "init_steps", "ipr_steps", "n_sel", "train_call_s"))
  h, w, c = run.image_shape
  t0 = time.time()
  per_round = [constraints.polygons_metrics(x, labels) for x in history]
  first, last = (polygon_count.count_polygons(history[r]) for r in (0, rounds))
  wall["read"] = time.time() - t0
  bar.update(1)
  real = np.stack([test[i]["image"] for i in range(num)])
  data = constraints.polygons_metrics(real, np.array([test[i]["label"] for i in range(num)]))
  out_stem = os.path.join(FLAGS.out, "ipr_polygons")
  shown = _shown(rounds)
  rows = history[shown, :8]
  image_io.save_grid(rows.reshape(-1, h, w, c), out_stem + "_rounds.png",
                     ncols=rows.shape[1], scale=2)
  result = {"benchmark": f"Counting Polygons {h}x{w}, {counts[0]}..{counts[-1]} polygons asked "
                         f"by label, {PG_PATCH}x{PG_PATCH} patches",
            "rounds": list(range(rounds + 1))}
  for k in per_round[0]:
    result[k] = [m[k] for m in per_round]
  a = np.array(result["count_accuracy"])
  result["count_accuracy_stderr"] = np.sqrt(a * (1 - a) / num).tolist()
  result["by_count"] = {"x0": _by_count(first, labels, counts),
                        "last": _by_count(last, labels, counts)}
  counted = lambda x: polygon_count.count_polygons(x) == labels
  srm, result["ipr_gain"] = _order_results(r, lambda x: constraints.polygons_metrics(x, labels),
                                           counted, "count_accuracy")
  if srm is not None:
    srm["by_count"] = {k: _by_count(polygon_count.count_polygons(r["srm_history"][i]), labels,
                                    counts) for k, i in (("x0", 0), ("last", rounds))}
  result["srm_order"] = srm
  result.update(
      data=data, model=_model_info(config, run, "configs/polygons.py:cpu", train_call_s),
      settings=dict(hp, alpha=FLAGS.alpha, eta=eta, guidance=guidance, num_rounds=rounds,
                    init_budget=init_steps, ipr_budget=ipr_steps, regions_per_round=n_sel,
                    order=ORDER_NAMES["raster"], orders=list(FLAGS.orders), num_samples=num,
                    counts=counts,
                    data_options={k: list(v) if isinstance(v, tuple) else v
                                  for k, v in options.items()}),
      wall_s=wall, rounds_grid=out_stem + "_rounds.png", rounds_shown=shown)
  return result


def _model_info(config, run, name, train_call_s) -> dict:
  return {"config": name, "workdir": run.workdir, "parameters": run.num_params,
          "train_steps": run.step, "batch_size": config.train.batch_size,
          "train_time_s": _train_seconds(run.workdir), "train_call_s": train_call_s,
          "timestep_sampler": f"{config.timesteps.sampler} {tuple(config.timesteps.patch_sizes)}",
          "image_shape": list(run.image_shape)}


# ------------------------------------------------------------------------ tables, plots


def _pct(p, se=None):
  return f"{100 * p:.1f}" + ("" if se is None else f" ± {100 * se:.1f}")


def _se(p, n):
  p = np.asarray(p)
  return np.sqrt(p * (1 - p) / n)


def _comparison_text(res: dict) -> str:
  """The paired intervals under a table: what the rounds did (last - x^(0)) per order, and
  SRM order - raster (without an SRM run, the first only)."""
  rows = [(f"round {res['rounds'][-1]} - x^(0), {order}", metric, d)
          for metric, by_order in res.get("ipr_gain", {}).items() for order, d in by_order.items()]
  srm = res.get("srm_order")
  if srm is not None:
    rows += [(f"SRM order - raster, {'x^(0)' if r == 'x0' else 'last round'}", metric, d)
             for metric, by_round in srm["comparison"].items() for r, d in by_round.items()]
  if not rows:
    return ""
  lines = ["\nPaired differences on the same samples and keys (percentile bootstrap over "
           "samples, 95%, in points):\n\n| difference | metric | estimate [95%] | verdict |\n"
           "|---|---|---|---|\n"]
  lines += [f"| {name} | {metric} | {100 * d['estimate']:+.1f} [{100 * d['low']:+.1f}, "
            f"{100 * d['high']:+.1f}] | {d['verdict']} |\n" for name, metric, d in rows]
  return "".join(lines)


def sudoku_tables(res: dict) -> str:
  shown = res["rounds_shown"]
  ks = sorted(res["corrupted"], key=int)
  abl = [k for k in res["ablations"]]
  srm = res.get("srm_order")
  extra = [] if srm is None else ["HARD validity % (SRM order)"]
  head = ("| round | HARD validity % | " + "".join(f"{e} | " for e in extra)
          + " | ".join(f"K={k} recovery %" for k in ks) + " |\n|"
          + "---|" * (2 + len(extra) + len(ks)) + "\n")
  lines = [head]
  for r in shown:
    cells = [_pct(res["hard"]["validity"][r], res["hard"]["stderr"][r])]
    if srm is not None:
      cells.append(_pct(srm["hard"]["validity"][r], srm["hard"]["stderr"][r]))
    cells += [_pct(res["corrupted"][k]["validity"][r]) for k in ks]
    lines.append(f"| {r} | " + " | ".join(cells) + " |\n")
  names = {k: k.replace("alpha_", "alpha = ").replace("_", " ") for k in abl}
  lines.append("\nAblations (HARD, the first " + str(res["ablations"][abl[0]]["num_samples"])
               + " grids, validity %):\n\n| round | " + " | ".join(names[k] for k in abl)
               + " |\n|" + "---|" * (1 + len(abl)) + "\n")
  for r in shown:
    lines.append(f"| {r} | " + " | ".join(_pct(res["ablations"][k]["validity"][r])
                                           for k in abl) + " |\n")
  return "".join(lines) + _comparison_text(res)


def even_pixels_table(res: dict) -> str:
  srm = res.get("srm_order")
  n = res["settings"]["num_samples"]
  lines = ["| round | balance acc. % (benchmark code) | "
           + ("" if srm is None else "balance acc. % (SRM order) | ")
           + "balance acc. % (paper text) | mean count error | saturation std | value std |\n|"
           + "---|" * (6 + (srm is not None)) + "\n"]
  for r in res["rounds_shown"]:
    b = None if srm is None else srm["balance_accuracy"][r]
    s_cell = "" if srm is None else f" | {_pct(b, _se(b, n))}"
    lines.append(f"| {r} | {_pct(res['balance_accuracy'][r], res['balance_accuracy_stderr'][r])}"
                 f"{s_cell} | {_pct(res['balance_accuracy_search'][r])} | "
                 f"{res['mean_count_error'][r]:.1f} | {res['saturation_std'][r]:.4f} | "
                 f"{res['value_std'][r]:.4f} |\n")
  d = res["data"]
  lines.append(f"| data (test split) | {_pct(d['balance_accuracy'])} | "
               + ("" if srm is None else "| ")
               + f"{_pct(d['balance_accuracy_search'])} | {d['mean_count_error']:.1f} | "
               f"{d['saturation_std']:.4f} | {d['value_std']:.4f} |\n")
  return "".join(lines) + _comparison_text(res)


def polygons_table(res: dict) -> str:
  srm = res.get("srm_order")
  n = res["settings"]["num_samples"]
  lines = ["| round | count accuracy % | mean count error | vertex uniformity % |"
           + ("" if srm is None else " count accuracy % (SRM order) | mean count error (SRM "
              "order) |") + "\n|" + "---|" * (4 if srm is None else 6) + "\n"]
  for r in res["rounds_shown"]:
    s_cells = ("" if srm is None else
               f" {_pct(srm['count_accuracy'][r], _se(srm['count_accuracy'][r], n))} | "
               f"{srm['mean_count_error'][r]:.2f} |")
    lines.append(f"| {r} | {_pct(res['count_accuracy'][r], res['count_accuracy_stderr'][r])} | "
                 f"{res['mean_count_error'][r]:.2f} | {_pct(res['vertex_uniformity'][r])} |"
                 f"{s_cells}\n")
  d = res["data"]
  lines.append(f"| data (test split) | {_pct(d['count_accuracy'])} | {d['mean_count_error']:.2f} "
               f"| {_pct(d['vertex_uniformity'])} |" + ("" if srm is None else " | |") + "\n")
  ks = list(res["by_count"]["x0"])
  lines.append("\nCount accuracy % by the count asked (x^(0) / last round):\n\n| "
               + " | ".join(f"N = {k}" for k in ks) + " |\n|" + "---|" * len(ks) + "\n| "
               + " | ".join(f"{_pct(res['by_count']['x0'][k]['accuracy'])} / "
                            f"{_pct(res['by_count']['last'][k]['accuracy'])}" for k in ks)
               + " |\n")
  if srm is not None:
    lines.append("| " + " | ".join(f"SRM order: {_pct(srm['by_count']['x0'][k]['accuracy'])} / "
                                   f"{_pct(srm['by_count']['last'][k]['accuracy'])}" for k in ks)
                 + " |\n")
  return "".join(lines) + _comparison_text(res)


def _plot_sudoku(res: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  r = res["rounds"]
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  v, se = np.array(res["hard"]["validity"]), np.array(res["hard"]["stderr"])
  axes[0].plot(r, 100 * v, marker=".")
  axes[0].fill_between(r, 100 * (v - se), 100 * (v + se), alpha=0.2)
  if res.get("srm_order"):
    axes[0].plot(r, 100 * np.array(res["srm_order"]["hard"]["validity"]), marker=".",
                 label="SRM order")
    axes[0].legend(fontsize=7)
  axes[0].set_title("(a) HARD: valid Sudoku rate")
  for k in sorted(res["corrupted"], key=int):
    axes[1].plot(r, 100 * np.array(res["corrupted"][k]["validity"]), marker=".", label=f"K={k}")
  axes[1].set_title("(b) K-corrupted: recovery rate")
  for name, a in res["ablations"].items():
    axes[2].plot(r, 100 * np.array(a["validity"]), marker=".", label=name)
  axes[2].set_title("(c) ablations (HARD)")
  for ax in axes:
    ax.set_xlabel("IPR iteration")
    ax.set_ylabel("%")
    ax.set_ylim(-2, 102)
  axes[1].legend(fontsize=7)
  axes[2].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_even_pixels(res: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  r = res["rounds"]
  fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
  axes[0].plot(r, 100 * np.array(res["balance_accuracy"]), marker=".", label="benchmark code")
  axes[0].plot(r, 100 * np.array(res["balance_accuracy_search"]), marker=".", label="paper text")
  if res.get("srm_order"):
    axes[0].plot(r, 100 * np.array(res["srm_order"]["balance_accuracy"]), marker=".",
                 label="benchmark code, SRM order")
  axes[0].set_title("balance accuracy %")
  axes[0].legend(fontsize=7)
  for ax, key in zip(axes[1:], ("mean_count_error", "saturation_std", "value_std")):
    ax.plot(r, res[key], marker=".")
    ax.set_title(key.replace("_", " "))
  for ax in axes:
    ax.set_xlabel("IPR iteration")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot_polygons(res: dict, path: str):
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  r = res["rounds"]
  fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
  a, se = 100 * np.array(res["count_accuracy"]), 100 * np.array(res["count_accuracy_stderr"])
  axes[0].plot(r, a, marker=".")
  axes[0].fill_between(r, a - se, a + se, alpha=0.2)
  axes[0].set_title("count accuracy %")
  axes[1].plot(r, res["mean_count_error"], marker=".")
  if res.get("srm_order"):
    axes[0].plot(r, 100 * np.array(res["srm_order"]["count_accuracy"]), marker=".",
                 label="SRM order")
    axes[1].plot(r, res["srm_order"]["mean_count_error"], marker=".", label="SRM order")
    axes[0].legend(fontsize=7)
  axes[1].set_title("mean |count - label|")
  axes[2].plot(r, 100 * np.array(res["vertex_uniformity"]), marker=".")
  axes[2].set_title("vertex uniformity %")
  for ax in axes:
    ax.set_xlabel("IPR iteration")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _write(res: dict, stem: str, table: str, command: str):
  common.write_json(stem + ".json", res, time_key=None, indent=1)
  total = res["total_wall_s"]
  train_s = res["model"]["train_time_s"]
  with open(stem + ".md", "w") as f:
    f.write(f"# {res['benchmark']}\n\n`{command}`\n\nWall time {total:.0f} s for the "
            f"evaluation on this CPU; the model trained {res['model']['train_steps']} steps in "
            f"{train_s:.0f} s ({res['model']['parameters']} parameters).\n\n{table}")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)   # orbax logs every restore at INFO
  rounds = checks.check_positive_int(FLAGS.num_rounds, "num_rounds")
  for a in [FLAGS.alpha] + [float(x) for x in FLAGS.ablation_alphas]:
    if not 0.0 < a <= 1.0:
      raise checks.InputError(f"alpha={a}; the resampling ratio must lie in (0, 1].")
  for b in FLAGS.benchmarks:
    checks.check_choice(b, BENCHMARKS, "benchmark")
  for o in FLAGS.orders:
    checks.check_choice(o, ORDERS, "--orders")
  if "raster" not in FLAGS.orders:
    raise checks.InputError(f"--orders={','.join(FLAGS.orders)}: include raster, the baseline "
                            "the tables read (e.g. --orders=raster,uncertainty).")
  for k in FLAGS.corruptions:
    if not k.isdigit() or not 0 <= int(k) <= SUDOKU_N * SUDOKU_N // 2 - SUDOKU_N + 1:
      raise checks.InputError(f"--corruptions: K={k!r}; expected integers 0..5 for a 4x4 grid.")
  os.makedirs(FLAGS.out, exist_ok=True)
  command = common.command()
  key = jax.random.key(FLAGS.seed)
  if "sudoku" in FLAGS.benchmarks:
    total = (3 + len(FLAGS.corruptions) + len(FLAGS.ablation_alphas) + 2
             + ("uncertainty" in FLAGS.orders))
    t0 = time.time()
    with progress.bar(total, "sudoku", unit="run") as bar:
      res = run_sudoku(jax.random.fold_in(key, 1), rounds, FLAGS.tiny, bar)
    res.update(command=command, total_wall_s=time.time() - t0)
    stem = os.path.join(FLAGS.out, "ipr_sudoku")
    _plot_sudoku(res, stem + ".png")
    _write(res, stem, sudoku_tables(res), command)
    print(f"sudoku: HARD validity {res['hard']['validity'][0]:.3f} -> "
          f"{res['hard']['validity'][-1]:.3f} [{res['total_wall_s']:.0f}s]", flush=True)
  if "even_pixels" in FLAGS.benchmarks:
    t0 = time.time()
    with progress.bar(2 + ("uncertainty" in FLAGS.orders), "even_pixels", unit="run") as bar:
      res = run_even_pixels(jax.random.fold_in(key, 2), rounds, FLAGS.tiny, bar)
    res.update(command=command, total_wall_s=time.time() - t0)
    stem = os.path.join(FLAGS.out, "ipr_even_pixels")
    _plot_even_pixels(res, stem + ".png")
    _write(res, stem, even_pixels_table(res), command)
    print(f"even_pixels: balance {res['balance_accuracy'][0]:.3f} -> "
          f"{res['balance_accuracy'][-1]:.3f}, saturation std {res['saturation_std'][0]:.4f} -> "
          f"{res['saturation_std'][-1]:.4f} [{res['total_wall_s']:.0f}s]", flush=True)
  if "polygons" in FLAGS.benchmarks:
    t0 = time.time()
    with progress.bar(2 + ("uncertainty" in FLAGS.orders), "polygons", unit="run") as bar:
      res = run_polygons(jax.random.fold_in(key, 3), rounds, FLAGS.tiny, bar)
    res.update(command=command, total_wall_s=time.time() - t0)
    stem = os.path.join(FLAGS.out, "ipr_polygons")
    _plot_polygons(res, stem + ".png")
    _write(res, stem, polygons_table(res), command)
    print(f"polygons: count accuracy {res['count_accuracy'][0]:.3f} -> "
          f"{res['count_accuracy'][-1]:.3f}, vertex uniformity {res['vertex_uniformity'][0]:.3f} "
          f"-> {res['vertex_uniformity'][-1]:.3f} [{res['total_wall_s']:.0f}s]", flush=True)


if __name__ == "__main__":
  common.run(main)
