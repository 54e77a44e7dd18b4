"""AsyncPatch Table 1 in miniature, over training seeds: one config trained with each
timestep sampler, scored with intervals, compared with the rule of evaluation/statistics.py.

  python -m experiments.asyncpatch.sampler_ablation --out=results/evaluation/sampler_ablation.json

For each seed of --seeds and each of --samplers (global, perlin, patchwise, asyncpatch) the
config (default: the main job's, configs/default.py, --train_steps overriding its step
count, config.seed the seed) is trained in <workdir_root>/<sampler>_s<seed> (resumable: a
finished run is reused, an interrupted one resumes; `--tiny`: the tiny config in
<dir of --out>/tiny_workdirs). Every run is scored with the same evaluation key and masks
by the `generation` and `inpainting` evaluators (what `--mode=evaluate` runs), its scores
cached beside its checkpoints:
  - generation: --num_samples class-conditional samples (labels cycling, synchronous
    schedule) against the held-out digits, Frechet distance (with its bootstrap interval
    over the samples) and PRDC on the in-project digit features (`fd_digits`, not FID);
  - inpainting of --num_inpaint held-out digits per mask family with AsyncPatch Eq. 4:
    PSNR, SSIM, fd_digits, each with its bootstrap interval over the images;
  - the models of --repaint_models (default `global`, as in the paper, whose Table 1
    inpaints with RePaint for the synchronous model) also inpaint with RePaint --repaint.
The JSON keeps every run's values and within-run intervals; the table gives each row's mean
+- standard error over seeds and, for every row against --reference (asyncpatch), the Welch
interval over seeds of the difference with its verdict ("better"/"worse" only when the 95%
interval excludes 0, else "within noise"). Writes the JSON and a Markdown table (.md).

On an accelerator, with a prepared ImageNet 64 and the converted Inception/LPIPS weights
(paper: 60M model, 50k samples for FID, 1k for inpainting):
  python -m experiments.asyncpatch.sampler_ablation --config=configs/imagenet64_60m.py \
      --workdir_root=gs://<bucket>/ablation --inception_weights=weights/inception_fid.npz \
      --lpips_weights=weights/lpips_alex.npz --num_samples=50000 --num_inpaint=1000 \
      --train_steps=0 --out=results/evaluation/sampler_ablation_imagenet64.json
"""

from __future__ import annotations

import os

from absl import flags
import jax

from asyncpatch_jax.evaluation import feature_nets
from asyncpatch_jax.evaluation import statistics
from asyncpatch_jax.evaluation.evaluators import base as evaluators_base
from asyncpatch_jax.evaluation.evaluators import common as evaluators
from asyncpatch_jax.generation import generate
from asyncpatch_jax.runs import loader
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path (a Markdown table goes next to it).")
flags.DEFINE_string("config", "configs/default.py", "Config trained with each sampler.")
flags.DEFINE_string("workdir_root", "/tmp/asyncpatch_ablation",
                    "One workdir per sampler and seed below it (<sampler>_s<seed>).")
flags.DEFINE_list("samplers", ["global", "perlin", "patchwise", "asyncpatch"], "Timestep samplers.")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds of each sampler.")
flags.DEFINE_string("reference", "asyncpatch", "The sampler every other row is compared with.")
flags.DEFINE_list("repaint_models", ["global"], "Samplers whose models also inpaint with RePaint.")
flags.DEFINE_list("repaint", ["50", "5", "5"], "RePaint num_steps, jump_length, jump_n_sample.")
flags.DEFINE_integer("train_steps", 600, "Training steps of each run (0: the config's).")
flags.DEFINE_integer("num_samples", 1000, "Generated samples per model.")
flags.DEFINE_integer("num_inpaint", 256, "Held-out images inpainted per mask family.")
flags.DEFINE_list("families", ["thin", "wide", "square", "extrema"], "Mask families.")
flags.DEFINE_integer("num_steps", 50, "Sampler steps (generation and inpainting).")
flags.DEFINE_float("eta", 0.25, "Sampler eta.")
flags.DEFINE_integer("batch", 250, "Sampling batch.")
flags.DEFINE_integer("interval_resamples", 500, "Bootstrap resamples of the within-run intervals.")
flags.DEFINE_integer("classifier_steps", 600, "Training steps of the digit feature network.")
flags.DEFINE_string("inception_weights", "", "FID Inception weights (.npz): features = Inception.")
flags.DEFINE_string("lpips_weights", "", "LPIPS weights (.npz/.safetensors): adds LPIPS.")
# The tests' run, chained with inpainting_benchmark.py --tiny on the same --out folder.
common.define_tiny(dict(config="configs/test.py", samplers=["global", "asyncpatch"],
                        seeds=["0", "1"], train_steps=2, num_samples=20, num_inpaint=20,
                        num_steps=4, batch=16, classifier_steps=5, families=["square"],
                        repaint=["4", "2", "2"], interval_resamples=50))

# Metric -> whether higher is better.
GENERATION = ("fd", False), ("precision", True), ("recall", True)
INPAINTING = ("psnr", True), ("ssim", True), ("fd", False)


def _train(sampler: str, seed: int) -> str:
  config = common.load_config(FLAGS.config)
  config.timesteps.sampler = sampler
  config.seed = seed
  if FLAGS.train_steps:
    config.train.num_steps = FLAGS.train_steps
  config.evaluate.at_end = ()                       # scored here instead
  workdir = os.path.join(FLAGS.workdir_root, f"{sampler}_s{seed}")
  common.train_or_resume(config, workdir)
  return workdir


def _eval_config(workdir: str, method: str = "asyncpatch"):
  """The workdir's config with this script's evaluation settings."""
  config = common.load_config(os.path.join(workdir, "config.json"))
  config.sample.update(num_steps=FLAGS.num_steps, eta=FLAGS.eta)
  config.evaluate.update(
      num_samples=FLAGS.num_samples, batch_size=FLAGS.batch, guidance=0.0,
      reference_split="test", num_reference=0, mask_families=tuple(FLAGS.families),
      num_inpaint=FLAGS.num_inpaint, inpaint_method=method,
      repaint=tuple(int(v) for v in FLAGS.repaint),
      feature_steps=FLAGS.classifier_steps, inception_weights=FLAGS.inception_weights,
      lpips_weights=FLAGS.lpips_weights, interval_resamples=FLAGS.interval_resamples)
  return config


def _scores(workdir: str, sampler: str, feature_nets_, lpips_fn, names) -> dict:
  """The run's generation and inpainting scores (cached in the workdir)."""
  cache = os.path.join(workdir, "sampler_ablation_scores.json")
  settings = {k: FLAGS[k].value for k in (
      "num_samples", "num_inpaint", "families", "num_steps", "eta", "repaint",
      "interval_resamples", "classifier_steps", "inception_weights")}
  settings["repaint_model"] = sampler in FLAGS.repaint_models
  return common.cached_scores(cache, settings, lambda: _compute_scores(
      workdir, settings["repaint_model"], feature_nets_, lpips_fn, names))


def _compute_scores(workdir: str, repaint_model: bool, feature_nets_, lpips_fn, names) -> dict:
  fd = names["frechet"]
  methods = ["asyncpatch"] + (["repaint"] if repaint_model else [])
  result = {"inpainting": {}}
  for method in methods:
    config = _eval_config(workdir, method)
    wanted = ("generation", "inpainting") if method == "asyncpatch" else ("inpainting",)
    chosen = evaluators.from_config(config, wanted, loader.saved_image_shape(workdir))
    run = common.load_run(workdir, config)
    gen = generate.Generator(run.model)
    ctx = evaluators_base.Context(gen, run.params, config, image_shape=run.image_shape,
                                  key=jax.random.key(0), mesh=gen.mesh, lpips_fn=lpips_fn,
                                  mask_seed=0, feature_nets=feature_nets_)
    scores, _ = evaluators.run(chosen, ctx)
    result["step"] = run.step
    if method == "asyncpatch":
      g = scores["generation"]
      result["generation"] = {"fd": g[fd], "fd_interval": g[fd + "_interval"],
                              "precision": g[names["precision"]], "recall": g[names["recall"]],
                              "density": g[names["density"]], "coverage": g[names["coverage"]]}
    inp = scores["inpainting"]
    result["inpainting"][method] = {
        "network_evals": inp["network_evals"],
        "families": {fam: {"psnr": q["psnr"], "psnr_interval": q["psnr_interval"],
                           "ssim": q["ssim"], "ssim_interval": q["ssim_interval"],
                           "fd": q[fd], "fd_interval": q[fd + "_interval"],
                           "seconds_per_image": q["seconds_per_image"]}
                     for fam, q in inp["families"].items()}}
  return result


def rows_of(runs: dict) -> dict:
  """{row name: {seed: {'generation': {...} or None, 'inpainting': {family: {...}}}}}: one
  row per sampler (AsyncPatch Eq. 4), plus '<sampler> + RePaint' for the RePaint models."""
  rows = {}
  for sampler, per_seed in runs.items():
    rows[sampler] = {s: {"generation": r["generation"],
                         "inpainting": r["inpainting"]["asyncpatch"]["families"]}
                     for s, r in per_seed.items()}
    if all("repaint" in r["inpainting"] for r in per_seed.values()):
      rows[f"{sampler} + RePaint"] = {s: {"generation": None,
                                          "inpainting": r["inpainting"]["repaint"]["families"]}
                                      for s, r in per_seed.items()}
  return rows


def table(rows: dict, reference: str, families) -> dict:
  """Per row and metric: seed mean +- s.e., and the Welch difference from `reference`
  (row - reference) with its verdict for the row."""
  def cell(values, ref_values, higher_is_better):
    out = statistics.across_seeds(values)
    if ref_values is not None:
      diff = statistics.seed_difference(values, ref_values)
      out["minus_reference"] = diff.as_dict()
      out["verdict"] = statistics.verdict(diff, higher_is_better)
    return out
  ref = rows[reference]
  seeds = list(ref)
  out = {}
  for name, per_seed in rows.items():
    other = None if name == reference else True
    r = {}
    if per_seed[seeds[0]]["generation"] is not None:
      for k, hib in GENERATION:
        r[f"generation {k}"] = cell(
            [per_seed[s]["generation"][k] for s in seeds],
            other and [ref[s]["generation"][k] for s in seeds], hib)
    for fam in families:
      for k, hib in INPAINTING:
        r[f"{fam} {k}"] = cell([per_seed[s]["inpainting"][fam][k] for s in seeds],
                               other and [ref[s]["inpainting"][fam][k] for s in seeds], hib)
    out[name] = r
  return out


def markdown(tab: dict, reference: str, families) -> str:
  cols = [f"generation {k}" for k, _ in GENERATION] + [
      f"{f} {k}" for f in families for k in ("psnr", "fd")]
  lines = ["Mean ± s.e. over training seeds; below each, the difference from "
           f"`{reference}` with its 95% Welch interval and the verdict for the row.", "",
           "| row | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
  for name, r in tab.items():
    cells = []
    for c in cols:
      if c not in r:
        cells.append("—")
        continue
      v = r[c]
      text = f"{v['mean']:.4g} ± {v['sem']:.2g}"
      if "verdict" in v:
        d = v["minus_reference"]
        text += f" ({d['estimate']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}], {v['verdict']})"
      cells.append(text)
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if FLAGS.tiny and not FLAGS["workdir_root"].present:
    FLAGS.workdir_root = os.path.join(os.path.dirname(os.path.abspath(FLAGS.out)),
                                      "tiny_workdirs")
  if FLAGS.reference not in FLAGS.samplers:
    raise ValueError(f"--reference={FLAGS.reference} is not one of --samplers={FLAGS.samplers}.")
  seeds = [int(s) for s in FLAGS.seeds]
  workdirs = {}
  for seed in seeds:                     # seed-major: an interruption leaves whole seeds done
    for sampler in FLAGS.samplers:
      workdirs[sampler, seed] = _train(sampler, seed)
  first = _eval_config(workdirs[FLAGS.samplers[0], seeds[0]])
  inception_features, lpips_fn = evaluators_base.load_weight_files(first)
  extractors, nets = evaluators_base.feature_extractors(first, jax.random.key(1),
                                                        inception_features)
  names = feature_nets.metric_names(extractors[-1].name)   # Inception's when given
  runs = {s: {str(seed): _scores(workdirs[s, seed], s, (extractors, nets), lpips_fn, names)
              for seed in seeds} for s in FLAGS.samplers}
  rows = rows_of(runs)
  tab = table(rows, FLAGS.reference, FLAGS.families)
  result = {
      "settings": {k: FLAGS[k].value for k in (
          "config", "samplers", "seeds", "reference", "repaint_models", "repaint",
          "train_steps", "num_samples", "num_inpaint", "families", "num_steps", "eta",
          "interval_resamples")},
      "feature_extractor": extractors[-1].name, "metric_names": names,
      "digit_classifier_held_out_accuracy": nets.get("digits", {}).get("held_out_accuracy"),
      "rule": "better/worse only when the 95% Welch interval over training seeds of the "
              "row - reference difference excludes 0 (evaluation/statistics.py), else "
              "within noise; within a run, bootstrap intervals over images",
      "runs": runs, "table": tab}
  common.write_json(FLAGS.out, result, time_key="seconds")
  text = (f"Frechet distance and PRDC on `{extractors[-1].name}` features; inpainting: "
          f"AsyncPatch Eq. 4 ({FLAGS.num_steps} steps) and, for "
          f"{', '.join(FLAGS.repaint_models)}, RePaint {'/'.join(FLAGS.repaint)}; "
          f"{FLAGS.num_inpaint} held-out images a family; {len(seeds)} training seeds.\n\n"
          + markdown(tab, FLAGS.reference, FLAGS.families))
  common.write_table(FLAGS.out, text)


if __name__ == "__main__":
  common.run(main, required=("out",))
