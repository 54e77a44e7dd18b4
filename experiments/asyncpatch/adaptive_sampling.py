"""Adaptive sampling (AsyncPatch Sec. 5.5, Fig. 7; SRM; Patch Forcing) on a trained digits or textures model.

  python -m experiments.asyncpatch.adaptive_sampling --workdir=/tmp/asyncpatch_default \
      --head_workdir=/tmp/asyncpatch_head --out=results/adaptive/adaptive_sampling.json

Needs a trained workdir (the main job's, or any UNet or DiT on the digits or the textures)
and an uncertainty head trained on it (configs/uncertainty_digits.py with
--config.uncertainty.model_workdir). For the synchronous schedule and every schedule policy
(diffusion/policies.py) at each step budget, draws unconditional samples (null label,
eta 0.25) and scores them against the dataset's test split with the evaluation wing's
offline metrics: Frechet distance and precision/recall/density/coverage on the dataset's
in-project features (`fd_digits` / `fd_textures`, ..., never called FID), and on the digits
the main job's classifier-confidence share (max class probability >= 0.9; the textures have
no classes). It records the network evaluations each setting used (the loop's steps) and
the mean steps per pixel.
Also: the head's calibration on held-out images (E[err^2 / sigma^2] and the correlation of
predicted and actual squared error per time bin), and the Fig. 7 panels of
uncertainty_accelerated: per-pixel step-count maps and their histogram with the samples
(adaptive_steps.png), the predicted uncertainty and the x0 prediction at four times
(adaptive_evolution.png). Writes the JSON, a Markdown table (.md) and the PNGs next to --out.
`--tiny`: 8 samples, budgets 4 and 6 (the tests' run).
"""

from __future__ import annotations

import json
import time

from absl import flags
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
from etils import epath

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from asyncpatch_jax.runtime import checks  # pylint: disable=g-import-not-at-top,wrong-import-position
from asyncpatch_jax.generation import generate
from asyncpatch_jax.data import image_io
from asyncpatch_jax.diffusion import flow
from asyncpatch_jax.diffusion import policies
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.evaluation import digit_classifier
from asyncpatch_jax.evaluation import feature_nets
from asyncpatch_jax.evaluation import inpainting_eval
from asyncpatch_jax.evaluation import metrics
from asyncpatch_jax.evaluation import statistics
from asyncpatch_jax.models import uncertainty_head
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", "/tmp/asyncpatch_default", "Trained digits or textures model "
                    "(default: the main job's).")
flags.DEFINE_string("head_workdir", "/tmp/asyncpatch_head", "Uncertainty head of that model.")
flags.DEFINE_string("out", None, "Output JSON path (table and PNGs go next to it).")
flags.DEFINE_list("budgets", ["8", "16", "32", "50"], "Step budgets (network evaluations).")
flags.DEFINE_integer("num_samples", 256, "Samples per (schedule, budget).")
flags.DEFINE_integer("batch_size", 256, "Sampler batch.")
flags.DEFINE_float("eta", 0.25, "Sampler eta (AsyncPatch App. E).")
flags.DEFINE_integer("classifier_steps", 600, "Training steps of the in-project feature network.")
flags.DEFINE_integer("num_reference", 0, "Test images the samples are scored against (0: the "
                     "whole test split).")
flags.DEFINE_integer("panel_budget", 32, "Budget of the Fig. 7 panels.")
flags.DEFINE_integer("seed", 0, "Root seed.")
flags.DEFINE_integer("sampling_seeds", 1, "Sampling seeds of every (schedule, budget) row; the "
                     "rows and panels are the first seed's, the paired comparisons pool all.")
flags.DEFINE_integer("resamples", 1000, "Bootstrap resamples of the paired intervals.")
common.define_tiny(dict(num_samples=8, batch_size=8, budgets=["4", "6"], classifier_steps=5,
                        panel_budget=6, sampling_seeds=2, resamples=50, num_reference=64))

REPLICATE = "synchronous (2nd seed)"
# (name, policy or None for the tensor schedule) in the order of the table.
SETTINGS = [
    ("synchronous", None),
    ("uncertainty_accelerated", policies.uncertainty_accelerated(speedup=2.0)),
    ("uncertainty_ordered", policies.uncertainty_ordered(grid=(2, 2), overlap=0.5)),
    ("look_ahead", policies.look_ahead(factor=1.4, quantile=0.4, grid=(4, 4))),
    ("dual_loop", policies.dual_loop(sub_steps=4, quantile=0.4, grid=(4, 4))),
]


def _describe(policy) -> dict:
  if policy is None:
    return {"description": "tensor tau = 1 - k/N for every pixel"}
  return {"params": policy.params,
          "grid": "pixels" if policy.regions is None else list(policy.regions)}


def _calibration(run, images, key) -> list[dict]:
  """Per time bin (t of the model's timestep sampler, t > 0): mean err^2 / sigma^2 (1 when
  calibrated) and corr(log sigma^2, log err^2) over pixels, on held-out images."""
  model = run.model
  b, h, w, _ = images.shape
  k_t, k_eps = jax.random.split(key)
  t = run.noise_level_sampler(k_t, b, h, w)
  eps = jax.random.normal(k_eps, images.shape)
  z = flow.add_noise(images, eps, t)
  y = jnp.full((b,), model.null_label, jnp.int32) if model.num_classes else None
  v_hat = jax.jit(lambda p, z, t, y: model.apply({"params": p}, z, t, y))(
      run.params, z, t, y)
  var = uncertainty_head.uncertainty_fn(run.head)(z, t, v_hat, run.head_params)
  err2 = np.asarray(jnp.mean(jnp.square(flow.velocity_target(images, eps) - v_hat), -1))
  t, var = np.asarray(t), np.asarray(var)
  rows = []
  for lo, hi in ((0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)):
    sel = (t > lo) & (t <= hi)
    rows.append({"t": [lo, hi], "pixels": int(sel.sum()),
                 "mean_err2_over_var": float(np.mean(err2[sel] / var[sel])),
                 "corr_log_var_log_err2": float(np.corrcoef(np.log(var[sel]),
                                                            np.log(err2[sel] + 1e-12))[0, 1])})
  return rows


def _shown_image(ax, x):
  """An image in [-1, 1], [H, W, 1] in gray or [H, W, 3] in colour."""
  x = np.clip(np.asarray(x), -1, 1)
  if x.shape[-1] == 1:
    ax.imshow(x[..., 0], cmap="gray", vmin=-1, vmax=1)
  else:
    ax.imshow((x + 1.0) / 2.0)


def _panels(out_dir, result, budget):
  """Fig. 7: step-count maps + histogram with the samples; uncertainty and x0 at 4 times."""
  samples = np.asarray(result.samples)[:8]
  steps = np.asarray(result.steps)
  hist = result.history
  fig, axes = plt.subplots(3, 8, figsize=(12, 5.2), gridspec_kw={"height_ratios": [1, 1, 1.2]})
  for i in range(8):
    _shown_image(axes[0, i], samples[i])
    im = axes[1, i].imshow(steps[i], cmap="viridis", vmin=0, vmax=budget)
    for ax in axes[:2, i]:
      ax.set_xticks([]); ax.set_yticks([])
  axes[0, 0].set_ylabel("sample")
  axes[1, 0].set_ylabel("steps")
  fig.colorbar(im, ax=axes[1, :].tolist(), shrink=0.8, label="steps per pixel")
  gs = axes[2, 0].get_gridspec()
  for ax in axes[2, :]:
    ax.remove()
  ax = fig.add_subplot(gs[2, :])
  ax.hist(steps.reshape(-1), bins=np.arange(budget + 2) - 0.5, color="tab:blue")
  ax.set_xlabel(f"steps per pixel (budget {budget}, all {steps.shape[0]} images)")
  ax.set_ylabel("pixels")
  path_steps = str(out_dir / "adaptive_steps.png")
  fig.savefig(path_steps, dpi=120, bbox_inches="tight")
  plt.close(fig)

  n = int(hist["num_steps"])
  shown = [max(0, round(f * n) - 1) for f in (0.25, 0.5, 0.75, 0.9)]
  times = np.asarray(hist["times"])
  unc = np.asarray(hist["uncertainty"])
  x0 = np.asarray(hist["x0"])
  fig, axes = plt.subplots(8, 5, figsize=(7.5, 12))
  for r in range(4):
    for j, k in enumerate(shown):
      a_u, a_x = axes[2 * r, j], axes[2 * r + 1, j]
      a_u.imshow(np.log10(np.maximum(unc[k, r], 1e-4)), cmap="magma", vmin=-3, vmax=1)
      _shown_image(a_x, x0[k, r])
      if r == 0:
        a_u.set_title(f"step {k + 1}\nmean t {times[k, r].mean():.2f}", fontsize=8)
    _shown_image(axes[2 * r, 4], samples[r])
    axes[2 * r + 1, 4].imshow(steps[r], cmap="viridis", vmin=0, vmax=budget)
    axes[2 * r, 0].set_ylabel("log10 var", fontsize=8)
    axes[2 * r + 1, 0].set_ylabel("x0 pred.", fontsize=8)
  axes[0, 4].set_title("final / steps", fontsize=8)
  for ax in axes.ravel():
    ax.set_xticks([]); ax.set_yticks([])
  path_evolution = str(out_dir / "adaptive_evolution.png")
  fig.savefig(path_evolution, dpi=120, bbox_inches="tight")
  plt.close(fig)
  return path_steps, path_evolution, shown


def _concatenate(seeds):
  """[(features, confident flags or None)] of the sampling seeds -> the pooled pair."""
  features, confident = zip(*seeds)
  return (np.concatenate(features),
          None if confident[0] is None else np.concatenate(confident))


def _paired(policy, synchronous, real_stats, fd_name: str) -> dict:
  """The policy against the synchronous schedule on the same keys, pooled over the sampling
  seeds: paired bootstrap intervals of the Frechet distance (`fd_name`: fd_digits or
  fd_textures) and, on the digits, of the confident share, with their verdicts
  (evaluation/statistics.py's rule)."""
  (fa, ca), (fb, cb) = (_concatenate(seeds) for seeds in (policy, synchronous))
  mu_r, cov_r = real_stats

  def fd(features):
    return lambda idx: metrics.frechet_distance(*metrics.feature_statistics(features[idx]),
                                                mu_r, cov_r)
  d_fd = statistics.paired_set(fd(fa), fd(fb), len(fa), resamples=FLAGS.resamples)
  every = np.arange(len(fa))
  out = {"pooled_samples": len(fa), "sampling_seeds": FLAGS.sampling_seeds,
         f"{fd_name}_pooled": {"policy": fd(fa)(every), "synchronous": fd(fb)(every)},
         f"{fd_name}_difference": d_fd.as_dict(),
         "verdict": statistics.verdict(d_fd, higher_is_better=False)}
  if ca is not None:
    d_conf = statistics.paired(ca.astype(np.float64), cb.astype(np.float64),
                               resamples=FLAGS.resamples)
    out.update(confident_difference=d_conf.as_dict(),
               confident_verdict=statistics.verdict(d_conf, higher_is_better=True))
  return out


def _markdown(rows, names: dict) -> str:
  """The rows' table; names: feature_nets.metric_names of the extractor."""
  prdc = ("precision", "recall", "density", "coverage")
  confident = "confident_fraction" in rows[0]
  head = ["schedule", "budget", "network evaluations", "mean steps / pixel", names["frechet"],
          *prdc] + (["confident"] if confident else [])
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for r in rows:
    cells = [r["schedule"], r["budget"], r["network_evaluations"],
             f"{r['mean_steps_per_pixel']:.1f}", f"{r[names['frechet']]:.2f}",
             *(f"{r[names[m]]:.3f}" for m in prdc)]
    if confident:
      cells.append(f"{r['confident_fraction']:.3f}")
    lines.append("| " + " | ".join(map(str, cells)) + " |")
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  out = epath.Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  budgets = [int(b) for b in FLAGS.budgets]
  run = common.load_run(FLAGS.workdir, head_workdir=FLAGS.head_workdir)
  dataset, options = run.config.data.dataset, dict(run.config.data.options)
  problem = feature_nets.in_project_problem(dataset, options)
  if problem:
    raise checks.InputError(f"{FLAGS.workdir}: {problem}; adaptive_sampling.py scores with "
                            "the in-project features of the digits and the textures.")
  params, head_params = run.params, run.head_params
  h, w, c = run.image_shape
  key = jax.random.key(FLAGS.seed)
  extractor, held_out = feature_nets.in_project(dataset, jax.random.fold_in(key, 1),
                                                FLAGS.classifier_steps, options)
  names = feature_nets.metric_names(extractor.name)
  fd_name = names["frechet"]
  digits = dataset == "digits"        # the digits' classes give the confident share
  real = inpainting_eval.dataset_images(dataset, "test", FLAGS.num_reference or None,
                                        options=options)
  real_stats = metrics.feature_statistics(np.asarray(feature_nets.extract(extractor, real)))
  gen = generate.Generator(run.model, mesh=None, head=run.head)
  n, bs = FLAGS.num_samples, FLAGS.batch_size
  rows = []
  # The synchronous schedule twice (another seed): the seed-to-seed spread of the metrics
  # at this sample size is the scale against which the policies' differences are read.
  pooled = {}     # (schedule, budget) -> [(features, confident flags or None)] a sampling seed
  seed_fd = {}    # (schedule, budget) -> the Frechet distance of each sampling seed
  for name, policy in SETTINGS + [(REPLICATE, None)]:
    for budget in budgets:
      for seed in range(FLAGS.sampling_seeds if name != REPLICATE else 1):
        t0 = time.time()
        samples, steps, loop_steps, per_image = [], [], 0, []
        seed_key = jax.random.fold_in(key, 5 if name == REPLICATE else 2)
        if seed:       # the same keys for every schedule of a seed: comparisons are paired
          seed_key = jax.random.fold_in(seed_key, 1000 + seed)
        try:
          for i in range(0, n, bs):
            b = min(bs, n - i)
            k = jax.random.fold_in(seed_key, i)
            if policy is None:
              x = gen(params, schedules.synchronous(budget, h, w), key=k,
                      shape=(b, h, w, c), eta=FLAGS.eta)
              samples.append(np.asarray(x))
              steps.append(np.full((b, h, w), budget))
              loop_steps, per_image = budget, per_image + [budget] * b
            else:
              res = gen(params, policy, key=k, shape=(b, h, w, c), eta=FLAGS.eta,
                        budget=budget, head_params=head_params)
              samples.append(np.asarray(res.samples))
              steps.append(np.asarray(res.steps))
              evaluations = np.asarray(res.evaluations)
              loop_steps = max(loop_steps, int(evaluations.max()))
              per_image += evaluations.tolist()
        except checks.InputError as e:     # a budget below what the policy needs
          print(f"{name} at budget {budget}: skipped ({e})")
          continue
        samples = np.concatenate(samples)
        features = np.asarray(feature_nets.extract(extractor, samples))
        confident = (np.max(np.asarray(digit_classifier.classify(extractor.params, samples)),
                            -1) >= 0.9) if digits else None
        pooled.setdefault((name, budget), []).append((features, confident))
        seed_fd.setdefault((name, budget), []).append(metrics.frechet_distance(
            *metrics.feature_statistics(features), *real_stats))
        if seed:
          continue
        row = {"schedule": name, **_describe(policy), "budget": budget,
               "network_evaluations": loop_steps,
               "evaluations_per_image_mean": float(np.mean(per_image)),
               "mean_steps_per_pixel": float(np.concatenate(steps).mean()),
               **feature_nets.feature_metrics(extractor, real, samples),
               **({"confident_fraction": float(np.mean(confident))} if digits else {}),
               "seconds": time.time() - t0}
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "params"}))
        if policy is None and budget == max(budgets):
          image_io.save_grid(samples[:64], str(out.parent / "synchronous_samples.png"), scale=4)

  # Fig. 7 panels: uncertainty_accelerated at the panel budget, with its history.
  pb = FLAGS.panel_budget
  res = gen(params, SETTINGS[1][1], key=jax.random.fold_in(key, 3),
            shape=(64, h, w, c), eta=FLAGS.eta, budget=pb, head_params=head_params,
            return_history=True)
  path_steps, path_evolution, shown = _panels(out.parent, res, pb)
  image_io.save_grid(np.asarray(res.samples), str(out.parent / "accelerated_samples.png"), scale=4)
  calibration = _calibration(run, real, jax.random.fold_in(key, 4))

  by = {(r["schedule"], r["budget"]): r for r in rows}
  comparison = []
  for name, _ in SETTINGS[1:]:
    for budget in budgets:
      if (name, budget) in by:
        r, s = by[name, budget], by["synchronous", budget]
        spread = abs(s[fd_name] - by[REPLICATE, budget][fd_name])
        comparison.append({"schedule": name, "budget": budget,
                           f"{fd_name}_minus_synchronous": r[fd_name] - s[fd_name],
                           "synchronous_seed_spread": spread,
                           **_paired(pooled[name, budget], pooled["synchronous", budget],
                                     real_stats, fd_name)})
        if FLAGS.sampling_seeds > 1:
          comparison[-1][f"{fd_name}_per_seed"] = {
              n_: statistics.across_seeds(seed_fd[n_, budget]) for n_ in (name, "synchronous")}
  result = {
      "settings": {"model_workdir": FLAGS.workdir, "head_workdir": FLAGS.head_workdir,
                   "model_step": run.step, "budgets": budgets,
                   "num_samples": n, "eta": FLAGS.eta, "labels": "null (unconditional)",
                   "dataset": dataset, "model": run.config.model.name,
                   "real_images": f"{dataset} test split ({len(real)})",
                   "features": f"in-project {dataset} network ({type(extractor).__name__}), "
                               f"penultimate {extractor.dim}-d ({fd_name} is not FID)",
                   "classifier_held_out_accuracy": held_out},
      "rows": rows, "comparison_at_equal_budget": comparison,
      "head_calibration": calibration,
      "panels": {"budget": pb, "steps": path_steps, "evolution": path_evolution,
                 "history_steps_shown": [k + 1 for k in shown],
                 "accelerated_mean_steps_per_pixel": float(np.asarray(res.steps).mean()),
                 "accelerated_network_evaluations": int(np.asarray(res.evaluations).max())},
      "wall_seconds": common.elapsed(),
  }
  common.write_json(out, result)
  out.with_suffix(".md").write_text(_markdown(rows, names))
  print(_markdown(rows, names))
  print(f"wrote {out} in {result['wall_seconds']:.0f} s")


if __name__ == "__main__":
  common.run(main, required=("out",))
