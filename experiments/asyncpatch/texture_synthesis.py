"""AsyncPatch Sec. 5.4 (Fig. 5-6, App. J) with this project's model: texture synthesis with input guidance.

  python -m experiments.asyncpatch.texture_synthesis \
      --out=results/texture_synthesis/texture_synthesis.json
  python -m experiments.asyncpatch.texture_synthesis --image=my_texture.png   # a user exemplar

The top half of each exemplar is given, the bottom half is generated (AsyncPatch Eq. 4,
`--num_steps` steps, eta 0.25) with input guidance (Eq. 8; diffusion/guidance.py through
generate.Generator: the given half is re-noised to t_g = `--guidance_t` and the score
is pushed away from that prediction) of weight w in `--weights`, `--seeds` seeds each,
the same seeds for every w. Exemplars: `--per_image` held-out crops ('test' split, rows
never seen in training) of each source image of the embedded textures, and any
`--image` files (centre-cropped to the model's size; smaller images are refused).

Statistics of the generated half against the exemplar's held-out bottom half
(evaluation/texture_stats.py, where the choice is argued):
  patch_swd   sliced Wasserstein distance of the 4x4 patch distributions (texture);
  colour_w1   Wasserstein-1 distance of the per-channel colour histograms;
  seam_ratio  jump across the boundary row / the generated rows' own row-to-row change
              (about 1: no visible seam; the real image's value is the reference);
  seed_spread RMS difference between the seeds' bottom halves (diversity).
References: the real top half against the real bottom half (how far the texture itself
drifts between the halves), and the generated half against the bottom half of an
exemplar of another source image (what "a different texture" scores). Means over
exemplars (seeds averaged first) with standard errors over exemplars; differences to
w = 0 are paired (the same seeds). An ablation reruns w = `--ablate_w` with the other
t_g in `--ablate_t`. Writes the JSON, a Markdown table and PNG grids next to `--out`;
samples are cached in `--cache` (a rerun only rescores). `--tiny`: a tiny model and few
exemplars, seeds and steps (the tests' run; flags given on the command line win).
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
from asyncpatch_jax.data import datasets  # noqa: E402
from asyncpatch_jax.data import image_io  # noqa: E402
from asyncpatch_jax.diffusion import schedules  # noqa: E402
from asyncpatch_jax.evaluation import texture_stats  # noqa: E402
from asyncpatch_jax.runtime import progress  # noqa: E402
from experiments import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", "results/texture_synthesis/texture_synthesis.json", "Output JSON path.")
flags.DEFINE_string("workdir", "workdirs/textures_pixel",
                    "The model's workdir (schedule_study.py's model); trained there "
                    "(or resumed) if needed (--tiny: <dir of --out>/tiny_model unless given).")
flags.DEFINE_integer("train_steps", 1500, "Training steps of the model (if trained here).")
flags.DEFINE_integer("train_batch", 16, "Training batch size of the model (if trained here).")
flags.DEFINE_list("weights", ["0", "1", "2", "4"], "Input guidance weights w >= 0.")
flags.DEFINE_integer("seeds", 3, "Seeds per exemplar and weight.")
flags.DEFINE_integer("per_image", 3, "Held-out exemplars per source image of the textures.")
flags.DEFINE_multi_string("image", [], "User exemplar image files (PNG/JPEG, at least the "
                          "model's size; centre-cropped to it). Repeatable.")
flags.DEFINE_integer("num_steps", 50, "Sampler steps.")
flags.DEFINE_float("eta", 0.25, "Sampler eta (AsyncPatch: 0.25).")
flags.DEFINE_float("guidance_t", 0.6, "t_g: noise level the guidance region is re-noised to.")
flags.DEFINE_list("ablate_t", ["0.3", "0.9"], "Other t_g values run at w = --ablate_w.")
flags.DEFINE_float("ablate_w", 2.0, "Guidance weight of the t_g ablation (0: no ablation).")
flags.DEFINE_string("cache", "", "Folder of the cached samples; '' = <workdir>/texture_synthesis.")
flags.DEFINE_integer("patch", 4, "Patch size of patch_swd.")
flags.DEFINE_integer("directions", 128, "Random directions of patch_swd.")
flags.DEFINE_integer("seed", 0, "Root seed.")
flags.DEFINE_bool("progress", True, "Progress bars.")
common.define_tiny(dict(out="results/tmp/texture_synthesis_tiny/texture_synthesis.json",
                        train_steps=2, train_batch=8, weights=["0", "2"], seeds=2, per_image=1,
                        num_steps=3, directions=16, ablate_t=["0.9"]),
                   "A tiny model and few exemplars (the test suite's run).")

STATS = ("patch_swd", "colour_w1", "seam_ratio", "seam_l1", "seed_spread")


def parse_weights(values) -> list[float]:
  """--weights as floats; a negative weight is refused (Eq. 8 needs w >= 0)."""
  out = []
  for v in values:
    try:
      w = float(v)
    except ValueError:
      raise checks.InputError(f"--weights: {v!r} is not a number.") from None
    out.append(checks.check_range(w, "input guidance weight w", 0.0, hint=(
        "Input guidance (AsyncPatch Eq. 8) pushes the prediction away from the one at the "
        "noisier input with w >= 0; w = 0 is unguided.")))
  if 0.0 not in out:
    raise checks.InputError("--weights must include 0 (the unguided completion every weight is "
                            "compared with).")
  return sorted(set(out))


def load_user_image(path: str, size: int) -> np.ndarray:
  """A user exemplar as float32 [size, size, 3] in [-1, 1]: the centre crop of the file.

  InputError when the image is smaller than the model's size (it cannot be cropped to it).
  """
  img = np.asarray(image_io.open_image(path, "exemplar image").convert("RGB"))
  h, w = img.shape[:2]
  if h < size or w < size:
    raise checks.InputError(f"exemplar image {path!r} is {w}x{h} (WxH), smaller than the "
                            f"model's {size}x{size}; give an image of at least {size}x{size} "
                            "pixels (it is centre-cropped to the model's size).")
  top, left = (h - size) // 2, (w - size) // 2
  return image_io.from_uint8(img[top:top + size, left:left + size])


def held_out_exemplars(config, per_image: int) -> tuple[np.ndarray, list[str], np.ndarray]:
  """The first `per_image` 'test' crops of every source image: (images, names, source ids)."""
  test = datasets.get_dataset(config.data.dataset, "test", **dict(config.data.options))
  want = {k: per_image for k in range(test.num_classes)}
  images, names, labels = [], [], []
  for i in range(len(test)):
    if not any(want.values()):
      break
    ex = test[i]
    k = int(ex["label"])
    if want[k]:
      want[k] -= 1
      images.append(np.asarray(ex["image"], np.float32))
      names.append(f"{test.images[k]}#{per_image - want[k] - 1}")
      labels.append(k)
  order = np.argsort(labels, kind="stable")
  return (np.stack(images)[order], [names[i] for i in order], np.asarray(labels)[order])


def mean_se(v: np.ndarray) -> tuple[float, float]:
  v = np.asarray(v, np.float64)
  return float(v.mean()), float(v.std(ddof=1) / np.sqrt(len(v))) if len(v) > 1 else 0.0


def statistics(gen_bottom, true_bottom, full, row, key) -> dict[str, np.ndarray]:
  """Per-sample statistics [E] of generated bottoms [E, h, W, C] against the true ones."""
  return {"patch_swd": np.asarray(texture_stats.patch_swd(
              gen_bottom, true_bottom, size=FLAGS.patch, num_directions=FLAGS.directions,
              key=key)),
          "colour_w1": np.asarray(texture_stats.colour_w1(gen_bottom, true_bottom)),
          **{k: np.asarray(v) for k, v in texture_stats.seam(full, row).items()
             if k in ("seam_l1", "seam_ratio")}}


def fmt(v, se=None, digits=3) -> str:
  return f"{v:.{digits}f}" if se is None else f"{v:.{digits}f} ± {se:.{digits}f}"


def markdown(result: dict) -> str:
  s = result["settings"]
  lines = [f"Texture synthesis (AsyncPatch Sec. 5.4): top half given, bottom half generated "
           f"({s['num_steps']} steps, eta {s['eta']}, t_g = {s['guidance_t']}); "
           f"{result['num_exemplars']} held-out exemplars x {s['seeds']} seeds; mean ± s.e. "
           "over exemplars, Δ = paired difference to w = 0 (lower patch_swd / colour_w1 = "
           "closer to the exemplar's held-out bottom half).", "",
           "| w | t_g | patch_swd | Δ patch_swd | colour_w1 | Δ colour_w1 | seam_l1 | Δ seam_l1 | "
           "seam_ratio | seed_spread |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  rows = [(r, s["guidance_t"]) for r in result["weights"]]
  rows += [(r, r["guidance_t"]) for r in result["guidance_t_ablation"]
           if r["guidance_t"] != s["guidance_t"]]
  for row, t_g in rows:
    lines.append(
        f"| {row['w']:g} | {t_g:g} | {fmt(row['patch_swd'], row['patch_swd_se'])} | "
        f"{fmt(row['d_patch_swd'], row['d_patch_swd_se'])} | "
        f"{fmt(row['colour_w1'], row['colour_w1_se'])} | "
        f"{fmt(row['d_colour_w1'], row['d_colour_w1_se'])} | "
        f"{fmt(row['seam_l1'], row['seam_l1_se'])} | "
        f"{fmt(row['d_seam_l1'], row['d_seam_l1_se'])} | "
        f"{fmt(row['seam_ratio'], row['seam_ratio_se'], 2)} | "
        f"{fmt(row['seed_spread'], row['seed_spread_se'])} |")
  ref = result["reference"]
  lines += ["", f"References: real top vs real bottom half patch_swd "
            f"{fmt(ref['top_vs_bottom_patch_swd'], ref['top_vs_bottom_patch_swd_se'])}, "
            f"colour_w1 {fmt(ref['top_vs_bottom_colour_w1'], ref['top_vs_bottom_colour_w1_se'])}; "
            f"unguided completion vs another source image's bottom half patch_swd "
            f"{fmt(ref['other_texture_patch_swd'], ref['other_texture_patch_swd_se'])}; "
            f"seam_l1 / seam_ratio of the real images "
            f"{fmt(ref['real_seam_l1'], ref['real_seam_l1_se'])} / "
            f"{fmt(ref['real_seam_ratio'], ref['real_seam_ratio_se'], 2)}.", ""]
  if result["per_source"]:
    ws = [f"{r['w']:g}" for r in result["weights"]]
    lines += ["patch_swd per source image (mean over its exemplars and seeds):", "",
              "| source | " + " | ".join(f"w = {w}" for w in ws) + " |",
              "|---|" + "---|" * len(ws)]
    for name, vals in result["per_source"].items():
      lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in vals) + " |")
    lines.append("")
  for u in result["user_images"]:
    lines.append(f"User image {u['path']}: patch_swd by w " + ", ".join(
        f"{w:g}: {v:.3f}" for w, v in zip(u["weights"], u["patch_swd"])) + ".")
  lines += [f"Command: `{result['command']}`; wall time {result['wall_seconds'] / 60:.1f} min "
            f"(sampling {result['sampling_seconds'] / 60:.1f} min).", ""]
  return "\n".join(lines)


def save_grid(path, x, mask, samples, weights, seeds, rows):
  """Per exemplar one row: given half, every (w, seed) completion, the original."""
  masked = np.where(mask[None, ..., None] > 0, x[rows], -1.0)
  cols = [masked] + [samples[w][s][rows] for w in weights for s in range(seeds)] + [x[rows]]
  grid = np.stack(cols, axis=1).reshape(-1, *x.shape[1:])        # row-major: exemplar rows
  image_io.save_grid(grid, path, ncols=len(cols), scale=3)


def plot(path, result):
  """Each statistic against w (mean ± s.e.), patch_swd per source image, real-image references."""
  keys = ("patch_swd", "colour_w1", "seam_l1", "seam_ratio")
  fig, axes = plt.subplots(1, len(keys), figsize=(14, 3.2))
  w = [r["w"] for r in result["weights"]]
  ref = result["reference"]
  for ax, key in zip(axes, keys):
    ax.errorbar(w, [r[key] for r in result["weights"]], yerr=[r[f"{key}_se"] for r in
                result["weights"]], marker="o", capsize=3, color="k", label="mean ± s.e.")
    if key == "patch_swd":
      for name, vals in result["per_source"].items():
        ax.plot(w, vals, lw=0.8, alpha=0.6, label=name.split("#")[0])
    line = {"patch_swd": "top_vs_bottom_patch_swd", "colour_w1": "top_vs_bottom_colour_w1",
            "seam_l1": "real_seam_l1", "seam_ratio": "real_seam_ratio"}[key]
    ax.axhline(ref[line], color="0.5", ls=":", label="real image")
    ax.set_xlabel("input guidance w")
    ax.set_title(key)
    ax.legend(fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv):
  del argv
  tiny = FLAGS.tiny
  if tiny and not FLAGS["workdir"].present:
    FLAGS.workdir = os.path.join(os.path.dirname(os.path.abspath(FLAGS.out)), "tiny_model")
  weights = parse_weights(FLAGS.weights)
  for name in ("seeds", "per_image", "num_steps", "patch", "directions"):
    checks.check_positive_int(getattr(FLAGS, name), f"--{name}")
  checks.check_range(FLAGS.eta, "--eta", 0.0, 1.0)
  checks.check_range(FLAGS.guidance_t, "--guidance_t", 0.0, 1.0, low_open=True)
  checks.check_range(FLAGS.ablate_w, "--ablate_w", 0.0)
  try:
    ablate_t = [float(v) for v in FLAGS.ablate_t]
  except ValueError:
    raise checks.InputError(f"--ablate_t={','.join(FLAGS.ablate_t)}; expected numbers.") from None
  for t_g in ablate_t:
    checks.check_range(t_g, "--ablate_t", 0.0, 1.0, low_open=True)
  config = common.textures_pixel_config(FLAGS.train_steps, FLAGS.train_batch, tiny)
  size = int(dict(config.data.options).get("image_size", 32))
  user = [load_user_image(p, size) for p in FLAGS.image]       # refused before any training

  train_seconds = common.train_or_resume(config, FLAGS.workdir)
  run = common.load_run(FLAGS.workdir)
  h, w, c = run.pixel_shape
  gen = generate.Generator(run.model)

  x, names, labels = held_out_exemplars(run.config, FLAGS.per_image)
  num_held_out = len(x)
  if user:
    x = np.concatenate([x, np.stack(user)])
  row = h // 2                                                   # first generated row
  mask = np.zeros((h, w), np.float32)
  mask[:row] = 1.0                                               # top half given
  tau = schedules.inpainting(mask, FLAGS.num_steps)
  key = jax.random.key(FLAGS.seed)
  stat_key = jax.random.fold_in(key, 7)

  # Samples are cached per (model, settings, exemplars, w, t_g, seed): a rerun only rescores.
  cache = FLAGS.cache or os.path.join(FLAGS.workdir, "texture_synthesis")
  os.makedirs(cache, exist_ok=True)
  tag = hashlib.sha1(json.dumps([run.step, FLAGS.num_steps, FLAGS.eta, FLAGS.seed,
                                 tiny]).encode() + x.tobytes()).hexdigest()[:10]
  t_sample = 0.0

  def complete(wt: float, t_g: float, s: int, bar) -> np.ndarray:
    nonlocal t_sample
    path = os.path.join(cache, f"{tag}_w{wt:g}_t{t_g:g}_s{s}.npy")
    if os.path.exists(path):
      out = np.load(path)
    else:
      t0 = time.time()
      out = np.asarray(gen(run.params, tau, key=jax.random.fold_in(key, s), x=x,
                           eta=FLAGS.eta, input_guidance=wt, input_guidance_t=t_g))
      t_sample += time.time() - t0
      np.save(path + ".tmp.npy", out)
      os.replace(path + ".tmp.npy", path)
    if np.abs(out[:, :row] - x[:, :row]).max() != 0.0:
      raise RuntimeError("a given pixel changed.")
    bar.update(1)
    return out

  ablate = [t_g for t_g in ablate_t if t_g != FLAGS.guidance_t] if FLAGS.ablate_w > 0 else []
  with progress.bar((len(weights) + len(ablate)) * FLAGS.seeds, "texture synthesis",
                    enabled=FLAGS.progress, unit="call") as bar:
    samples = {wt: [complete(wt, FLAGS.guidance_t, s, bar) for s in range(FLAGS.seeds)]
               for wt in weights}
    ablation_samples = {t_g: [complete(FLAGS.ablate_w, t_g, s, bar) for s in range(FLAGS.seeds)]
                        for t_g in ablate}

  true_bottom = x[:, row:]

  def aggregate(outs) -> dict[str, np.ndarray]:
    """{stat: [E]}: seed means; seed_spread = mean RMS difference between two seeds."""
    per = [statistics(o[:, row:], true_bottom, o, row, stat_key) for o in outs]
    a = {k: np.mean([p[k] for p in per], axis=0) for k in STATS if k != "seed_spread"}
    bottoms = np.stack([o[:, row:] for o in outs])               # [S, E, h, W, C]
    pairs = [(i, j) for i in range(len(bottoms)) for j in range(i + 1, len(bottoms))]
    a["seed_spread"] = (np.mean([np.sqrt(np.mean((bottoms[i] - bottoms[j]) ** 2,
                                                  axis=(1, 2, 3))) for i, j in pairs],
                                axis=0) if pairs else np.zeros(len(x)))
    return a

  held = slice(0, num_held_out)
  agg = {wt: aggregate(samples[wt]) for wt in weights}

  def row_of(a: dict, **fields) -> dict:
    r = dict(fields)
    for k in STATS:
      r[k], r[f"{k}_se"] = mean_se(a[k][held])
      r[f"d_{k}"], r[f"d_{k}_se"] = mean_se(a[k][held] - agg[0.0][k][held])
    return r

  rows_out = [row_of(agg[wt], w=wt) for wt in weights]
  ablation = [row_of(aggregate(ablation_samples[t_g]), w=FLAGS.ablate_w, guidance_t=t_g)
              for t_g in ablate]
  if ablate and FLAGS.ablate_w in agg:
    ablation.append(row_of(agg[FLAGS.ablate_w], w=FLAGS.ablate_w, guidance_t=FLAGS.guidance_t))
  ablation.sort(key=lambda r: r["guidance_t"])

  # References on the held-out exemplars.
  top_vs_bottom = statistics(x[held, :row], true_bottom[held], x[held], row, stat_key)
  other = np.roll(np.arange(num_held_out), FLAGS.per_image)     # an exemplar of another source
  other_swd = np.mean([np.asarray(texture_stats.patch_swd(
      o[held, row:], true_bottom[held][other], size=FLAGS.patch,
      num_directions=FLAGS.directions, key=stat_key)) for o in samples[0.0]], axis=0)
  reference = {}
  for k, v in (("top_vs_bottom_patch_swd", top_vs_bottom["patch_swd"]),
               ("top_vs_bottom_colour_w1", top_vs_bottom["colour_w1"]),
               ("real_seam_ratio", top_vs_bottom["seam_ratio"]),
               ("real_seam_l1", top_vs_bottom["seam_l1"]),
               ("other_texture_patch_swd", other_swd)):
    reference[k], reference[f"{k}_se"] = mean_se(v)

  per_source = {}
  src_names = [n.split("#")[0] for n in names]
  for k in sorted(set(labels.tolist())):
    sel = np.flatnonzero(labels == k)
    per_source[src_names[sel[0]]] = [float(agg[wt]["patch_swd"][sel].mean()) for wt in weights]
  users = [{"path": p, "weights": weights,
            "patch_swd": [float(agg[wt]["patch_swd"][num_held_out + i]) for wt in weights],
            "colour_w1": [float(agg[wt]["colour_w1"][num_held_out + i]) for wt in weights],
            "seam_ratio": [float(agg[wt]["seam_ratio"][num_held_out + i]) for wt in weights]}
           for i, p in enumerate(FLAGS.image)]

  out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
  os.makedirs(out_dir, exist_ok=True)
  first = [int(np.flatnonzero(labels == k)[0]) for k in sorted(set(labels.tolist()))]
  save_grid(os.path.join(out_dir, "grid_textures.png"), x, mask, samples, weights, FLAGS.seeds,
            first)
  if users:
    save_grid(os.path.join(out_dir, "grid_user.png"), x, mask, samples, weights, FLAGS.seeds,
              list(range(num_held_out, len(x))))
  result = {
      "settings": {"weights": weights, "seeds": FLAGS.seeds, "per_image": FLAGS.per_image,
                   "num_steps": FLAGS.num_steps, "eta": FLAGS.eta,
                   "guidance_t": FLAGS.guidance_t, "patch": FLAGS.patch,
                   "directions": FLAGS.directions, "given": "top half", "seed": FLAGS.seed,
                   "network_evaluations": {"w = 0": FLAGS.num_steps,
                                           "w > 0": 2 * FLAGS.num_steps},
                   "tiny": tiny, "device": jax.default_backend()},
      "model": {"workdir": FLAGS.workdir, "step": run.step, "parameters": run.num_params,
                "train_seconds_this_run": train_seconds},
      "num_exemplars": num_held_out, "exemplars": names,
      "weights": rows_out, "guidance_t_ablation": ablation, "reference": reference,
      "per_source": per_source,
      "user_images": users,
      "command": common.command(),
      "sampling_seconds": t_sample, "wall_seconds": common.elapsed(),
  }
  plot(os.path.join(out_dir, "statistics_vs_w.png"), result)
  common.write_json(FLAGS.out, result)
  md = markdown(result)
  common.write_table(FLAGS.out, md)


if __name__ == "__main__":
  common.run(main)
