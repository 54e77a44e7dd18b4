"""Iterative Partial Refinement (IPR, Kang, Yoon, Ahn) on this project's digits model.

  python -m experiments.ipr.ipr_digits --workdir=/tmp/asyncpatch_default \
      --out=results/ipr/ipr_digits.json

x^(0) comes from sequential (autoregressive, raster 2x2 patches) inference, as in the
paper; then R rounds of IPR re-noise floor(alpha N) of the N patches and regenerate
them from the rest. After every round the in-project digit classifier (classifier.py,
trained here on the held-out split's complement) scores the samples with the metrics
of the main job's eval.json: unconditional samples, share with max class probability
>= 0.9; class-conditional samples (CFG), share classified as their label. The
synchronous-schedule samples of the same model are the reference line.
JSON: {"rounds": [...], "unconditional_confident_fraction": [...],
"conditional_label_accuracy": [...], "synchronous": {...}, "settings": {...}} and a plot.
`--tiny`: 8 samples, 2 rounds of 4 steps.
"""

from __future__ import annotations

import os
import time

from absl import flags
import jax
import numpy as np

from asyncpatch_jax.evaluation import digit_classifier as classifier
from asyncpatch_jax.generation import generate
from asyncpatch_jax.data import image_io
from asyncpatch_jax.diffusion import ipr
from asyncpatch_jax.diffusion import schedules
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a trained digits model.")
flags.DEFINE_string("out", None, "Output JSON path (the plot and grid go next to it).")
flags.DEFINE_integer("num_samples", 256, "Samples per setting.")
flags.DEFINE_integer("num_rounds", 20, "IPR rounds R.")
flags.DEFINE_float("alpha", 0.25, "Resampling ratio.")
flags.DEFINE_list("grid", ["2", "2"], "Patch grid (rows, cols): the regions and the AR groups.")
flags.DEFINE_integer("num_steps", 50, "Sampler steps of a full regeneration / synchronous run.")
flags.DEFINE_integer("ar_steps_per_group", 0,
                     "Steps per patch of the autoregressive x^(0) (0: num_steps / patches).")
flags.DEFINE_bool("conditional", True, "Also run the class-conditional (CFG) setting.")
flags.DEFINE_integer("classifier_steps", 600, "Training steps of the in-project classifier.")
flags.DEFINE_float("eta", 0.25, "Sampler eta.")
flags.DEFINE_float("guidance", 2.0, "CFG weight of the class-conditional runs.")
flags.DEFINE_integer("seed", 0, "Root seed.")
common.define_tiny(dict(num_samples=8, num_rounds=2, num_steps=4, classifier_steps=5))


def main(argv):
  del argv
  t0 = time.time()
  run = common.load_run(FLAGS.workdir)
  if run.config.data.dataset != "digits":
    raise ValueError(f"{FLAGS.workdir} holds a {run.config.data.dataset!r} model; the digit "
                     "classifier scores digits models only.")
  h, w, c = run.image_shape
  grid = tuple(int(g) for g in FLAGS.grid)
  regions = schedules.grid_regions(h, w, grid)
  n, rounds = FLAGS.num_samples, FLAGS.num_rounds
  key = jax.random.key(FLAGS.seed)
  cls_params, held_out = classifier.train_classifier(jax.random.fold_in(key, 0),
                                                     FLAGS.classifier_steps)
  gen = generate.Generator(run.model)
  params = run.params
  labels = (np.arange(n) % 10).astype(np.int32)
  per_group = FLAGS.ar_steps_per_group or max(FLAGS.num_steps // (grid[0] * grid[1]), 1)
  tau_ar = schedules.autoregressive(h, w, grid, per_group)
  tau_sync = schedules.synchronous(FLAGS.num_steps, h, w)

  def scores(images, lab):
    probs = np.asarray(classifier.classify(cls_params, images))
    if lab is None:
      return float(np.mean(probs.max(-1) >= 0.9))
    return float(np.mean(probs.argmax(-1) == lab))

  result = {"rounds": list(range(rounds + 1))}
  histories = {}
  settings = [("unconditional_confident_fraction", None, 0.0, 1)]
  if FLAGS.conditional:
    settings.append(("conditional_label_accuracy", labels, FLAGS.guidance, 2))
  for name, lab, w_cfg, k in settings:
    kk = jax.random.fold_in(key, k)
    x0 = gen(params, tau_ar, key=jax.random.fold_in(kk, 0), shape=(n, h, w, c), labels=lab,
             guidance_weight=w_cfg, eta=FLAGS.eta)
    _, history, _ = gen.refine(params, x0, key=jax.random.fold_in(kk, 1), regions=regions,
                               num_rounds=rounds, alpha=FLAGS.alpha, num_steps=FLAGS.num_steps,
                               labels=lab, guidance_weight=w_cfg, eta=FLAGS.eta,
                               return_history=True)
    history = np.asarray(history)
    histories[name] = history
    result[name] = [scores(history[r], lab) for r in range(rounds + 1)]
    sync = gen(params, tau_sync, key=jax.random.fold_in(kk, 2), shape=(n, h, w, c), labels=lab,
               guidance_weight=w_cfg, eta=FLAGS.eta)
    result.setdefault("synchronous", {})[name] = scores(sync, lab)
    print(name, "round 0 / R:", result[name][0], result[name][-1],
          "synchronous:", result["synchronous"][name], flush=True)
  result["settings"] = {
      "workdir": FLAGS.workdir, "step": run.step, "num_samples": n,
      "grid": list(grid), "alpha": FLAGS.alpha, "regions_per_round": int(
          ipr.num_resampled(FLAGS.alpha, grid[0] * grid[1], 0)),
      "num_steps": FLAGS.num_steps, "autoregressive_steps_per_group": per_group,
      "eta": FLAGS.eta, "guidance": FLAGS.guidance, "classifier_held_out_accuracy": held_out,
      "wall_s": time.time() - t0}

  common.write_json(FLAGS.out, result, time_key=None, indent=1)
  stem = os.path.splitext(FLAGS.out)[0]
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for (name, *_), color in zip(settings, ("C0", "C1")):
    ax.plot(result["rounds"], result[name], color=color, marker=".", label=f"IPR, {name}")
    ax.axhline(result["synchronous"][name], color=color, ls="--", lw=1,
               label="synchronous schedule")
  ax.set_xlabel("IPR round (0 = autoregressive sample)")
  ax.set_ylim(0, 1.02)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(stem + ".png", dpi=120)
  shown = sorted({0, 1, rounds // 4, rounds // 2, rounds})
  rows = histories["unconditional_confident_fraction"][shown, :10]
  image_io.save_grid(rows.reshape(-1, h, w, c), stem + "_rounds.png", ncols=rows.shape[1],
                     scale=4)
  print(f"wrote {FLAGS.out} [{time.time() - t0:.0f}s]")


if __name__ == "__main__":
  common.run(main, required=("workdir", "out"))
