"""AsyncPatch Tables 3-4 in miniature, over training seeds and at equal cost: inpainting
methods x mask families x models.

  python -m experiments.asyncpatch.inpainting_benchmark --out=results/evaluation/inpainting.json

For each model of --workdirs (name:workdir, `{seed}` filled with each of --seeds; default
the `global` and `asyncpatch` runs of sampler_ablation.py; `--tiny`: its `--tiny` runs in
the same --out folder) and each mask family, --num_inpaint held-out images are inpainted
(the same images, masks and keys for every run) with each of --methods:
  asyncpatch                 AsyncPatch Eq. 4 (known pixels at t = 0), --num_steps steps;
  asyncpatch@N               the same with N steps (N network evaluations: RePaint's cost);
  asyncpatch_input_guidance  with input guidance of the known region (Eq. 8);
  progressive                --num_stripes stripes from the known boundary inward
                             (Growing Images Sec. 2), --num_steps steps in all;
  repaint                    RePaint's resampling (diffusion/repaint.py), --repaint =
                             num_steps, jump_length, jump_n_sample (paper: 250,10,10);
  repaint@N                  RePaint spending exactly N network evaluations at --repaint's
                             jump length (repaint.params_for_budget: 50 -> 20/5/3).
Each run's scores (PSNR, SSIM, fd_digits with bootstrap intervals over the images, the
per-image PSNR and SSIM, network evaluations, FLOPs and seconds per image) are cached beside
its checkpoints, so an interrupted call loses nothing. A --methods entry model:method runs
on that model only (by default AsyncPatch runs on its own model, RePaint 50/5/5 on the
`global` one as in the paper, and RePaint at 50 evaluations on both). --compare
names the comparisons
`modelA:methodA~modelB:methodB` (A - B): on the same model, the per-seed differences are
paired (the same images, masks and keys; statistics.seed_paired over seeds, with the
paired bootstrap interval within each seed); on different models, Welch's interval over
seeds. Verdicts follow evaluation/statistics.py: "better"/"worse" only when the 95% interval
excludes 0. Writes the JSON and a Markdown table (.md).

On an accelerator (paper: ImageNet 64 / 256, 1k images, RePaint 250/10/10):
  python -m experiments.asyncpatch.inpainting_benchmark \
      --workdirs=global:gs://<bucket>/ablation/global_s{seed},asyncpatch:gs://<bucket>/ablation/asyncpatch_s{seed} \
      --inception_weights=weights/inception_fid.npz --lpips_weights=weights/lpips_alex.npz \
      --num_inpaint=1000 --repaint=250,10,10 \
      --methods=asyncpatch:asyncpatch,asyncpatch:asyncpatch@2410,global:repaint,repaint@250 \
      --compare=asyncpatch:asyncpatch~global:repaint@250,asyncpatch:asyncpatch@2410~global:repaint \
      --out=results/evaluation/inpainting_imagenet64.json
"""

from __future__ import annotations

import json
import os

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from asyncpatch_jax.data import masks
from asyncpatch_jax.diffusion import repaint
from asyncpatch_jax.evaluation import feature_nets
from asyncpatch_jax.evaluation import inpainting_eval
from asyncpatch_jax.evaluation import statistics
from asyncpatch_jax.evaluation.evaluators import base as evaluators_base
from asyncpatch_jax.generation import generate
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path (a Markdown table goes next to it).")
flags.DEFINE_list("workdirs", ["global:/tmp/asyncpatch_ablation/global_s{seed}",
                               "asyncpatch:/tmp/asyncpatch_ablation/asyncpatch_s{seed}"],
                  "name:workdir of each trained model ({seed}: each of --seeds).")
flags.DEFINE_list("seeds", ["0", "1", "2"], "Training seeds (the runs of each model).")
flags.DEFINE_list("families", ["thin", "wide", "square", "extrema"], "Mask families.")
flags.DEFINE_list("methods", ["asyncpatch:asyncpatch", "asyncpatch:asyncpatch@230",
                              "global:repaint", "repaint@50"],
                  "Inpainting methods (see the docstring); model:method runs on that model only.")
flags.DEFINE_list("compare", [
    "asyncpatch:asyncpatch~asyncpatch:repaint@50",
    "asyncpatch:asyncpatch~global:repaint@50",
    "asyncpatch:asyncpatch@230~global:repaint",
    "asyncpatch:asyncpatch~global:repaint"], "Comparisons modelA:methodA~modelB:methodB.")
flags.DEFINE_integer("num_inpaint", 128, "Held-out images per family.")
flags.DEFINE_integer("num_steps", 50, "Steps of the AsyncPatch and progressive schedules.")
flags.DEFINE_list("repaint", ["50", "5", "5"], "RePaint num_steps, jump_length, jump_n_sample.")
flags.DEFINE_float("eta", 0.25, "Sampler eta (RePaint uses its DDPM step, eta = 1).")
flags.DEFINE_float("input_guidance", 1.0, "Input guidance weight w_i.")
flags.DEFINE_integer("num_stripes", 4, "Stripes of the progressive method.")
flags.DEFINE_integer("batch", 128, "Inpainting batch.")
flags.DEFINE_integer("interval_resamples", 500, "Bootstrap resamples of the intervals.")
flags.DEFINE_integer("classifier_steps", 600, "Training steps of the digit feature network.")
flags.DEFINE_string("inception_weights", "", "FID Inception weights (.npz): features = Inception.")
flags.DEFINE_string("lpips_weights", "", "LPIPS weights (.npz/.safetensors): adds LPIPS.")
common.define_tiny(dict(num_inpaint=20, repaint=["4", "2", "2"], num_stripes=2, num_steps=4,
                        batch=16, classifier_steps=5, families=["square"], seeds=["0", "1"],
                        methods=["asyncpatch", "asyncpatch:asyncpatch@8", "repaint",
                                 "repaint@6"],
                        compare=["asyncpatch:asyncpatch@8~asyncpatch:repaint",
                                 "asyncpatch:asyncpatch~global:repaint@6"],
                        interval_resamples=50))

METRICS = ("psnr", True), ("ssim", True), ("fd", False)     # -> higher is better


def methods_of(model: str) -> list[str]:
  """The --methods entries that run on `model`."""
  out = []
  for entry in FLAGS.methods:
    owner, _, spec = entry.rpartition(":")
    if owner in ("", model):
      out.append(spec)
  return out


def variant(spec: str) -> dict:
  """{'method', 'num_steps', 'repaint'} of a --methods entry."""
  name, _, n = spec.partition("@")
  checks_ok = name in inpainting_eval.METHODS and (not n or n.isdigit())
  if not checks_ok or (n and name not in ("asyncpatch", "repaint")):
    raise ValueError(f"--methods entry {spec!r}; expected one of "
                     f"{', '.join(inpainting_eval.METHODS)}, or asyncpatch@N / repaint@N.")
  params = tuple(int(v) for v in FLAGS.repaint)
  if name == "repaint" and n:
    params = repaint.params_for_budget(int(n), params[1])
  return {"method": name, "num_steps": int(n) if name == "asyncpatch" and n else FLAGS.num_steps,
          "repaint": list(params)}


def flops_per_evaluation(run) -> float:
  """XLA's cost-analysis FLOPs of one network evaluation of one image (per-pixel time)."""
  shape = (1, *run.image_shape)
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  t = jax.ShapeDtypeStruct(shape[:3], jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  return float(jax.jit(run.model.apply).lower({"params": run.params}, x, t, y).cost_analysis()["flops"])


def score(workdir: str, spec: str, extractors, lpips_fn=None) -> dict:
  """One run's scores of one method, every family (cached in the workdir)."""
  v = variant(spec)
  cache = os.path.join(workdir, f"inpainting_benchmark_{spec.replace('@', '_at_')}.json")
  settings = {**v, **{k: FLAGS[k].value for k in (
      "families", "num_inpaint", "eta", "input_guidance", "num_stripes", "interval_resamples",
      "classifier_steps", "inception_weights", "lpips_weights")}}
  if os.path.exists(cache):
    with open(cache) as f:
      cached = json.load(f)
    if {"lpips_weights": "", **cached["settings"]} == settings:   # (older caches: no LPIPS)
      return cached
  run = common.load_run(workdir)
  gen = generate.Generator(run.model)
  h, w, _ = run.image_shape
  data = run.config.data
  real = inpainting_eval.dataset_images(data.dataset, "test", FLAGS.num_inpaint,
                                        data_dir=data.data_dir, options=dict(data.options))
  fn, nfe = inpainting_eval.method(v["method"], gen, run.params, num_steps=v["num_steps"],
                                   eta=FLAGS.eta, input_guidance=FLAGS.input_guidance,
                                   num_stripes=FLAGS.num_stripes,
                                   repaint_params=tuple(v["repaint"]))
  fd = feature_nets.metric_names(extractors[-1].name)["frechet"]
  key = jax.random.key(0)
  families = {}
  for j, fam in enumerate(FLAGS.families):
    m = masks.make_masks(fam, len(real), h, w, seed=0)
    out, cost = inpainting_eval.run_inpainting(fn, real, m, jax.random.fold_in(key, 10 + j),
                                               FLAGS.batch)
    q = inpainting_eval.quality(out, real, extractors, lpips_fn=lpips_fn, batch=FLAGS.batch,
                                mesh=gen.mesh, interval_resamples=FLAGS.interval_resamples,
                                per_image=True)
    families[fam] = {"psnr": q["psnr"], "psnr_interval": q["psnr_interval"],
                     "ssim": q["ssim"], "ssim_interval": q["ssim_interval"],
                     "fd": q[fd], "fd_interval": q[fd + "_interval"],
                     "per_image": {k: a.tolist() for k, a in q["per_image"].items()},
                     "seconds_per_image": cost["seconds_per_image"]}
    if "lpips" in q:
      families[fam]["lpips"] = q["lpips"]
  flops = flops_per_evaluation(run)
  result = {"settings": settings, "step": run.step, "network_evals": nfe,
            "flops_per_evaluation": flops, "flops_per_image": flops * nfe, "families": families}
  with open(cache, "w") as f:
    json.dump(result, f)
  return result


def compare(scores: dict, spec: str, seeds) -> dict:
  """The comparison `modelA:methodA~modelB:methodB` per family and metric."""
  (ma, va), (mb, vb) = (side.split(":", 1) for side in spec.split("~"))
  same_model = ma == mb
  out = {"a": f"{ma}:{va}", "b": f"{mb}:{vb}", "paired_within_seed": same_model,
         "interval_over_seeds": "paired-t" if same_model else "welch-t", "families": {}}
  for fam in FLAGS.families:
    per = {}
    for k, hib in METRICS:
      a = [scores[ma][s][va]["families"][fam][k] for s in seeds]
      b = [scores[mb][s][vb]["families"][fam][k] for s in seeds]
      diff = (statistics.seed_paired if same_model else statistics.seed_difference)(a, b)
      row = {"a": statistics.across_seeds(a), "b": statistics.across_seeds(b),
             "a_minus_b": diff.as_dict(), "verdict_for_a": statistics.verdict(diff, hib)}
      if same_model and k != "fd":
        row["within_seed_paired"] = {
            s: statistics.paired(scores[ma][s][va]["families"][fam]["per_image"][k],
                                 scores[mb][s][vb]["families"][fam]["per_image"][k],
                                 resamples=FLAGS.interval_resamples).as_dict() for s in seeds}
      per[k] = row
    out["families"][fam] = per
  return out


def markdown(result: dict) -> str:
  fams = FLAGS.families
  lines = ["Mean ± s.e. over training seeds of PSNR / fd_digits.", "",
           "| model | method | network evals | GFLOP / image | s / image | "
           + " | ".join(fams) + " |", "|" + "---|" * (5 + len(fams))]
  for model, methods in result["table"].items():
    for spec, r in methods.items():
      cells = [f"{r['network_evals']}", f"{r['flops_per_image'] / 1e9:.1f}",
               f"{r['seconds_per_image']:.4f}"]
      cells += [f"{r[f]['psnr']['mean']:.2f} ± {r[f]['psnr']['sem']:.2f} / "
                f"{r[f]['fd']['mean']:.1f} ± {r[f]['fd']['sem']:.1f}" for f in fams]
      lines.append(f"| {model} | {spec} | " + " | ".join(cells) + " |")
  lines += ["", "| A - B | family | PSNR: A - B [95%], verdict for A | fd_digits: A - B [95%], "
            "verdict for A |", "|---|---|---|---|"]
  for c in result["comparisons"]:
    for fam, per in c["families"].items():
      cells = []
      for k in ("psnr", "fd"):
        d = per[k]["a_minus_b"]
        cells.append(f"{d['estimate']:+.3g} [{d['low']:+.3g}, {d['high']:+.3g}], "
                     f"{per[k]['verdict_for_a']}")
      lines.append(f"| {c['a']} - {c['b']} | {fam} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  if FLAGS.tiny and not FLAGS["workdirs"].present:
    root = os.path.join(os.path.dirname(os.path.abspath(FLAGS.out)), "tiny_workdirs")
    FLAGS.workdirs = [f"{m}:{root}/{m}_s{{seed}}" for m in ("global", "asyncpatch")]
  seeds = [str(int(s)) for s in FLAGS.seeds]
  models = dict(item.split(":", 1) for item in FLAGS.workdirs)
  if len(seeds) < 2:
    raise ValueError(f"--seeds={FLAGS.seeds}: the table is over training seeds; give 2 or more.")
  for entry in FLAGS.methods:                       # every entry parses before any work
    owner, _, spec = entry.rpartition(":")
    variant(spec)
    if owner and owner not in models:
      raise ValueError(f"--methods entry {entry!r}: no model {owner!r} in --workdirs.")
  for c in FLAGS.compare:
    sides = [side.split(":", 1) for side in c.split("~")]
    if len(sides) != 2 or any(len(s) != 2 or s[0] not in models or s[1] not in methods_of(s[0])
                              for s in sides):
      raise ValueError(f"--compare entry {c!r}: expected modelA:methodA~modelB:methodB over "
                       f"--workdirs models {sorted(models)} and --methods {FLAGS.methods}, "
                       "the method running on that model.")
  first = common.load_config(os.path.join(models[next(iter(models))].format(seed=seeds[0]),
                                          "config.json"))
  first.evaluate.update(feature_steps=FLAGS.classifier_steps,
                        inception_weights=FLAGS.inception_weights,
                        lpips_weights=FLAGS.lpips_weights)
  inception_features, lpips_fn = evaluators_base.load_weight_files(first)
  extractors, nets = evaluators_base.feature_extractors(first, jax.random.key(1),
                                                        inception_features)
  scores = {m: {s: {} for s in seeds} for m in models}
  for s in seeds:                                   # seed-major: whole seeds done first
    for m, template in models.items():
      for spec in tqdm(methods_of(m), desc=f"{m} seed {s}"):
        scores[m][s][spec] = score(template.format(seed=s), spec, extractors, lpips_fn)
  table = {}
  for m in models:
    table[m] = {}
    for spec in methods_of(m):
      runs = [scores[m][s][spec] for s in seeds]
      row = {"network_evals": runs[0]["network_evals"],
             "repaint": variant(spec)["repaint"] if spec.startswith("repaint") else None,
             "flops_per_image": runs[0]["flops_per_image"],
             "seconds_per_image": float(np.mean([r["families"][f]["seconds_per_image"]
                                                 for r in runs for f in FLAGS.families]))}
      for f in FLAGS.families:
        row[f] = {k: statistics.across_seeds([r["families"][f][k] for r in runs])
                  for k, _ in METRICS}
      table[m][spec] = row
  result = {
      "settings": {k: FLAGS[k].value for k in (
          "workdirs", "seeds", "families", "methods", "compare", "num_inpaint", "num_steps",
          "repaint", "eta", "input_guidance", "num_stripes", "interval_resamples")},
      "feature_extractor": extractors[-1].name,
      "digit_classifier_held_out_accuracy": nets.get("digits", {}).get("held_out_accuracy"),
      "rule": "better/worse only when the 95% interval over training seeds of A - B excludes "
              "0 (paired t on one model, Welch across models; evaluation/statistics.py), "
              "else within noise",
      "runs": {m: {s: {spec: {k: v for k, v in r.items() if k != "families"}
                       | {"families": {f: {k: v for k, v in q.items() if k != "per_image"}
                                       for f, q in r["families"].items()}}
                       for spec, r in per.items()} for s, per in by_seed.items()}
               for m, by_seed in scores.items()},
      "table": table,
      "comparisons": [compare(scores, c, seeds) for c in FLAGS.compare]}
  common.write_json(FLAGS.out, result, time_key="seconds")
  text = (f"Inpainting of {FLAGS.num_inpaint} held-out images a family, {len(seeds)} training "
          f"seeds; {result['feature_extractor']} features.\n\n" + markdown(result))
  common.write_table(FLAGS.out, text)


if __name__ == "__main__":
  common.run(main, required=("out",))
