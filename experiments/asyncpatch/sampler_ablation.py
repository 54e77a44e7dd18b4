"""AsyncPatch Table 1 in miniature: one config trained with each timestep sampler, then evaluated.

  python -m experiments.asyncpatch.sampler_ablation --out=results/evaluation/sampler_ablation.json

For each of --samplers (global, perlin, patchwise, asyncpatch) the config (default: the
main job's, configs/default.py, --train_steps overriding its step count) is trained in
<workdir_root>/<sampler> (resuming if a checkpoint is there; `--tiny`: the tiny config in
<dir of --out>/tiny_workdirs), then its EMA weights are
scored by the `generation` and `inpainting` evaluators (evaluation/evaluators/, what
`--mode=evaluate` runs on one workdir):
  - generation: --num_samples class-conditional samples (labels cycling, synchronous
    schedule) against the held-out digits, Frechet distance and PRDC on the in-project
    digit features (`fd_digits`, never FID; also `fid` with --inception_weights);
  - inpainting (AsyncPatch Eq. 4) of the held-out digits for each mask family:
    PSNR, SSIM, fd_digits/PRDC of the inpainted set, and LPIPS with --lpips_weights.
Writes the JSON, a Markdown table (.md, on Inception features when given, else the
in-project ones) and a PNG grid of inpaintings beside it.

On an accelerator, with a prepared ImageNet 64 and the converted Inception/LPIPS
weights (paper: 60M model, 50k samples for FID, 1k for inpainting):
  python -m experiments.asyncpatch.sampler_ablation --config=configs/imagenet64_60m.py \
      --workdir_root=gs://<bucket>/ablation --inception_weights=weights/inception_fid.npz \
      --lpips_weights=weights/lpips_alex.npz --num_samples=50000 --num_inpaint=1000 \
      --train_steps=0 --out=results/evaluation/sampler_ablation_imagenet64.json
"""

from __future__ import annotations

import json
import os

from absl import flags
import jax
import numpy as np
from tqdm import tqdm

from asyncpatch_jax.generation import generate
from asyncpatch_jax.data import image_io
from asyncpatch_jax.evaluation import feature_nets
from asyncpatch_jax.evaluation.evaluators import base as evaluators_base
from asyncpatch_jax.evaluation.evaluators import common as evaluators
from asyncpatch_jax.runs import loader
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path (table and grid go next to it).")
flags.DEFINE_string("config", "configs/default.py", "Config trained with each sampler.")
flags.DEFINE_string("workdir_root", "/tmp/asyncpatch_ablation", "One workdir per sampler below it.")
flags.DEFINE_list("samplers", ["global", "perlin", "patchwise", "asyncpatch"], "Timestep samplers.")
flags.DEFINE_integer("train_steps", 600, "Training steps of each run (0: the config's).")
flags.DEFINE_integer("num_samples", 1000, "Generated samples per model.")
flags.DEFINE_integer("num_inpaint", 256, "Held-out images inpainted per mask family.")
flags.DEFINE_list("families", ["thin", "wide", "square", "extrema"], "Mask families.")
flags.DEFINE_integer("num_steps", 50, "Sampler steps (generation and inpainting).")
flags.DEFINE_float("eta", 0.25, "Sampler eta.")
flags.DEFINE_float("guidance", 0.0, "CFG weight of the generation samples.")
flags.DEFINE_integer("batch", 256, "Sampling batch.")
flags.DEFINE_integer("classifier_steps", 600, "Training steps of the digit feature network.")
flags.DEFINE_string("inception_weights", "", "FID Inception weights (.npz): features = Inception.")
flags.DEFINE_string("lpips_weights", "", "LPIPS weights (.npz/.safetensors): adds LPIPS.")
flags.DEFINE_integer("seed", 0, "Root seed.")
# The tests' run, chained with inpainting_benchmark.py --tiny on the same --out folder.
common.define_tiny(dict(config="configs/test.py", samplers=["asyncpatch"], train_steps=2,
                        num_samples=20, num_inpaint=20, num_steps=4, batch=16,
                        classifier_steps=5, families=["square"]))


def _train(sampler: str) -> str:
  config = common.load_config(FLAGS.config)
  config.timesteps.sampler = sampler
  if FLAGS.train_steps:
    config.train.num_steps = FLAGS.train_steps
  config.evaluate.at_end = ()                       # scored here instead
  workdir = os.path.join(FLAGS.workdir_root, sampler)
  common.train_or_resume(config, workdir)
  return workdir


def _eval_config(workdir: str):
  """The workdir's config with this script's evaluation settings (config.sample, config.evaluate)."""
  config = common.load_config(os.path.join(workdir, "config.json"))
  config.sample.update(num_steps=FLAGS.num_steps, eta=FLAGS.eta)
  config.evaluate.update(
      num_samples=FLAGS.num_samples, batch_size=FLAGS.batch, guidance=FLAGS.guidance,
      reference_split="test", num_reference=0, mask_families=tuple(FLAGS.families),
      num_inpaint=FLAGS.num_inpaint, inpaint_method="asyncpatch",
      feature_steps=FLAGS.classifier_steps, inception_weights=FLAGS.inception_weights,
      lpips_weights=FLAGS.lpips_weights)
  return config, evaluators.from_config(config, ("generation", "inpainting"),
                                        loader.saved_image_shape(workdir))


def _markdown(result: dict, names: dict) -> str:
  fams, fd = FLAGS.families, names["frechet"]
  head = (f"| sampler | generation {fd} | {names['precision']} | {names['recall']} | "
          + " | ".join(f"{f}: PSNR / SSIM / {fd}" for f in fams) + " |")
  rows = [head, "|" + "---|" * (4 + len(fams))]
  for s, r in result["models"].items():
    g = r["generation"]
    cells = [f"{g[fd]:.2f}", f"{g[names['precision']]:.3f}", f"{g[names['recall']]:.3f}"]
    for f in fams:
      q = r["inpainting"][f]
      cells.append(f"{q['psnr']:.2f} / {q['ssim']:.3f} / {q[fd]:.2f}"
                   + (f" / LPIPS {q['lpips']:.3f}" if "lpips" in q else ""))
    rows.append(f"| {s} | " + " | ".join(cells) + " |")
  return "\n".join(rows) + "\n"


def main(argv):
  del argv
  if FLAGS.tiny and not FLAGS["workdir_root"].present:
    FLAGS.workdir_root = os.path.join(os.path.dirname(os.path.abspath(FLAGS.out)),
                                      "tiny_workdirs")
  key = jax.random.key(FLAGS.seed)
  workdirs = {s: _train(s) for s in FLAGS.samplers}
  chosen = {s: _eval_config(workdirs[s]) for s in FLAGS.samplers}
  configs = {s: c for s, (c, _) in chosen.items()}
  first = configs[FLAGS.samplers[0]]
  inception_features, lpips_fn = evaluators_base.load_weight_files(first)
  extractors, nets = evaluators_base.feature_extractors(first, jax.random.fold_in(key, 1),
                                                        inception_features)
  extractor = extractors[-1]                        # the table's: Inception when given
  names = feature_nets.metric_names(extractor.name)
  metric_keys = {n for ex in extractors for n in feature_nets.metric_names(ex.name).values()}
  result = {"settings": {k: FLAGS[k].value for k in (
      "config", "samplers", "train_steps", "num_samples", "num_inpaint", "families", "num_steps",
      "eta", "guidance", "seed")}, "feature_extractor": extractor.name, "feature_nets": nets,
            "digit_classifier_held_out_accuracy": nets.get("digits", {}).get("held_out_accuracy"),
            "models": {}}
  grid_rows = []
  for s in tqdm(FLAGS.samplers, desc="evaluating"):
    run = common.load_run(workdirs[s], configs[s])
    gen = generate.Generator(run.model)
    ctx = evaluators_base.Context(gen, run.params, configs[s], image_shape=run.image_shape,
                                  key=key, mesh=gen.mesh, lpips_fn=lpips_fn,
                                  mask_seed=FLAGS.seed, feature_nets=(extractors, nets))
    scores, examples = evaluators.run(chosen[s][1], ctx)
    inpainting = scores["inpainting"]
    model_result = {"workdir": workdirs[s], "train_steps": run.step,
                    "generation": {k: v for k, v in scores["generation"].items()
                                   if k in metric_keys},
                    "inpainting": {fam: {**q, "network_evals": inpainting["network_evals"]}
                                   for fam, q in inpainting["families"].items()}}
    for fam in FLAGS.families:
      grid_rows.extend(examples[fam])
    h = run.image_shape[0]
    result["models"][s] = model_result
    print(s, json.dumps(model_result))
  common.write_json(FLAGS.out, result, time_key="seconds")
  table = (f"Frechet distance and PRDC on `{extractor.name}` features; inpainting: AsyncPatch "
           f"Eq. 4, {FLAGS.num_steps} steps, {FLAGS.num_inpaint} held-out images a family.\n\n"
           + _markdown(result, names))
  with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
    f.write(table)
  image_io.save_grid(np.concatenate(grid_rows), os.path.splitext(FLAGS.out)[0] + ".png",
                     ncols=8, scale=4 if h <= 32 else 1)
  print(table)


if __name__ == "__main__":
  common.run(main, required=("out",))
