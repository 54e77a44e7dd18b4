"""The DiT against the UNet on the embedded digits, at equal training FLOPs, over training seeds.

  python -m experiments.asyncpatch.dit_comparison --out=results/dit/dit_vs_unet_digits.json
  python -m experiments.asyncpatch.dit_comparison --baseline=dit=configs/dit.py \
      --candidate=dit_clean=configs/dit.py:digits,clean --out=results/skip/clean_vs_dit_digits.json

The second compares the clean-context DiT (configs/dit.py:digits,clean: 928 steps, its
samples from the cached sampler) with the unmasked DiT at the same training FLOPs, reusing
the DiT runs (and their cached scores) of the first.

Trains each backbone's config (--unet: configs/default.py, 13.46 GFLOP a step x 1000 steps;
--dit: configs/dit.py, 14.50 GFLOP a step x 928 steps: the same training FLOPs, from XLA's
cost analysis of the train step, recomputed here into the JSON) once per seed in
<workdir_root>/<backbone>_s<seed> (resumable: a finished run is reused, an interrupted one
resumes), then scores every run with the same evaluation key and masks:
  - eval.json of its training (the digit classifier's confident share of unconditional
    samples and label accuracy of conditional ones, AsyncPatch's main-job metrics);
  - `generation`: --num_samples class-conditional samples, fd_digits and PRDC against the
    held-out digits;
  - `inpainting` (Eq. 4) of --num_inpaint held-out digits per mask family: PSNR, SSIM,
    fd_digits.
Each run's scores are cached beside its checkpoints (rerunning rescoring nothing). For every
metric the JSON keeps the per-seed values, each backbone's mean and standard error over
seeds, and the DiT - UNet difference with Welch's t interval over seeds and its verdict
(evaluation/statistics.py: "better"/"worse" only when the 95% interval excludes 0).
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import jax
import numpy as np

from asyncpatch_jax.data import masks as masks_lib
from asyncpatch_jax.diffusion import repaint
from asyncpatch_jax.evaluation import inpainting_eval
from asyncpatch_jax.evaluation import statistics
from asyncpatch_jax.evaluation.evaluators import base as evaluators_base
from asyncpatch_jax.generation import generate
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path (a Markdown table goes next to it).")
flags.DEFINE_string("baseline", "unet=configs/default.py",
                    "<name>=<config> of the baseline (workdirs <workdir_root>/<name>_s<seed>).")
flags.DEFINE_string("candidate", "dit=configs/dit.py",
                    "<name>=<config> of the model compared with it (candidate - baseline).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds of each backbone.")
flags.DEFINE_string("workdir_root", "/tmp/asyncpatch_dit_vs_unet", "One workdir per run below it.")
flags.DEFINE_integer("num_samples", 1000, "Generated samples per run.")
flags.DEFINE_integer("num_inpaint", 256, "Held-out images inpainted per mask family.")
flags.DEFINE_list("families", ["thin", "wide", "square", "extrema"], "Mask families.")
flags.DEFINE_integer("num_steps", 50, "Sampler steps (generation and inpainting).")
flags.DEFINE_integer("batch", 250, "Sampling batch.")
flags.DEFINE_integer("classifier_steps", 600, "Training steps of the digit feature network.")
flags.DEFINE_integer("train_steps_scale", 1, "Divides both configs' steps (--tiny).")
flags.DEFINE_bool("repaint_equal_time", False,
                  "Also inpaint with RePaint on the baseline's runs at the wall time of the "
                  "candidate's inpainting (per family, measured here), against the candidate.")
flags.DEFINE_integer("repaint_jump", 5, "RePaint's jump length (jump_n_sample 2) in that row.")
common.define_tiny(dict(seeds=["0", "1"], num_samples=16, num_inpaint=8, families=["square"],
                        num_steps=4, batch=16, classifier_steps=5, train_steps_scale=250))



def _named(flag: str) -> tuple[str, str]:
  name, _, config = FLAGS[flag].value.partition("=")
  if not name or not config:
    raise ValueError(f"--{flag}={FLAGS[flag].value}; expected <name>=<config>.")
  return name, config


def backbones() -> tuple[str, str]:
  """(baseline name, candidate name)."""
  return _named("baseline")[0], _named("candidate")[0]
# Metric -> whether higher is better.
EVAL_JSON = {"unconditional_confident_fraction": True, "conditional_label_accuracy": True}
GENERATION = {"fd_digits": False, "precision_digits": True, "recall_digits": True,
              "density_digits": True, "coverage_digits": True}
INPAINTING = {"psnr": True, "ssim": True, "fd_digits": False}


def _config(backbone: str, seed: int):
  config = common.load_config(dict((_named("baseline"), _named("candidate")))[backbone])
  config.seed = seed
  config.train.num_steps = max(config.train.num_steps // FLAGS.train_steps_scale, 2)
  if FLAGS.tiny:
    config.evaluate.update(classifier_samples=16, classifier_steps=5)
    config.sample.update(num_images=0)
    config.model.update(common.TINY_UNET if config.model.name == "unet" else
                        dict(hidden_size=16, depth=1, num_heads=2))
  return config


def _eval_config(workdir: str, families, method: str = "asyncpatch", repaint_params=None):
  config = common.load_config(os.path.join(workdir, "config.json"))
  config.sample.update(num_steps=FLAGS.num_steps, eta=0.25)
  config.evaluate.update(
      num_samples=FLAGS.num_samples, batch_size=FLAGS.batch, guidance=0.0,
      reference_split="test", num_reference=0, mask_families=tuple(families),
      num_inpaint=FLAGS.num_inpaint, inpaint_method=method,
      feature_steps=FLAGS.classifier_steps)
  if repaint_params is not None:
    config.evaluate.repaint = tuple(repaint_params)
  return config


def _generator(run, config):
  return generate.Generator(run.model, clean_cache=config.sample.get("clean_cache", False))


def _score_repaint(workdir: str, extractors, family: str, repaint_params) -> dict:
  """RePaint's inpainting scores of one family (cached in the workdir)."""
  def compute():
    config = _eval_config(workdir, [family], "repaint", repaint_params)
    run, scores = common.evaluate_run(workdir, config, ("inpainting",), extractors)
    q = scores["inpainting"]["families"][family]
    return {"step": run.step, "repaint": list(repaint_params),
            "network_evals": scores["inpainting"]["network_evals"],
            "inpainting": {k: q[k] for k in INPAINTING}}
  tag = "_".join(str(v) for v in (family, *repaint_params))
  return common.cached_scores(
      os.path.join(workdir, f"dit_comparison_repaint_{tag}.json"),
      {k: FLAGS[k].value for k in ("num_inpaint", "classifier_steps")}, compute)


def _seconds_per_image(workdir: str, family: str, method: str, repaint_params=None) -> float:
  """Median wall seconds per image of one batch's inpainting (compiled first)."""
  config = _eval_config(workdir, [family], method, repaint_params)
  run = common.load_run(workdir, config)
  gen = _generator(run, config)
  fn, _ = inpainting_eval.method(method, gen, run.params, num_steps=FLAGS.num_steps, eta=0.25,
                                 repaint_params=tuple(config.evaluate.repaint))
  b = FLAGS.batch
  h, w, c = run.image_shape
  x = np.random.default_rng(0).uniform(-1, 1, (b, h, w, c)).astype(np.float32)
  m = masks_lib.make_masks(family, b, h, w, seed=0)
  key = jax.random.key(0)
  jax.block_until_ready(fn(x, m, key))
  times = []
  for _ in range(3):
    start = time.perf_counter()
    jax.block_until_ready(fn(x, m, key))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) / b


def _repaint_equal_time(workdirs, extractors, seeds) -> dict:
  """Per family: RePaint on the baseline at the candidate's wall time, and the comparison."""
  base, cand = backbones()
  jl = FLAGS.repaint_jump
  probe = (10 * jl, jl, 2)
  probe_nfe = repaint.num_model_steps(repaint.jump_schedule(*probe))
  out = {}
  for family in FLAGS.families:
    t_cand = _seconds_per_image(workdirs[cand][seeds[0]], family, "asyncpatch")
    t_eval = _seconds_per_image(workdirs[base][seeds[0]], family, "repaint", probe) / probe_nfe
    budget = t_cand / t_eval                     # RePaint evaluations in the same time
    options = [(ns, repaint.num_model_steps(repaint.jump_schedule(ns, jl, 2)))
               for ns in range(jl, 40 * jl + 1, jl)]
    ns, nfe = min(options, key=lambda o: abs(o[1] - budget))
    params = (ns, jl, 2)
    rows = {}
    for k, hib in INPAINTING.items():
      rp = [_score_repaint(workdirs[base][s], extractors, family, params)["inpainting"][k]
            for s in seeds]
      ap = [_score(workdirs[cand][s], extractors)["inpainting"][family][k] for s in seeds]
      diff = statistics.seed_difference(ap, rp)
      rows[k] = {f"{base}_repaint": statistics.across_seeds(rp),
                 f"{cand}_asyncpatch": statistics.across_seeds(ap),
                 f"{cand}_minus_{base}_repaint": diff.as_dict(),
                 f"verdict_for_{cand}": statistics.verdict(diff, hib)}
    out[family] = {"candidate_seconds_per_image": t_cand,
                   "baseline_seconds_per_evaluation": t_eval,
                   "evaluations_in_that_time": budget, "repaint": list(params),
                   "repaint_network_evals": nfe, "candidate_network_evals": FLAGS.num_steps,
                   "metrics": rows}
  return out


def _score(workdir: str, extractors) -> dict:
  """Generation and inpainting scores of a trained run (cached in the workdir)."""
  def compute():
    run, scores = common.evaluate_run(workdir, _eval_config(workdir, FLAGS.families),
                                      ("generation", "inpainting"), extractors)
    with open(os.path.join(workdir, "eval.json")) as f:
      eval_json = json.load(f)
    return {"step": run.step, "eval_json": {k: eval_json[k] for k in EVAL_JSON},
            "generation": {k: scores["generation"][k] for k in GENERATION},
            "inpainting": {fam: {k: q[k] for k in INPAINTING}
                           for fam, q in scores["inpainting"]["families"].items()}}
  return common.cached_scores(
      os.path.join(workdir, "dit_comparison_scores.json"),
      {k: FLAGS[k].value for k in ("num_samples", "num_inpaint", "families", "num_steps",
                                   "classifier_steps")}, compute)


def _compare(per_run: dict, path: tuple, higher_is_better: bool) -> dict:
  """Per-seed values, seed mean and s.e. of each backbone, and the DiT - UNet difference."""
  def values(backbone):
    out = []
    for scores in per_run[backbone].values():
      v = scores
      for k in path:
        v = v[k]
      out.append(float(v))
    return out
  base, cand = backbones()
  row = {b: statistics.across_seeds(values(b)) for b in (base, cand)}
  diff = statistics.seed_difference(values(cand), values(base))
  row[f"{cand}_minus_{base}"] = diff.as_dict()
  row[f"verdict_for_{cand}"] = statistics.verdict(diff, higher_is_better)
  return row


def _markdown(table: dict) -> str:
  base, cand = backbones()
  rows = [f"| metric | {base}, mean ± s.e. over seeds | {cand}, mean ± s.e. | {cand} - {base}, "
          f"95% Welch interval | verdict for {cand} |", "|---|---|---|---|---|"]
  for name, r in table.items():
    u, d, diff = r[base], r[cand], r[f"{cand}_minus_{base}"]
    rows.append(f"| {name} | {u['mean']:.4g} ± {u['sem']:.2g} | {d['mean']:.4g} ± "
                f"{d['sem']:.2g} | {diff['estimate']:+.3g} [{diff['low']:+.3g}, "
                f"{diff['high']:+.3g}] | {r[f'verdict_for_{cand}']} |")
  return "\n".join(rows) + "\n"


def main(argv):
  del argv
  if FLAGS.tiny and not FLAGS["workdir_root"].present:
    FLAGS.workdir_root = os.path.join(os.path.dirname(os.path.abspath(FLAGS.out)),
                                      "tiny_dit_workdirs")
  seeds = [int(s) for s in FLAGS.seeds]
  pair = backbones()
  cost = {b: common.train_flops(_config(b, seeds[0])) for b in pair}
  workdirs = {b: {} for b in pair}
  train_seconds = {b: {} for b in pair}
  for seed in seeds:                       # seed-major: an interruption leaves pairs done
    for b in pair:
      workdir = os.path.join(FLAGS.workdir_root, f"{b}_s{seed}")
      train_seconds[b][seed] = common.train_or_resume(_config(b, seed), workdir)
      workdirs[b][seed] = workdir
  first = common.load_config(os.path.join(workdirs[pair[0]][seeds[0]], "config.json"))
  first.evaluate.feature_steps = FLAGS.classifier_steps
  extractors = evaluators_base.feature_extractors(first, jax.random.key(1), None)
  per_run = {b: {s: _score(workdirs[b][s], extractors) for s in seeds} for b in pair}
  table = {}
  for k, hib in EVAL_JSON.items():
    table[k] = _compare(per_run, ("eval_json", k), hib)
  for k, hib in GENERATION.items():
    table[f"generation {k}"] = _compare(per_run, ("generation", k), hib)
  for fam in FLAGS.families:
    for k, hib in INPAINTING.items():
      table[f"inpainting {fam} {k}"] = _compare(per_run, ("inpainting", fam, k), hib)
  result = {
      "settings": {k: FLAGS[k].value for k in ("baseline", "candidate", "seeds", "num_samples",
                                               "num_inpaint", "families", "num_steps",
                                               "classifier_steps", "train_steps_scale")},
      "rule": "better/worse only when the 95% Welch interval over training seeds of the "
              "DiT - UNet difference excludes 0 (evaluation/statistics.py), else within noise",
      "training_cost": cost, "train_seconds_this_call": train_seconds,
      "runs": {b: {str(s): per_run[b][s] for s in seeds} for b in pair},
      "table": table}
  if FLAGS.repaint_equal_time:
    result["repaint_equal_time"] = _repaint_equal_time(workdirs, extractors, seeds)
  common.write_json(FLAGS.out, result, time_key="seconds")
  markdown = _markdown(table)
  common.write_table(FLAGS.out, markdown)


if __name__ == "__main__":
  common.run(main, required=("out",))
