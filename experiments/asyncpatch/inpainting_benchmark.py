"""AsyncPatch Tables 3-4 in miniature: inpainting methods x mask families x models, quality and cost.

  python -m experiments.asyncpatch.inpainting_benchmark --repaint=50,5,5 \
      --out=results/evaluation/inpainting.json

For each model of --workdirs (name:workdir; default the `global` and `asyncpatch` runs of
sampler_ablation.py; `--tiny`: the `asyncpatch` run of `sampler_ablation.py --tiny` with
the same --out folder) and each mask family, the held-out images are inpainted
with each of --methods:
  asyncpatch                 AsyncPatch Eq. 4 (known pixels at t = 0), --num_steps steps;
  asyncpatch_input_guidance  the same with input guidance of the known region (Eq. 8);
  progressive                --num_stripes stripes from the known boundary inward
                             (Growing Images Sec. 2), --num_steps steps in all;
  repaint                    RePaint's resampling (diffusion/repaint.py), --repaint =
                             num_steps, jump_length, jump_n_sample (paper: 250,10,10).
Quality: PSNR, SSIM, Frechet distance and PRDC of the inpainted set against the
originals on the dataset's in-project features (`fd_digits`; with --inception_weights
also `fid`, which the table then shows), LPIPS with --lpips_weights. Cost: network evaluations and seconds per image.
Writes the JSON, a Markdown table (.md) and a PNG grid beside it.

On an accelerator (paper: ImageNet 64 / 256, 1k images, RePaint 250/10/10):
  python -m experiments.asyncpatch.inpainting_benchmark \
      --workdirs=global:gs://<bucket>/ablation/global,asyncpatch:gs://<bucket>/ablation/asyncpatch \
      --inception_weights=weights/inception_fid.npz --lpips_weights=weights/lpips_alex.npz \
      --num_inpaint=1000 --repaint=250,10,10 --out=results/evaluation/inpainting_imagenet64.json
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
from asyncpatch_jax.data import masks
from asyncpatch_jax.evaluation import feature_nets
from asyncpatch_jax.evaluation import inpainting_eval
from asyncpatch_jax.evaluation.evaluators import base as evaluators_base
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path (table and grid go next to it).")
flags.DEFINE_list("workdirs", ["global:/tmp/asyncpatch_ablation/global",
                               "asyncpatch:/tmp/asyncpatch_ablation/asyncpatch"],
                  "name:workdir of each trained model.")
flags.DEFINE_list("families", ["thin", "wide", "square", "extrema"], "Mask families.")
flags.DEFINE_list("methods", list(inpainting_eval.METHODS), "Inpainting methods.")
flags.DEFINE_integer("num_inpaint", 128, "Held-out images per family.")
flags.DEFINE_integer("num_steps", 50, "Steps of the AsyncPatch and progressive schedules.")
flags.DEFINE_list("repaint", ["250", "10", "10"], "RePaint num_steps, jump_length, jump_n_sample.")
flags.DEFINE_float("eta", 0.25, "Sampler eta (RePaint uses its DDPM step, eta = 1).")
flags.DEFINE_float("input_guidance", 1.0, "Input guidance weight w_i.")
flags.DEFINE_integer("num_stripes", 4, "Stripes of the progressive method.")
flags.DEFINE_integer("batch", 128, "Inpainting batch.")
flags.DEFINE_integer("classifier_steps", 600, "Training steps of the digit feature network.")
flags.DEFINE_string("inception_weights", "", "FID Inception weights (.npz): features = Inception.")
flags.DEFINE_string("lpips_weights", "", "LPIPS weights (.npz/.safetensors): adds LPIPS.")
flags.DEFINE_integer("seed", 0, "Root seed.")
common.define_tiny(dict(num_inpaint=20, repaint=["4", "2", "2"], num_stripes=2, num_steps=4,
                        batch=16, classifier_steps=5, families=["square"]))


def _markdown(result: dict, names: dict) -> str:
  fd = names["frechet"]
  fams = FLAGS.families
  rows = ["| model | method | network evals | s / image | "
          + " | ".join(f"{f}: {fd} / PSNR / SSIM" for f in fams) + " |",
          "|" + "---|" * (4 + len(fams))]
  for model, per_method in result["models"].items():
    for meth, per_fam in per_method.items():
      first = per_fam[fams[0]]
      cells = [f"{first['network_evals']}", f"{np.mean([per_fam[f]['seconds_per_image'] for f in fams]):.4f}"]
      for f in fams:
        q = per_fam[f]
        cells.append(f"{q[fd]:.2f} / {q['psnr']:.2f} / {q['ssim']:.3f}"
                     + (f" / LPIPS {q['lpips']:.3f}" if "lpips" in q else ""))
      rows.append(f"| {model} | {meth} | " + " | ".join(cells) + " |")
  return "\n".join(rows) + "\n"


def main(argv):
  del argv
  if FLAGS.tiny and not FLAGS["workdirs"].present:
    FLAGS.workdirs = ["asyncpatch:" + os.path.join(os.path.dirname(os.path.abspath(FLAGS.out)),
                                                   "tiny_workdirs", "asyncpatch")]
  key = jax.random.key(FLAGS.seed)
  repaint_params = tuple(int(v) for v in FLAGS.repaint)
  models = dict(item.split(":", 1) for item in FLAGS.workdirs)
  configs = {}
  for name, workdir in models.items():
    configs[name] = common.load_config(os.path.join(workdir, "config.json"))
    configs[name].evaluate.update(feature_steps=FLAGS.classifier_steps,
                                  inception_weights=FLAGS.inception_weights,
                                  lpips_weights=FLAGS.lpips_weights)
  first = next(iter(configs.values()))
  inception_features, lpips_fn = evaluators_base.load_weight_files(first)
  extractors, nets = evaluators_base.feature_extractors(first, jax.random.fold_in(key, 1),
                                                        inception_features)
  extractor = extractors[-1]                        # Inception when given, else in-project
  names = feature_nets.metric_names(extractor.name)
  result = {"settings": {k: FLAGS[k].value for k in (
      "workdirs", "families", "methods", "num_inpaint", "num_steps", "repaint", "eta",
      "input_guidance", "num_stripes", "seed")}, "feature_extractor": extractor.name,
            "feature_nets": nets,
            "digit_classifier_held_out_accuracy": nets.get("digits", {}).get("held_out_accuracy"),
            "models": {}}
  grid = []
  for name, workdir in models.items():
    run = common.load_run(workdir, configs[name])
    gen = generate.Generator(run.model)
    h, w, _ = run.image_shape
    data = run.config.data
    real = inpainting_eval.dataset_images(data.dataset, "test", FLAGS.num_inpaint,
                                          data_dir=data.data_dir, options=dict(data.options))
    result["models"][name] = {}
    for meth in tqdm(FLAGS.methods, desc=name):
      fn, nfe = inpainting_eval.method(meth, gen, run.params, num_steps=FLAGS.num_steps,
                                       eta=FLAGS.eta, input_guidance=FLAGS.input_guidance,
                                       num_stripes=FLAGS.num_stripes, repaint_params=repaint_params)
      per_fam = {}
      for j, fam in enumerate(FLAGS.families):
        m = masks.make_masks(fam, len(real), h, w, seed=FLAGS.seed)
        out, cost = inpainting_eval.run_inpainting(fn, real, m, jax.random.fold_in(key, 10 + j),
                                                   FLAGS.batch)
        q = inpainting_eval.quality(out, real, extractors, lpips_fn=lpips_fn, batch=FLAGS.batch,
                                    mesh=gen.mesh)
        per_fam[fam] = {**q, "network_evals": nfe, **cost}
        if j == 0:
          grid.append(out[:8])
      result["models"][name][meth] = per_fam
      print(name, meth, json.dumps(per_fam))
  common.write_json(FLAGS.out, result, time_key="seconds")
  table = (f"Inpainting of {FLAGS.num_inpaint} held-out images a family; {names['frechet']} and "
           f"PRDC on `{extractor.name}` features; RePaint {repaint_params}.\n\n"
           + _markdown(result, names))
  with open(os.path.splitext(FLAGS.out)[0] + ".md", "w") as f:
    f.write(table)
  m0 = masks.make_masks(FLAGS.families[0], 8, h, w, seed=FLAGS.seed)
  image_io.save_grid(np.concatenate([np.where(m0[..., None] > 0, real[:8], -1.0), *grid, real[:8]]),
                     os.path.splitext(FLAGS.out)[0] + ".png", ncols=8, scale=4 if h <= 32 else 1)
  print(table)


if __name__ == "__main__":
  common.run(main, required=("out",))
