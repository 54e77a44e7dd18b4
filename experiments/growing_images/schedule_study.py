"""Growing Images Sec. 2 (Fig. 1, App. C) with this project's model: the spatial-schedule study.

  python -m experiments.growing_images.schedule_study \
      --out=results/schedule_study/schedule_study.json

One trained AsyncPatch UNet (the pixel model of the embedded 32x32 textures; trained in
`--workdir` with the sharded, resumable loop if it is not there yet) fills the hidden
right half of `--num_images` held-out crops (a left-half mask) with only the spatial
schedule varying:
  progressive  K vertical stripes filled one after another from the boundary inward
               (diffusion/schedules.py `progressive`), K in `--stripes`;
  interleaved  the same stripes visited round-robin, one step a visit (`interleaved`,
               R = T rounds of T_int = 1), so every pixel gets the same number of steps
               as under progressive, spread over the whole run;
in two budgets:
  per_stripe   T = `--steps_per_stripe` steps for every stripe (the paper's protocol,
               App. C: K T network evaluations in all);
  fixed_total  `--total_steps` network evaluations in all (T = total // K per stripe).
K = 1 is the parallel schedule (AsyncPatch Eq. 4) in both. All schedules share one key,
so image i starts from the same noise under every schedule (paired comparisons).
Scores: PSNR and SSIM of the completed image against the original, LPIPS with
`--lpips_weights` (no weights ship: null without), and the Frechet distance and
precision/recall/density/coverage on the in-project texture features (`fd_textures`,
never FID) of the completed images against the originals. Standard errors: per-image
metrics over images; distributional ones by a delete-a-group jackknife (10 groups);
differences to K = 1 are paired (the same images, noise and folds). Next to the
interleaved runs: the Blume-Capel lab's prediction (spin/: the scheduled mean-field
recursion of a chain with one clamped block and K hidden ones, the paper's couplings):
the l2 bias of progressive L->R and of interleaved at matched updates per block.

Writes the JSON, a Markdown table (.md) and PNG figures next to `--out`; the samples of
each schedule are cached in `--cache` (a rerun only recomputes the metrics).
"""

from __future__ import annotations

import hashlib
import json
import os
import time

from absl import flags
import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)

from asyncpatch_jax.runtime import checks  # noqa: E402
from asyncpatch_jax.generation import generate  # noqa: E402
from asyncpatch_jax import spin  # noqa: E402
from asyncpatch_jax.data import datasets  # noqa: E402
from asyncpatch_jax.data import image_io  # noqa: E402
from asyncpatch_jax.diffusion import schedules  # noqa: E402
from asyncpatch_jax.evaluation import feature_nets  # noqa: E402
from asyncpatch_jax.evaluation import metrics  # noqa: E402
from asyncpatch_jax.runtime import progress  # noqa: E402
from experiments import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "results/schedule_study/schedule_study.json", "Output JSON path.")
flags.DEFINE_string("workdir", "workdirs/textures_pixel",
                    "The model's workdir; trained there (or resumed) with --train_steps "
                    "(--tiny: <dir of --out>/tiny_model unless given).")
flags.DEFINE_integer("train_steps", 1500, "Training steps of the model (if trained here).")
flags.DEFINE_integer("train_batch", 16, "Training batch size of the model (if trained here).")
flags.DEFINE_string("cache", "", "Folder of the cached samples; '' = <workdir>/schedule_study.")
flags.DEFINE_integer("num_images", 500, "Held-out images (textures 'test' split).")
flags.DEFINE_list("stripes", ["1", "2", "3", "4", "6", "8", "10"], "Numbers of stripes K.")
flags.DEFINE_list("schedules", ["progressive", "interleaved"], "Stripe schedules.")
flags.DEFINE_integer("steps_per_stripe", 8, "T of the per_stripe table.")
flags.DEFINE_integer("total_steps", 48, "Network evaluations of the fixed_total table.")
flags.DEFINE_list("fixed_total_schedules", ["progressive", "interleaved"],
                  "Schedules of the fixed_total table (a subset of --schedules).")
flags.DEFINE_float("eta", 0.25, "Sampler eta (AsyncPatch: 0.25).")
flags.DEFINE_integer("batch", 50, "Images per sampler call.")
flags.DEFINE_integer("feature_steps", 600, "Training steps of the texture feature network.")
flags.DEFINE_string("lpips_weights", "", "LPIPS weights (.npz, evaluation/lpips.py); '' = none.")
flags.DEFINE_integer("jackknife_groups", 10, "Groups of the delete-a-group jackknife.")
flags.DEFINE_integer("seed", 0, "Root seed.")
flags.DEFINE_integer("num_show", 8, "Images in the example grids.")
flags.DEFINE_bool("lab", True, "Also run the Blume-Capel lab's prediction per K.")
flags.DEFINE_bool("progress", True, "Progress bars.")
# --tiny: a tiny model (flags given on the command line win); seconds end to end.
common.define_tiny(dict(out="results/tmp/schedule_study_tiny/schedule_study.json",
                        train_steps=2, train_batch=8, num_images=24, stripes=["1", "2"],
                        steps_per_stripe=2, total_steps=4, batch=24, feature_steps=3,
                        jackknife_groups=4, num_show=4),
                   "A tiny model, few images and steps (the test suite's run).")

SCHEDULES = ("progressive", "interleaved")
TABLES = ("per_stripe", "fixed_total")
# The lab chain of Growing Images Sec. 4.3 (blume_capel.py), K hidden blocks.
LAB_CHAIN = dict(block_size=1, j_intra=1.0, j_inter=0.6, delta=0.5, fields=0.0)
LAB_PHASE, LAB_T_INT, LAB_SEEDS = 3000, 20, 24
PER_IMAGE = ("psnr", "ssim", "lpips")
DISTRIBUTIONAL = ("frechet", "precision", "recall", "density", "coverage")


def study_runs(stripes, kinds, steps_per_stripe: int, total_steps: int,
               fixed_total_kinds=SCHEDULES) -> dict:
  """{(table, kind, K): (T per stripe, rounds R)}: the schedules of both tables.

  per_stripe: T = steps_per_stripe; fixed_total: T = total_steps // K. Interleaved runs
  R = T rounds of one step a visit (T steps per pixel, as progressive); K = 1 is the
  parallel schedule, run once per table under 'progressive'.
  """
  runs = {}
  for table in TABLES:
    for kind in kinds:
      if table == "fixed_total" and kind not in fixed_total_kinds:
        continue
      for k in stripes:
        if kind == "interleaved" and k == 1:
          continue
        per = steps_per_stripe if table == "per_stripe" else total_steps // k
        if per < 1:
          raise checks.InputError(f"--total_steps={total_steps} gives K={k} stripes no step; "
                                  f"use --total_steps >= {max(stripes)}.")
        runs[table, kind, k] = per
  return runs


def build_schedule(mask, kind: str, k: int, per: int) -> np.ndarray:
  """The tau of one run: progressive(K, T) or interleaved(K, R = T, T_int = 1)."""
  if kind == "progressive":
    return schedules.progressive(mask, k, per)
  return schedules.interleaved(mask, k, num_rounds=per, steps_per_visit=1)


def check_flags(width: int) -> tuple[list[int], list[str]]:
  """Parsed --stripes and --schedules; InputError before anything compiles."""
  try:
    stripes = sorted({int(s) for s in FLAGS.stripes})
  except ValueError:
    raise checks.InputError(f"--stripes={','.join(FLAGS.stripes)}; expected integers.") from None
  for k in stripes:
    checks.check_positive_int(k, "--stripes")
  if 1 not in stripes:
    raise checks.InputError("--stripes must include 1 (the parallel schedule every row is "
                            "compared with).")
  kinds = list(dict.fromkeys(FLAGS.schedules))
  for kind in kinds:
    checks.check_choice(kind, SCHEDULES, "--schedules")
  if "progressive" not in kinds:
    raise checks.InputError("--schedules must include progressive (it runs K = 1, the parallel "
                            "baseline).")
  checks.check_positive_int(FLAGS.steps_per_stripe, "--steps_per_stripe")
  checks.check_positive_int(FLAGS.total_steps, "--total_steps")
  checks.check_positive_int(FLAGS.num_images, "--num_images")
  checks.check_positive_int(FLAGS.batch, "--batch")
  checks.check_range(FLAGS.eta, "--eta", 0.0, 1.0)
  groups = checks.check_positive_int(FLAGS.jackknife_groups, "--jackknife_groups")
  if FLAGS.num_images < max(2 * groups, 12):
    raise checks.InputError(f"--num_images={FLAGS.num_images} is too few for PRDC (k = 5) and "
                            f"a {groups}-group jackknife; use at least {max(2 * groups, 12)}.")
  mask = generate.left_half_mask(width, width)
  for k in stripes:                       # a K wider than the hole stops here (stripe_groups)
    schedules.stripe_groups(mask, k)
  return stripes, kinds


def sample_run(gen, params, tau, x, key, batch: int, bar) -> tuple[np.ndarray, float]:
  """Completions [N, H, W, C] of x under tau, `batch` images a call; (samples, seconds)."""
  out, t0 = [], time.time()
  for i in range(0, len(x), batch):
    chunk = x[i:i + batch]
    n = len(chunk)
    if n < batch:                                   # one compilation: pad the ragged batch
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - n, axis=0)])
    out.append(np.asarray(gen(params, tau, key=jax.random.fold_in(key, i), x=chunk,
                              eta=FLAGS.eta))[:n])
    bar.update(1)
  return np.concatenate(out), time.time() - t0


def jackknife(values: np.ndarray) -> float:
  """Delete-a-group jackknife standard error from the G leave-one-group-out values."""
  g = len(values)
  return float(np.sqrt((g - 1) / g * np.sum((values - values.mean()) ** 2)))


def distributional(real_f: np.ndarray, fake_f: np.ndarray, folds) -> dict:
  """Frechet distance and PRDC on all images and on each leave-one-group-out subset.

  Returns {metric: (value, [G] leave-one-group-out values)}.
  """
  def one(idx):
    mu_r, cov_r = metrics.FeatureStats().update(real_f[idx]).mean_cov()
    mu_f, cov_f = metrics.FeatureStats().update(fake_f[idx]).mean_cov()
    out = {"frechet": metrics.frechet_distance(mu_r, cov_r, mu_f, cov_f)}
    out.update(metrics.prdc(real_f[idx], fake_f[idx], k=5))
    return out

  n = len(real_f)
  full = one(np.arange(n))
  loo = [one(np.setdiff1d(np.arange(n), f)) for f in folds]
  return {m: (full[m], np.array([v[m] for v in loo])) for m in DISTRIBUTIONAL}


def score(out, x, real_f, fake_f, folds, lpips_fn) -> dict:
  """Per-image and distributional scores of completions `out` of originals `x` (raw)."""
  per_image = {"psnr": np.asarray(metrics.psnr(out, x)),
               "ssim": np.asarray(metrics.ssim(out, x))}
  if lpips_fn is not None:
    up = lambda z: jax.image.resize(z, (z.shape[0], 64, 64, z.shape[3]), "bilinear")
    per_image["lpips"] = np.concatenate([np.asarray(lpips_fn(up(out[i:i + 50]), up(x[i:i + 50])))
                                         for i in range(0, len(x), 50)])
  return {"per_image": per_image, "distributional": distributional(real_f, fake_f, folds)}


def summarise(raw: dict, base: dict | None, names: dict) -> dict:
  """A table row: means and standard errors, and paired differences to K = 1 (base)."""
  row = {}
  for m in PER_IMAGE:
    v = raw["per_image"].get(m)
    row[m] = None if v is None else float(v.mean())
    row[f"{m}_se"] = None if v is None else float(v.std(ddof=1) / np.sqrt(len(v)))
    if base is not None and v is not None:
      d = v - base["per_image"][m]
      row[f"d_{m}"], row[f"d_{m}_se"] = float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d)))
  for m in DISTRIBUTIONAL:
    value, loo = raw["distributional"][m]
    row[names[m]], row[f"{names[m]}_se"] = float(value), jackknife(loo)
    if base is not None:
      b_value, b_loo = base["distributional"][m]
      row[f"d_{names[m]}"], row[f"d_{names[m]}_se"] = float(value - b_value), jackknife(loo - b_loo)
  return row


def direction(row: dict, key: str) -> str:
  """'up' / 'down' when the paired difference to K = 1 exceeds 2 standard errors, else 'flat'."""
  d, se = row.get(f"d_{key}"), row.get(f"d_{key}_se")
  if d is None:
    return "n/a"
  return "up" if d > 2 * se else "down" if d < -2 * se else "flat"


def verdict(rows: list[dict], names: dict) -> dict:
  """Does the largest K show the paper's split (PSNR, SSIM up; FD up; P, R, D, C down)?"""
  last = rows[-1]
  dirs = {"psnr": direction(last, "psnr"), "ssim": direction(last, "ssim")}
  dirs.update({names[m]: direction(last, names[m]) for m in DISTRIBUTIONAL})
  paper = {"psnr": "up", "ssim": "up", names["frechet"]: "up"}
  paper.update({names[m]: "down" for m in DISTRIBUTIONAL[1:]})
  return {"K": last["K"], "directions": dirs, "paper": paper,
          "pixel_fidelity_up": dirs["psnr"] == "up" and dirs["ssim"] == "up",
          "distributional_worse": (dirs[names["frechet"]] == "up"
                                   and all(dirs[names[m]] == "down" for m in DISTRIBUTIONAL[1:])),
          "agrees_with_paper": all(dirs[k] == v for k, v in paper.items())}


def lab_prediction(stripes) -> dict:
  """Blume-Capel lab: l2 bias of progressive L->R / interleaved / parallel per K hidden blocks.

  Chain of K + 1 blocks, block 0 clamped to +1 (the known half), the paper's couplings;
  T = K T_phase steps, T_int = 20 (Sec. 4.3: every block gets T_phase updates under
  every schedule). float32, so 'machine precision' is ~1e-7 here.
  """
  out = {}
  for k in stripes:
    if k < 2:
      continue
    chain = spin.BlockChain(num_blocks=k + 1, clamped={0: 1.0}, **LAB_CHAIN)
    m_star = np.asarray(spin.bayes_optimal_profile(chain, tol=1e-5))
    m0 = spin.initial_magnetisation(jax.random.key(k), chain, LAB_SEEDS, 0.1)
    row = {}
    for name in ("parallel", "progressive_lr", "interleaved"):
      sched = spin.make_schedule(name, chain, k * LAB_PHASE, interleave_steps=LAB_T_INT)
      m = spin.run_mean_field(m0, chain, sched).m[-1]
      row[name] = float(np.mean(np.asarray(spin.l2_bias(m, m_star))))
    row["m_star_deepest"] = float(m_star[-1])
    out[str(k)] = row
  return out


def fmt(v, se=None, digits=2) -> str:
  if v is None:
    return "-"
  return f"{v:.{digits}f}" if se is None else f"{v:.{digits}f} ± {se:.{digits}f}"


def markdown(result: dict) -> str:
  """The README's tables: one per budget, progressive and interleaved rows per K."""
  names = result["features"]["metric_names"]
  fd, p, r, d, c = (names[m] for m in DISTRIBUTIONAL)
  lab = result.get("lab") or {}
  lines = [f"Schedule study (Growing Images Sec. 2) on {result['settings']['num_images']} "
           f"held-out 32x32 textures, left half known; features `{result['features']['name']}` "
           f"(`{fd}`, never FID); mean ± s.e.; Δ = paired difference to K = 1. "
           f"LPIPS: {'see lpips' if result['settings']['lpips_weights'] else 'no weights (not computed)'}.",
           ""]
  for table in TABLES:
    title = {"per_stripe": f"T = {result['settings']['steps_per_stripe']} steps per stripe "
                           "(the paper's protocol; K T network evaluations)",
             "fixed_total": f"{result['settings']['total_steps']} network evaluations in all "
                            "(T = total // K per stripe)"}[table]
    lines += [f"**{title}**", "",
              "| schedule | K | steps/pixel | NFE | PSNR | ΔPSNR | SSIM | "
              f"{fd} | Δ{fd} | {p} | {r} | {d} | {c} | lab bias |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for kind, rows in result["tables"][table].items():
      for row in rows:
        lab_bias = "-"
        if str(row["K"]) in lab:
          lab_bias = f"{lab[str(row['K'])]['progressive_lr' if kind == 'progressive' else 'interleaved']:.2g}"
        lines.append(
            f"| {kind if row['K'] > 1 else 'parallel'} | {row['K']} | {row['steps_per_pixel']} | "
            f"{row['network_evaluations']} | {fmt(row['psnr'], row['psnr_se'])} | "
            f"{fmt(row.get('d_psnr'), row.get('d_psnr_se'))} | "
            f"{fmt(row['ssim'], row['ssim_se'], 3)} | {fmt(row[fd], row[fd + '_se'], 3)} | "
            f"{fmt(row.get('d_' + fd), row.get('d_' + fd + '_se'), 3)} | "
            f"{fmt(row[p], row[p + '_se'])} | {fmt(row[r], row[r + '_se'])} | "
            f"{fmt(row[d], row[d + '_se'])} | {fmt(row[c], row[c + '_se'])} | {lab_bias} |")
    lines.append("")
  ref = result["reference"]
  lines += [f"Real vs real (images {ref['images']}): {fd} {ref[fd]:.3f}, {p} {ref[p]:.2f}, "
            f"{r} {ref[r]:.2f}, {d} {ref[d]:.2f}, {c} {ref[c]:.2f}.", ""]
  for table in TABLES:
    for kind, v in result["verdict"][table].items():
      lines.append(f"- {table}, {kind}, K = {v['K']} vs 1: " + ", ".join(
          f"{k} {s}" for k, s in v["directions"].items()) +
          f" (paper: PSNR/SSIM up, {fd} up, P/R/D/C down; agrees: {v['agrees_with_paper']}).")
  lines += ["", f"Command: `{result['command']}`; wall time {result['wall_seconds'] / 60:.1f} min "
            f"(sampling {result['sampling_seconds'] / 60:.1f} min).", ""]
  return "\n".join(lines)


def plot_metrics(path, result):
  """Fig. 1 (right) for this model: each metric vs K, both schedules, both budgets."""
  names = result["features"]["metric_names"]
  keys = ["psnr", "ssim"] + [names[m] for m in DISTRIBUTIONAL]
  fig, axes = plt.subplots(len(TABLES), len(keys), figsize=(2.6 * len(keys), 2.6 * len(TABLES)),
                           squeeze=False)
  colours = {"progressive": "tab:red", "interleaved": "tab:green"}
  for i, table in enumerate(TABLES):
    parallel = result["tables"][table]["progressive"][0]
    for j, key in enumerate(keys):
      ax = axes[i, j]
      for kind, rows in result["tables"][table].items():
        rows = rows if kind == "progressive" else [parallel] + rows
        ax.errorbar([r["K"] for r in rows], [r[key] for r in rows],
                    yerr=[r[f"{key}_se"] for r in rows], marker="o", ms=3, capsize=2,
                    color=colours[kind], label=kind)
      ax.set_title(f"{key} ({table})", fontsize=8)
      ax.set_xlabel("K stripes", fontsize=8)
      ax.tick_params(labelsize=7)
  axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv):
  del argv
  tiny = FLAGS.tiny
  if tiny and not FLAGS["workdir"].present:
    FLAGS.workdir = os.path.join(os.path.dirname(os.path.abspath(FLAGS.out)), "tiny_model")
  config = common.textures_pixel_config(FLAGS.train_steps, FLAGS.train_batch, tiny)
  size = config.data.options.get("image_size", 32) if "options" in config.data else 32
  stripes, kinds = check_flags(size)
  for kind in FLAGS.fixed_total_schedules:
    checks.check_choice(kind, kinds, "--fixed_total_schedules")
  if "progressive" not in FLAGS.fixed_total_schedules:
    raise checks.InputError("--fixed_total_schedules must include progressive (K = 1, the "
                            "parallel baseline).")
  runs = study_runs(stripes, kinds, FLAGS.steps_per_stripe, FLAGS.total_steps,
                    FLAGS.fixed_total_schedules)

  train_seconds = common.train_or_resume(config, FLAGS.workdir)
  run = common.load_run(FLAGS.workdir)
  params = run.params
  gen = generate.Generator(run.model)
  h, w, c = run.pixel_shape
  mask = generate.left_half_mask(h, w)

  data = run.config.data
  test = datasets.get_dataset(data.dataset, "test", **dict(data.options))
  n = FLAGS.num_images
  if 2 * n > len(test):
    raise checks.InputError(f"--num_images={n}: the test split has {len(test)} crops; the "
                            "real-vs-real reference needs 2 x num_images.")
  x = np.stack([np.asarray(test[i]["image"], np.float32) for i in range(n)])
  x_ref = np.stack([np.asarray(test[i]["image"], np.float32) for i in range(n, 2 * n)])

  key = jax.random.key(FLAGS.seed)
  extractor, feat_accuracy = feature_nets.in_project(            # `textures`: never FID
      data.dataset, jax.random.fold_in(key, 1), FLAGS.feature_steps, dict(data.options))
  names = feature_nets.metric_names(extractor.name)
  names = {"frechet": names["frechet"], **{m: names[m] for m in DISTRIBUTIONAL[1:]}}
  lpips_fn = None
  if FLAGS.lpips_weights:
    from asyncpatch_jax.evaluation import lpips  # pylint: disable=g-import-not-at-top
    lpips_fn = lpips.load(FLAGS.lpips_weights)
  real_f = feature_nets.extract(extractor, x)
  folds = np.array_split(np.random.default_rng(FLAGS.seed).permutation(n), FLAGS.jackknife_groups)

  cache = FLAGS.cache or os.path.join(FLAGS.workdir, "schedule_study")
  os.makedirs(cache, exist_ok=True)
  # Image i's samples depend on (model, eta, seed, batch) but not on num_images: a cache of
  # more images serves a smaller study.
  tag = hashlib.sha1(json.dumps([run.step, FLAGS.eta, FLAGS.seed, FLAGS.batch,
                                 tiny]).encode()).hexdigest()[:10]
  sample_key = jax.random.fold_in(key, 2)                        # shared by every schedule
  distinct = {}                                                  # (kind, K, T) -> runs
  for (table, kind, k), per in runs.items():
    distinct.setdefault((kind, k, per), []).append(table)
  raw, samples, seconds, evals = {}, {}, {}, {}
  batches = -(-n // FLAGS.batch)
  with progress.bar(len(distinct) * batches, "schedules", enabled=FLAGS.progress,
                    unit="batch") as bar:
    for (kind, k, per), tables in distinct.items():
      tau = build_schedule(mask, kind, k, per)
      counts = schedules.steps_per_pixel(tau)[mask == 0]
      evals[kind, k, per] = {"steps_per_pixel": int(counts.min()),
                             "steps_per_pixel_max": int(counts.max()),
                             "network_evaluations": int(tau.shape[0] - 1)}
      path = os.path.join(cache, f"{kind}_K{k}_T{per}_{tag}.npz")
      cached = np.load(path) if os.path.exists(path) else None
      if cached is not None and len(cached["samples"]) >= n:
        out = cached["samples"][:n]
        dt = float(cached["seconds"]) * n / len(cached["samples"])
        bar.update(batches)
      else:
        out, dt = sample_run(gen, params, tau, x, sample_key, FLAGS.batch, bar)
        np.savez(path + ".tmp.npz", samples=out, seconds=dt)
        os.replace(path + ".tmp.npz", path)
      samples[kind, k, per], seconds[kind, k, per] = out, dt
      if np.abs(np.where(mask[None, ..., None] > 0, out - x, 0.0)).max() != 0.0:
        raise RuntimeError(f"{kind} K={k}: a known pixel changed.")
      raw[kind, k, per] = score(out, x, real_f, feature_nets.extract(extractor, out), folds,
                                lpips_fn)

  tables, verdicts = {}, {}
  for table in TABLES:
    tables[table], verdicts[table] = {}, {}
    base = raw["progressive", 1, runs[table, "progressive", 1]]
    for kind in kinds:
      rows = []
      for k in stripes:
        if (table, kind, k) not in runs:
          continue
        per = runs[table, kind, k]
        row = {"K": k, "steps_per_stripe": per, **evals[kind, k, per],
               "seconds": seconds[kind, k, per], "seconds_per_image": seconds[kind, k, per] / n}
        row.update(summarise(raw[kind, k, per], None if k == 1 else base, names))
        rows.append(row)
      if not rows:
        continue
      tables[table][kind] = rows
      verdicts[table][kind] = verdict(rows, names)

  ref_f = feature_nets.extract(extractor, x_ref)
  reference = {m2: float(v[0]) for m2, v in
               ((names[m], distributional(real_f, ref_f, [])[m]) for m in DISTRIBUTIONAL)}
  reference["images"] = f"0-{n - 1} vs {n}-{2 * n - 1}"
  lab = lab_prediction(stripes) if FLAGS.lab and "interleaved" in kinds else {}

  out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
  os.makedirs(out_dir, exist_ok=True)
  show = slice(0, min(FLAGS.num_show, n))
  masked = np.where(mask[None, ..., None] > 0, x[show], -1.0)
  for table in TABLES:
    rows = [masked]
    for kind in kinds:
      rows += [samples[kind, k, runs[table, kind, k]][show] for k in stripes
               if (table, kind, k) in runs]
    rows.append(x[show])
    image_io.save_grid(np.concatenate(rows), os.path.join(out_dir, f"examples_{table}.png"),
                       ncols=len(masked), scale=3)
  sampling_seconds = float(sum(seconds.values()))
  result = {
      "settings": {"num_images": n, "stripes": stripes, "schedules": kinds,
                   "steps_per_stripe": FLAGS.steps_per_stripe, "total_steps": FLAGS.total_steps,
                   "interleaved": "R = T rounds, T_int = 1 step a visit", "eta": FLAGS.eta,
                   "mask": "left half known", "seed": FLAGS.seed, "batch": FLAGS.batch,
                   "lpips_weights": FLAGS.lpips_weights or None,
                   "jackknife_groups": FLAGS.jackknife_groups, "tiny": tiny,
                   "device": jax.default_backend()},
      "model": {"workdir": FLAGS.workdir, "parameters": run.num_params, "step": run.step,
                "batch_size": int(run.config.train.batch_size),
                "train_seconds_this_run": train_seconds,
                "trained_here": train_seconds > 0},
      "features": {"name": extractor.name, "metric_names": names,
                   "held_out_accuracy": feat_accuracy, "training_steps": FLAGS.feature_steps},
      "tables": tables, "verdict": verdicts, "reference": reference, "lab": lab,
      "lab_settings": {**LAB_CHAIN, "clamped": "block 0 = +1", "t_phase": LAB_PHASE,
                       "t_int": LAB_T_INT, "seeds": LAB_SEEDS, "dtype": "float32"},
      "command": common.command(),
      "sampling_seconds": sampling_seconds, "wall_seconds": common.elapsed(),
  }
  plot_metrics(os.path.join(out_dir, "metrics_vs_K.png"), result)
  common.write_json(FLAGS.out, result)
  md = markdown(result)
  common.write_table(FLAGS.out, md)


if __name__ == "__main__":
  common.run(main)
