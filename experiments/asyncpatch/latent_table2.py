"""AsyncPatch Table 2 on the embedded textures: latent against pixel diffusion at equal training
cost, and latent AsyncPatch against the latent baseline (LDM), over training seeds; and the DiT
against the pixel UNet at the same training FLOPs.

  python -m experiments.asyncpatch.latent_table2 --out=results/latent/latent_table2.json

The paper's Table 2 trains a latent AsyncPatch model and a baseline LDM (global timesteps) for
the same steps at the same batch and compares their generation FID. This script trains, once per
seed in `--workdir_root` (resumable: a finished run is reused, an interrupted one resumes):
  latent_asyncpatch  configs/latent_textures.py (AsyncPatch timesteps) on the 8x8x3 latents of
                     one shared autoencoder (configs/vqae_textures.py, --ae_steps, trained once
                     in <workdir_root>/vqae, seed 0), --latent_steps at --latent_batch;
  latent_global      the same with global timesteps: the paper's LDM baseline;
  pixel_images       the pixel UNet of the textures (common.TEXTURES_PIXEL_UNET, AsyncPatch
                     timesteps) on the 32x32x3 pixels, at --pixel_batch for the steps that see
                     the latent runs' training images (latent_steps x latent_batch);
  pixel_flops        the same pixel UNet for the steps whose training FLOPs equal the latent
                     run's (XLA's cost analysis of each train step; the latent step's includes
                     encoding its batch with the frozen encoder; the autoencoder's own training
                     is reported apart, as it is shared by every latent model);
  dit_flops          the pixel DiT of the textures (configs/dit.py:textures: width 128, 6
                     blocks, patch 4, adaLN-single) at --pixel_batch for the steps whose
                     training FLOPs equal the latent run's, as pixel_flops's do (its blocks
                     unrolled for the cost analysis).
All four use the same optimiser settings (AdamW 1e-3, 100 warmup steps, cosine decay, EMA
0.999). Each run is scored with the same key: --num_samples unconditional samples (--num_steps
synchronous steps, eta 0.25) against as many held-out (test split) crops, `fd_textures` and
PRDC on the in-project texture features, each with its 95% bootstrap interval within the run
(the `generation` evaluator); and --num_inpaint held-out crops per mask family (--families)
inpainted with AsyncPatch Eq. 4 in --num_steps steps (a latent model on its tokens, a token
known when its encoder's receptive field is, the known pixels pasted back; the same crops,
masks and key for every run), scored with PSNR, SSIM and fd_textures against the originals
(the `inpainting` evaluator). Scores are cached in the run's workdir. For each comparison the
JSON keeps the per-seed values, mean and standard error over seeds, the difference with its t
interval over seeds (paired for the two latent models, which share each seed's initial
parameters, data order and sampling key; Welch's for the rest) and its verdict
(evaluation/statistics.py: "better"/"worse" only when the 95% interval excludes 0, else
"within noise"), and every run's training FLOPs, images, seconds and sampling seconds.
"""

from __future__ import annotations

import json
import os

from absl import flags
import jax

from asyncpatch_jax.evaluation import statistics
from asyncpatch_jax.evaluation.evaluators import base as evaluators_base
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path (a Markdown table goes next to it).")
flags.DEFINE_string("workdir_root", "/tmp/asyncpatch_latent_table2",
                    "The autoencoder (vqae/) and one workdir per run (<model>_s<seed>) below it.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds of each model.")
flags.DEFINE_integer("ae_steps", 2000, "Training steps of the shared autoencoder (batch 16).")
flags.DEFINE_integer("latent_steps", 500, "Training steps of each latent model.")
flags.DEFINE_integer("latent_batch", 64, "Batch of the latent models.")
flags.DEFINE_integer("pixel_batch", 16, "Batch of the pixel models.")
flags.DEFINE_integer("num_samples", 512, "Generated samples per run (and held-out crops).")
flags.DEFINE_integer("num_steps", 50, "Sampler steps.")
flags.DEFINE_integer("batch", 128, "Sampling batch.")
flags.DEFINE_integer("feature_steps", 600, "Training steps of the texture feature network.")
flags.DEFINE_integer("num_inpaint", 128, "Held-out crops inpainted per mask family (0: none).")
flags.DEFINE_list("families", ["thin", "wide", "square", "extrema"], "Inpainting mask families.")
common.define_tiny(dict(seeds=["0", "1"], ae_steps=2, latent_steps=2, latent_batch=16,
                        pixel_batch=8, num_samples=16, num_steps=2, batch=16, feature_steps=2,
                        num_inpaint=8, families=["square"]))

MODELS = ("latent_asyncpatch", "latent_global", "pixel_images", "pixel_flops", "dit_flops")
# (candidate, baseline, what the comparison is, paired over seeds). The two latent models of
# a seed differ only in their timestep sampler (same architecture, so the same initial
# parameters, data order and sampling key): common random numbers, so their seeds pair
# (paired t over the per-seed differences). The others differ in architecture: Welch.
COMPARISONS = (
    ("latent_asyncpatch", "latent_global",
     "the paper's Table 2: latent AsyncPatch against the latent baseline (global timesteps), "
     "same steps and batch", True),
    ("latent_asyncpatch", "pixel_flops", "latent against pixel AsyncPatch at equal training FLOPs",
     False),
    ("latent_asyncpatch", "pixel_images",
     "latent against pixel AsyncPatch at equal training images", False),
    ("dit_flops", "pixel_flops", "the pixel DiT against the pixel UNet at equal training FLOPs",
     False),
)
# Metric -> whether higher is better.
METRICS = {"fd_textures": False, "precision_textures": True, "recall_textures": True,
           "density_textures": True, "coverage_textures": True}
# Inpainting metric (per mask family) -> whether higher is better.
INPAINT_METRICS = {"psnr": True, "ssim": True, "fd_textures": False}
TINY_AE = {"autoencoder": {"base_channels": 4, "mask_embed_dim": 8, "codebook_size": 16},
           "evaluate": {"reconstruct_images": 8}}


def _ae_config():
  config = common.updated(common.load_config("vqae_textures"), {
      "train": {"num_steps": FLAGS.ae_steps, "checkpoint_every": 500,
                "progress_bar": not FLAGS.tiny}})
  return common.updated(config, TINY_AE) if FLAGS.tiny else config


def _latent_config(seed: int, sampler: str):
  config = common.updated(common.load_config("latent_textures"), {
      "latent": {"autoencoder_workdir": os.path.join(FLAGS.workdir_root, "vqae")},
      "timesteps": {"sampler": sampler},
      "train": {"num_steps": FLAGS.latent_steps, "batch_size": FLAGS.latent_batch,
                "checkpoint_every": 250, "progress_bar": not FLAGS.tiny},
      "sample": {"num_images": 0}})
  if FLAGS.tiny:
    config.model.update(common.TINY_UNET)
  config.seed = seed
  return config


def _pixel_config(seed: int, steps: int):
  config = common.textures_pixel_config(steps, FLAGS.pixel_batch, FLAGS.tiny)
  config.train.checkpoint_every = 250
  config.seed = seed
  return config


def _dit_config(seed: int, steps: int):
  config = common.updated(common.load_config("dit:textures"), {
      "train": {"num_steps": steps, "batch_size": FLAGS.pixel_batch, "checkpoint_every": 250,
                "progress_bar": not FLAGS.tiny},
      "sample": {"num_images": 0}})
  if FLAGS.tiny:
    config.model.update(hidden_size=16, depth=1, num_heads=2)
  config.seed = seed
  return config


def pixel_steps(latent_cost: dict, pixel_flops_per_step: float,
                dit_flops_per_step: float) -> dict:
  """The pixel runs' steps: equal training images, and equal training FLOPs (rounded)."""
  images = latent_cost["steps"] * latent_cost["batch"]
  return {"pixel_images": -(-images // FLAGS.pixel_batch),
          "pixel_flops": max(1, round(latent_cost["train_flops"] / pixel_flops_per_step)),
          "dit_flops": max(1, round(latent_cost["train_flops"] / dit_flops_per_step))}


def _configs(seed: int, steps: dict) -> dict:
  return {"latent_asyncpatch": _latent_config(seed, "asyncpatch"),
          "latent_global": _latent_config(seed, "global"),
          "pixel_images": _pixel_config(seed, steps["pixel_images"]),
          "pixel_flops": _pixel_config(seed, steps["pixel_flops"]),
          "dit_flops": _dit_config(seed, steps["dit_flops"])}


def _train(config, workdir: str) -> float:
  """Trains or resumes; the training seconds of the run, summed over the calls that trained."""
  seconds = common.train_or_resume(config, workdir)
  path = os.path.join(workdir, "latent_table2_train_seconds.json")
  total = 0.0
  if os.path.exists(path):
    with open(path) as f:
      total = json.load(f)["seconds"]
  if seconds:
    total += seconds
    with open(path, "w") as f:
      json.dump({"seconds": total}, f)
  return total


def _score(workdir: str, extractors) -> dict:
  """The generation scores of a trained run (cached in the workdir), same key for every run."""
  def compute():
    config = common.load_config(os.path.join(workdir, "config.json"))
    config.sample.update(num_steps=FLAGS.num_steps, eta=0.25)
    config.evaluate.update(num_samples=FLAGS.num_samples, batch_size=FLAGS.batch,
                           guidance=0.0, reference_split="test", num_reference=0,
                           feature_steps=FLAGS.feature_steps)
    run, scores = common.evaluate_run(workdir, config, ("generation",), extractors)
    return {"step": run.step, "generation": scores["generation"]}
  return common.cached_scores(
      os.path.join(workdir, "latent_table2_scores.json"),
      {k: FLAGS[k].value for k in ("num_samples", "num_steps", "feature_steps")}, compute)


def _score_inpainting(workdir: str, extractors) -> dict:
  """The inpainting scores of a trained run (AsyncPatch Eq. 4, a latent model's on its tokens
  with the known pixels pasted back; cached in the workdir), the same key and masks for
  every run: per mask family PSNR, SSIM and fd_textures of the inpainted crops against the
  originals, with their intervals within the run."""
  def compute():
    config = common.load_config(os.path.join(workdir, "config.json"))
    config.sample.update(num_steps=FLAGS.num_steps, eta=0.25)
    config.evaluate.update(batch_size=FLAGS.batch, num_inpaint=FLAGS.num_inpaint,
                           mask_families=tuple(FLAGS.families), inpaint_method="asyncpatch",
                           feature_steps=FLAGS.feature_steps)
    run, scores = common.evaluate_run(workdir, config, ("inpainting",), extractors)
    q = scores["inpainting"]
    keep = [*INPAINT_METRICS, *(f"{k}_interval" for k in INPAINT_METRICS), "hole_fraction",
            "seconds_per_image"]
    return {"step": run.step, "network_evals": q["network_evals"],
            "num_images": q["num_images"],
            "families": {fam: {k: v[k] for k in keep if k in v}
                         for fam, v in q["families"].items()}}
  return common.cached_scores(
      os.path.join(workdir, "latent_table2_inpainting.json"),
      {k: FLAGS[k].value for k in ("num_inpaint", "families", "num_steps", "feature_steps")},
      compute)


def _compare(per_run: dict, candidate: str, baseline: str, paired: bool,
             metrics: dict | None = None) -> dict:
  """Per metric: each side's seed values, mean and s.e., candidate - baseline with its t
  interval over seeds (paired or Welch) and the verdict. metrics: name -> (path into a run's
  scores, higher is better); default the generation metrics."""
  if metrics is None:
    metrics = {k: (("generation", k), hib) for k, hib in METRICS.items()}
  rows = {}

  def at(scores, path):
    for key in path:
      scores = scores[key]
    return float(scores)

  for k, (path, hib) in metrics.items():
    a = [at(per_run[candidate][s], path) for s in per_run[candidate]]
    b = [at(per_run[baseline][s], path) for s in per_run[baseline]]
    welch = statistics.seed_difference(a, b)
    diff = statistics.seed_paired(a, b) if paired else welch
    rows[k] = {candidate: statistics.across_seeds(a), baseline: statistics.across_seeds(b),
               f"{candidate}_minus_{baseline}": diff.as_dict(),
               f"verdict_for_{candidate}": statistics.verdict(diff, hib)}
    if paired:
      rows[k]["welch_interval"] = welch.as_dict()
  return rows


def markdown(result: dict) -> str:
  """The comparison tables (mean ± s.e. over seeds, interval over seeds, verdict)."""
  out = []
  blocks = [("generation", c) for c in result["comparisons"]]
  blocks += [("inpainting", c) for c in result.get("inpainting_comparisons", [])]
  for task, c in blocks:
    cand, base = c["candidate"], c["baseline"]
    out += [f"{task.capitalize()}, {c['what']}:", "",
            f"| metric | {cand}, mean ± s.e. | {base}, mean ± s.e. | {cand} - {base}, 95% "
            f"{c['interval_over_seeds']} interval over seeds | verdict for {cand} |",
            "|---|---|---|---|---|"]
    for k, r in c["metrics"].items():
      x, y, d = r[cand], r[base], r[f"{cand}_minus_{base}"]
      out.append(f"| {k} | {x['mean']:.4g} ± {x['sem']:.2g} | {y['mean']:.4g} ± {y['sem']:.2g} "
                 f"| {d['estimate']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}] | "
                 f"{r[f'verdict_for_{cand}']} |")
    out.append("")
  return "\n".join(out)


def main(argv):
  del argv
  if FLAGS.tiny and not FLAGS["workdir_root"].present:
    FLAGS.workdir_root = os.path.join(os.path.dirname(os.path.abspath(FLAGS.out)),
                                      "tiny_table2_workdirs")
  seeds = [int(s) for s in FLAGS.seeds]
  ae_dir = os.path.join(FLAGS.workdir_root, "vqae")
  ae_config = _ae_config()
  ae_seconds = _train(ae_config, ae_dir)
  ae_run = common.load_run(ae_dir)
  latent_cost = common.train_flops(_latent_config(seeds[0], "asyncpatch"))
  pixel_cost = common.train_flops(_pixel_config(seeds[0], 1))
  dit_cost = common.train_flops(_dit_config(seeds[0], 1))
  steps = pixel_steps(latent_cost, pixel_cost["flops_per_step"], dit_cost["flops_per_step"])
  cost = {"latent_asyncpatch": latent_cost, "latent_global": latent_cost}
  for name, per_step in (("pixel_images", pixel_cost), ("pixel_flops", pixel_cost),
                         ("dit_flops", dit_cost)):
    cost[name] = dict(per_step, steps=steps[name],
                      train_flops=per_step["flops_per_step"] * steps[name])
  for c in cost.values():
    c["train_images"] = c["steps"] * c["batch"]
  workdirs, seconds = {m: {} for m in MODELS}, {m: {} for m in MODELS}
  for seed in seeds:                     # seed-major: an interruption leaves whole seeds done
    for name, config in _configs(seed, steps).items():
      workdirs[name][seed] = os.path.join(FLAGS.workdir_root, f"{name}_s{seed}")
      seconds[name][seed] = _train(config, workdirs[name][seed])
  first = common.load_config(os.path.join(workdirs["pixel_flops"][seeds[0]], "config.json"))
  first.evaluate.feature_steps = FLAGS.feature_steps
  extractors = evaluators_base.feature_extractors(first, jax.random.key(1), None)
  per_run = {m: {s: _score(workdirs[m][s], extractors) for s in seeds} for m in MODELS}
  if FLAGS.num_inpaint:
    for m in MODELS:
      for s in seeds:
        per_run[m][s]["inpainting"] = _score_inpainting(workdirs[m][s], extractors)
  inpaint_metrics = {f"{fam} {k}": (("inpainting", "families", fam, k), hib)
                     for fam in FLAGS.families for k, hib in INPAINT_METRICS.items()}
  result = {
      "settings": {k: FLAGS[k].value for k in ("seeds", "ae_steps", "latent_steps",
                                               "latent_batch", "pixel_batch", "num_samples",
                                               "num_steps", "feature_steps", "num_inpaint",
                                               "families")},
      "rule": "better/worse only when the 95% interval over training seeds of the candidate - "
              "baseline difference (paired t for the two latent models, whose seeds share "
              "initial parameters, data order and sampling key; Welch otherwise) excludes 0 "
              "(evaluation/statistics.py), else within noise",
      "autoencoder": {"steps": ae_run.step, "batch": int(ae_config.train.batch_size),
                      "train_seconds": ae_seconds,
                      "params": int(sum(x.size for x in jax.tree.leaves(ae_run.params)))},
      "training_cost": cost,
      "runs": {m: {str(s): dict(per_run[m][s], train_seconds=seconds[m][s]) for s in seeds}
               for m in MODELS},
      "comparisons": [{"candidate": c, "baseline": b, "what": what,
                       "interval_over_seeds": "paired-t" if paired else "welch-t",
                       "metrics": _compare(per_run, c, b, paired)}
                      for c, b, what, paired in COMPARISONS]}
  if FLAGS.num_inpaint:
    result["inpainting_comparisons"] = [
        {"candidate": c, "baseline": b, "what": what,
         "interval_over_seeds": "paired-t" if paired else "welch-t",
         "metrics": _compare(per_run, c, b, paired, inpaint_metrics)}
        for c, b, what, paired in COMPARISONS]
  common.write_json(FLAGS.out, result, time_key="seconds")
  text = markdown(result)
  common.write_table(FLAGS.out, text)


if __name__ == "__main__":
  common.run(main, required=("out",))
