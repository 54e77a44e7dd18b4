"""The result tables of experiments/<group>/README.md state what the stored results hold.

Each table is rendered here from its JSON in results/ (the rounding the README uses) and
must appear in the group's README verbatim, so a number copied by hand, or rounded twice
(from a .md table that itself rounds), fails this test. Reads JSON only: no runs.
`python tests/test_experiment_results.py` prints the tables.
"""

import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _result(path):
  with open(os.path.join(ROOT, "results", path)) as f:
    return json.load(f)


def _table(head, rows):
  """A Markdown table: the header cells, then the rows (lists of cells)."""
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)


def _pm(v, se, digits=3):
  return f"{v:.{digits}f} ± {se:.{digits}f}"


# ----------------------------------------------------------------------------- asyncpatch

FAMILIES = ("thin", "wide", "square", "extrema")


def timestep_statistics():
  r = _result("timesteps/timestep_statistics.json")["samplers"]
  return _table(["sampler", "mean of per-image means", "std of per-image means",
                 "mean spread (max t - min t)"],
                [[k, f"{v['mean_of_means']:.3f}", f"{v['std_of_means']:.3f}",
                  f"{v['mean_spread']:.3f}"] for k, v in r.items()])


def _mse(v, digits):
  """mean ± s.e. over seeds."""
  return f"{v['mean']:.{digits}f} ± {v['sem']:.{digits}f}"


def _diff(d, verdict, digits):
  """A difference, its 95% interval and the verdict the rule gives."""
  return (f"{d['estimate']:+.{digits}f} [{d['low']:+.{digits}f}, {d['high']:+.{digits}f}] "
          f"{verdict}")


def sampler_ablation():
  r = _result("evaluation/sampler_ablation.json")["table"]
  rows = []
  for name, m in r.items():
    gen = ([_mse(m[f"generation {k}"], d) for k, d in (("fd", 1), ("precision", 3),
                                                        ("recall", 3))]
           if "generation fd" in m else ["—"] * 3)
    rows.append([name, *gen] + [f"{_mse(m[f'{f} psnr'], 1)} / {_mse(m[f'{f} fd'], 1)}"
                                for f in FAMILIES])
  return _table(["row", "generation fd_digits", "precision", "recall",
                 "thin PSNR / fd_digits", "wide", "square", "extrema"], rows)


def sampler_ablation_verdicts():
  tab = _result("evaluation/sampler_ablation.json")["table"]
  cols = ["generation fd"] + [f"{f} {k}" for f in FAMILIES for k in ("psnr", "fd")]
  rows = []
  for name, m in tab.items():
    if "verdict" not in m[f"{FAMILIES[0]} psnr"]:
      continue                                     # the reference row
    rows.append([f"{name} - asyncpatch"] + [
        _diff(m[c]["minus_reference"], m[c]["verdict"], 1) if c in m else "—" for c in cols])
  return _table(["row - reference", "generation fd_digits"] + [
      f"{f} {'PSNR' if k == 'psnr' else 'fd_digits'}" for f in FAMILIES for k in ("psnr", "fd")],
                rows)


def _method(table, model, spec):
  """A method's name, with its steps or RePaint schedule from the JSON."""
  m = table[model][spec]
  name = spec.split("@")[0]
  if name == "repaint":
    return "RePaint " + "/".join(str(v) for v in m["repaint"])
  return {"asyncpatch": f"AsyncPatch Eq. 4, {m['network_evals']} steps",
          "progressive": "progressive, 4 stripes",
          "asyncpatch_input_guidance": "+ input guidance (w = 1)"}[name]


def inpainting_benchmark():
  r = _result("evaluation/inpainting.json")["table"]
  rows = []
  for model, methods in r.items():
    for spec, m in methods.items():
      rows.append([model, _method(r, model, spec), m["network_evals"],
                   f"{m['flops_per_image'] / 1e9:.1f}", f"{m['seconds_per_image']:.4f}"]
                  + [f"{_mse(m[f]['psnr'], 1)} / {_mse(m[f]['fd'], 1)}" for f in FAMILIES])
  return _table(["model", "method", "network evals", "GFLOP / image", "s / image",
                 "thin PSNR / fd_digits", "wide", "square", "extrema"], rows)


def inpainting_comparisons():
  r = _result("evaluation/inpainting.json")
  side = lambda text: f"{text.split(':')[0]} model, {_method(r['table'], *text.split(':'))}"
  rows = []
  for c in r["comparisons"]:
    for k in ("psnr", "fd"):
      rows.append([f"{side(c['a'])} - {side(c['b'])}", c["interval_over_seeds"],
                   "PSNR" if k == "psnr" else "fd_digits"]
                  + [_diff(c["families"][f][k]["a_minus_b"], c["families"][f][k]["verdict_for_a"],
                           1) for f in FAMILIES])
  return _table(["A - B", "interval over seeds", "metric", *FAMILIES], rows)


def latent_textures():
  r = _result("latent/latent_textures.json")["inpainting"]
  rows = []
  for fam, v in r.items():
    cells = [f"{fam.replace('_', ' ')} ({v['hidden_fraction']:.2f})",
             f"{v['known_token_fraction']:.2f} / {v['known_token_fraction_cell_only']:.2f}"]
    for k in ("pixel", "latent", "latent_cell_only_token_mask"):
      cells.append(f"{v[k]['psnr']:.1f} / {v[k]['psnr_hidden']:.1f}")
    rows.append(cells)
  return _table(["mask (hidden share)", "tokens known: exact / cell only", "pixel UNet",
                 "latent, exact token mask", "latent, cell-only token mask"], rows)


def latent_autoencoder():
  r = _result("latent/latent_textures.json")["autoencoder"]
  fams = r["families"]
  return _table(["mask", "PSNR of the known pixels", "leak, cell and halo known",
                 "leak, cell known, halo not"],
                [[f.replace("_", " "), f"{v['psnr_masked_known']:.1f}",
                  f"{v['leak_max_abs']:.1f}", f"{v['leak_boundary_max_abs']:.2f}"]
                 for f, v in fams.items()])


def texture_synthesis():
  r = _result("texture_synthesis/texture_synthesis.json")
  t_g = r["settings"]["guidance_t"]
  rows = [(w, t_g) for w in r["weights"]]
  rows += [(w, w["guidance_t"]) for w in r["guidance_t_ablation"] if w["guidance_t"] != t_g]
  out = []
  for w, t in rows:
    out.append([f"{w['w']:g}", f"{t:g}", _pm(w["patch_swd"], w["patch_swd_se"]),
                _pm(w["d_patch_swd"], w["d_patch_swd_se"]),
                _pm(w["colour_w1"], w["colour_w1_se"]),
                _pm(w["d_colour_w1"], w["d_colour_w1_se"]),
                _pm(w["seam_l1"], w["seam_l1_se"]), _pm(w["d_seam_l1"], w["d_seam_l1_se"]),
                _pm(w["seam_ratio"], w["seam_ratio_se"], 2),
                _pm(w["seed_spread"], w["seed_spread_se"])])
  return _table(["w", "t_g", "patch_swd", "Δ patch_swd", "colour_w1", "Δ colour_w1", "seam_l1",
                 "Δ seam_l1", "seam_ratio", "seed_spread"], out)


def texture_synthesis_verdicts():
  """The paired differences against w = 0 over the 21 exemplars with their 95% t intervals
  (mean +- t(0.975, n - 1) s.e., the JSON's paired mean and s.e.) and the rule's verdict."""
  from scipy import stats  # pylint: disable=g-import-not-at-top
  r = _result("texture_synthesis/texture_synthesis.json")
  t = stats.t.ppf(0.975, r["num_exemplars"] - 1)
  t_g = r["settings"]["guidance_t"]
  runs = [(w, t_g) for w in r["weights"] if w["w"] != 0]
  runs += [(w, w["guidance_t"]) for w in r["guidance_t_ablation"] if w["guidance_t"] != t_g]
  out = []
  for w, tg in runs:
    cells = []
    for k in ("patch_swd", "colour_w1", "seam_l1"):
      d, se = w[f"d_{k}"], w[f"d_{k}_se"]
      low, high = d - t * se, d + t * se
      verdict = "within noise" if low <= 0 <= high else ("worse" if low > 0 else "better")
      cells.append(f"{d:+.3f} [{low:+.3f}, {high:+.3f}] {verdict}")
    out.append([f"{w['w']:g}", f"{tg:g}", *cells])
  return _table(["w", "t_g", "Δ patch_swd, 95% interval, verdict", "Δ colour_w1",
                 "Δ seam_l1"], out)


def adaptive_sampling():
  r = _result("adaptive/adaptive_sampling.json")["rows"]
  return _table(["schedule", "budget", "network evaluations", "mean steps / pixel", "fd_digits",
                 "precision", "recall", "density", "coverage", "confident"],
                [[x["schedule"], x["budget"], x["network_evaluations"],
                  f"{x['mean_steps_per_pixel']:.1f}", f"{x['fd_digits']:.2f}",
                  f"{x['precision_digits']:.3f}", f"{x['recall_digits']:.3f}",
                  f"{x['density_digits']:.3f}", f"{x['coverage_digits']:.3f}",
                  f"{x['confident_fraction']:.3f}"] for x in r])


# ----------------------------------------------------------------------------- pifs

PIFS_CHAINS = {"linear": "linear", "cosine_s0": "cosine s = 0",
               "cosine_s0.008": "cosine s = 0.008",
               "ddim50_cosine_s0": "DDIM-50 {0, 20, ..., 1000}, cosine s = 0"}


def pifs_table1():
  r = _result("pifs/pifs_tables.json")
  rows = []
  for key, name in PIFS_CHAINS.items():
    v, p = r["table1"][key], r["paper"]["table1"][key]
    rows.append([name, f"{v['mean']:.4f}", f"{v['cv']:.4f}",
                 f"{v['finest']:.5f} ({v['finest_t']})", f"{p[0]:.3f} / {p[1]:.3f} / {p[2]:.5f}"])
  return _table(["chain", "mean", "CV", "L* at finest step (t)", "paper"], rows)


def jacobian_table4():
  models = ("trained", "empirical", "gaussian", "unet_random")
  results = {m: _result(f"jacobian/regimes_{m}.json") for m in models}
  steps = list(results["trained"]["table4"])
  return _table(["model"] + [f"t = {t}" for t in steps] + ["cumulative per seed"],
                [[m] + [f"{r['table4'][t][0]:.3f}" for t in steps]
                 + [" / ".join(f"{c:.3g}" for c in r["summary"]["cumulative_global_norm_per_seed"])]
                 for m, r in results.items()])


# ----------------------------------------------------------------------------- growing images


def blume_capel():
  r = _result("blume_capel/blume_capel.json")
  many = r["plateau_bias_many_seeds"]
  b, b2 = r["bias"], r["bias_two_boundary"]
  return _table(["quantity", "paper", "this repo (24 seeds)", "4096-seed mean"], [
      ["m* at the far block", "~ 0.36", f"{r['m_star'][-1]:.4f}", "-"],
      ["bias (l2 norm of m(T) - m*), parallel / interleaved", "machine precision",
       f"{b['parallel']:.1e} / {b['interleaved']:.1e}", "-"],
      ["bias, progressive L->R / R->L", "~ 1.0 / ~ 1.4",
       f"{b['progressive_lr']:.3f} / {b['progressive_rl']:.3f}",
       f"{many['single/progressive_lr']['mean']:.3f} / "
       f"{many['single/progressive_rl']['mean']:.3f}"],
      ["same at T = 4.2e5 (one sweep)", "plateaus persist",
       "identical" if r["bias_long"] == b else "differs", "-"],
      ["two boundaries (+1/-1, abs(H) = 6, T_phase = 3500), L->R / R->L", "~ 0.84 both",
       f"{b2['progressive_lr']:.3f} / {b2['progressive_rl']:.3f}",
       f"{many['two_boundary/progressive_lr']['mean']:.3f} / "
       f"{many['two_boundary/progressive_rl']['mean']:.3f}"]])


def _schedule_table(table):
  r = _result("schedule_study/schedule_study.json")
  names = r["features"]["metric_names"]
  fd, p, rc, d, c = (names[k] for k in ("frechet", "precision", "recall", "density", "coverage"))

  def fmt(v, se, digits=2):
    return "-" if v is None else _pm(v, se, digits)

  rows = []
  for kind, kind_rows in r["tables"][table].items():
    for x in kind_rows:
      lab = r["lab"].get(str(x["K"]))
      bias = "-" if lab is None else (
          f"{lab['progressive_lr' if kind == 'progressive' else 'interleaved']:.2g}")
      rows.append([kind if x["K"] > 1 else "parallel", x["K"], x["steps_per_pixel"],
                   x["network_evaluations"], fmt(x["psnr"], x["psnr_se"]),
                   fmt(x.get("d_psnr"), x.get("d_psnr_se")), fmt(x["ssim"], x["ssim_se"], 3),
                   fmt(x[fd], x[fd + "_se"], 3), fmt(x.get("d_" + fd), x.get(f"d_{fd}_se"), 3),
                   fmt(x[p], x[p + "_se"]), fmt(x[rc], x[rc + "_se"]), fmt(x[d], x[d + "_se"]),
                   fmt(x[c], x[c + "_se"]), bias])
  return _table(["schedule", "K", "steps/pixel", "NFE", "PSNR", "ΔPSNR", "SSIM", fd, f"Δ{fd}",
                 p, rc, d, c, "lab bias"], rows)


def schedule_study_per_stripe():
  return _schedule_table("per_stripe")


def schedule_study_fixed_total():
  return _schedule_table("fixed_total")


# ----------------------------------------------------------------------------- ipr


def ipr_digits():
  r = _result("ipr/ipr_digits.json")
  u = r["unconditional_confident_fraction"]
  return _table(["", "confident fraction"], [
      ["autoregressive x^(0)", f"{u[0]:.3f}"],
      [f"IPR rounds 1-{len(u) - 1} (min / mean / max)",
       f"{min(u[1:]):.3f} / {np.mean(u[1:]):.3f} / {max(u[1:]):.3f}"],
      [f"IPR round {len(u) - 1}", f"{u[-1]:.3f}"],
      ["synchronous schedule, same model",
       f"{r['synchronous']['unconditional_confident_fraction']:.3f}"]])


def _pct(v):
  return f"{100 * v:.1f}"


def ipr_sudoku():
  r = _result("ipr/ipr_sudoku.json")
  shown = (0, 1, 5, 10, 20, 30, 40, 50)
  rows = [[name] + [_pct(src["validity"][k]) + (f" ± {_pct(src['stderr'][k])}"
                                                  if k in (0, 50) else "") for k in shown]
          for name, src in (("HARD", r["hard"]), ("HARD, SRM order", r["srm_order"]["hard"]))]
  rows += [[f"K = {k}"] + [_pct(v["validity"][i]) for i in shown]
           for k, v in r["corrupted"].items()]
  return _table(["IPR round"] + [str(k) for k in shown], rows)


def ipr_sudoku_ablations():
  r = _result("ipr/ipr_sudoku.json")
  shown = (0, 10, 20, 30, 40, 50)
  return _table(["IPR round"] + [str(k) for k in shown],
                [[name.replace("alpha_", "alpha = ").replace("_", " ")]
                 + [_pct(v["validity"][i]) for i in shown]
                 for name, v in r["ablations"].items()])


def ipr_sudoku_ablation_verdicts():
  r = _result("ipr/ipr_sudoku.json")
  last = r["rounds"][-1]
  rows = [[name.replace("alpha_", "alpha = ").replace("_", " "),
           f"{100 * d['estimate']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]",
           d["verdict"]]
          for name, v in r["ablations"].items() if (d := v.get("last_minus_main"))]
  return _table(["ablation", f"round {last} validity - alpha = {r['settings']['alpha']}'s, "
                 "paired 95% (points)", "verdict"], rows)


def _ipr_orders(path: str, metric: str):
  """The paired intervals (over samples, in points) of what the rounds did in each order and
  of SRM order - raster, with their verdicts."""
  res = _result(path)
  gain, vs = res["ipr_gain"][metric], res["srm_order"]["comparison"][metric]
  last = res["rounds"][-1]
  rows = [(f"round {last} - x^(0), raster", gain["raster"]),
          (f"round {last} - x^(0), SRM order", gain["uncertainty"]),
          ("SRM order - raster, x^(0)", vs["x0"]),
          (f"SRM order - raster, round {last}", vs["last"])]
  return _table([f"{metric.replace('_', ' ')}, paired 95% interval (points)", "difference",
                 "verdict"],
                [[name, f"{100 * d['estimate']:+.1f} [{100 * d['low']:+.1f}, "
                        f"{100 * d['high']:+.1f}]", d["verdict"]] for name, d in rows])


def ipr_sudoku_orders():
  return _ipr_orders("ipr/ipr_sudoku.json", "validity")


def ipr_polygons():
  r = _result("ipr/ipr_polygons.json")
  srm, shown = r["srm_order"], (0, 1, 5, 10, 20, 30, 40, 50)
  rows = []
  for name, key, fmt in (("count accuracy %", "count_accuracy", _pct),
                         ("mean abs(count - label)", "mean_count_error", lambda v: f"{v:.2f}"),
                         ("vertex uniformity %", "vertex_uniformity", _pct)):
    for order, src in (("raster", r), ("SRM order", srm)):
      rows.append([f"{name}, {order}"] + [fmt(src[key][k]) for k in shown])
  return _table(["IPR round"] + [str(k) for k in shown], rows)


def ipr_polygons_orders():
  res = _result("ipr/ipr_polygons.json")
  r = res["srm_order"]["comparison"]["count_accuracy"]
  return _table(["count accuracy, SRM order - raster (points)", "x^(0)",
                 f"round {res['rounds'][-1]}"], [
      ["paired 95% interval over the samples"]
      + [f"{100 * d['estimate']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
         for d in (r["x0"], r["last"])],
      ["verdict"] + [r["x0"]["verdict"], r["last"]["verdict"]]])


def ipr_even_pixels():
  r = _result("ipr/ipr_even_pixels.json")
  shown = (0, 1, 5, 10, 20, 30, 50)
  d, srm = r["data"], r["srm_order"]
  se = r["balance_accuracy_stderr"]
  rows = []
  for name, key, fmt in (("balance accuracy % (benchmark code)", "balance_accuracy", _pct),
                         ("mean pixel-count error", "mean_count_error", lambda v: f"{v:.1f}"),
                         ("saturation std", "saturation_std", lambda v: f"{v:.3f}"),
                         ("value std", "value_std", lambda v: f"{v:.3f}")):
    for order, src in (("raster", r), ("SRM order", srm)):
      rows.append([f"{name}, {order}"]
                  + [fmt(src[key][k]) + (f" ± {_pct(se[k])}" if key == "balance_accuracy"
                                         and src is r and k == 0 else "") for k in shown]
                  + [f"{(100 if key == 'balance_accuracy' else 1) * d[key]:g}"])
  return _table(["IPR round"] + [str(k) for k in shown] + ["data"], rows)


def ipr_even_pixels_orders():
  return _ipr_orders("ipr/ipr_even_pixels.json", "balance_accuracy")


# ----------------------------------------------------------------------------- benchmarks


def bench_model():
  r = _result("bench/bench_model.json")
  sizes = {"default": "16x16x1", "imagenet64_60m": "64x64x3"}
  return _table(["config", "params", "FLOPs per-pixel / per-image",
                 "CPU time per-pixel / per-image", "sampler steps/s (batch 8)"],
                [[f"{k} ({sizes[k]})", f"{v['params']:,}",
                  f"{r['per_pixel_over_per_image_flops'][k]:.2f}",
                  f"{r['per_pixel_over_per_image_time'][k]:.2f}",
                  f"{v['sampler_steps_per_s']:.3g}"] for k, v in r["details"].items()])


def bench_train():
  r = _result("bench/bench_train.json")["results"]
  return _table(["config / compute dtype", "batch", "s / step", "images / s", "GFLOP / step",
                 "achieved TFLOP/s", "MFU (vs measured CPU peak)"],
                [[k, v["batch"], f"{v['step_seconds']:.2f}", f"{v['images_per_s']:.1f}",
                  f"{v['gflops_per_step']:.0f}", f"{v['achieved_tflops']:.3f}", f"{v['mfu']:.2f}"]
                 for k, v in r.items()])


def bench_peer():
  r = _result("bench/bench_peer.json")["cases"]
  what = {"train_default": "train step, default, batch 64",
          "sample_default": "50-step sampling, default, batch 64",
          "train_60m": "train step, 60M, 64x64, batch 8"}

  def cell(d):
    return f"{d['median_s']:.3g} s ({d['min_s']:.3g}-{d['max_s']:.3g})"
  return _table(["case", "ours", "PyTorch eager, per-image t", "PyTorch eager, per-pixel t",
                 "ours / PyTorch (per-image t)", "ours / PyTorch (per-pixel t)", "ours compile",
                 "load"],
                [[what[k], cell(v["ours"]), cell(v["torch_per_image"]),
                  cell(v["torch_per_pixel"]), f"**{v['ours_over_torch']:.2f}x**",
                  f"{v['ours_over_torch_per_pixel']:.2f}x", f"{v['ours_compile_s']:.0f} s",
                  "-".join(f"{x:.1f}" for x in v["load_average_1min"])] for k, v in r.items()])


def bench_peer_conv():
  r = _result("bench/bench_peer_conv.json")["cases"]
  level = {"default": "default, first level", "imagenet64_60m": "60M, first level"}
  return _table(["one 3x3 conv, forward + both gradients, NHWC", "ours", "PyTorch",
                 "ours / PyTorch", "TFLOP/s ours / PyTorch"],
                [[f"{'x'.join(map(str, v['shape_nhwc']))} ({level[v['config']]})",
                  f"{v['ours']['median_s']:.3g} s", f"{v['torch']['median_s']:.3g} s",
                  f"**{v['ours_over_torch']:.2f}x**",
                  f"{v['ours_tflops']:.3f} / {v['torch_tflops']:.3f}"] for v in r.values()])


def _dit_peer(path):
  r = _result(path)["cases"]

  def what(v):
    if "steps" in v:
      return f"{v['model']} {v['steps']}-step Euler sampling, batch {v['batch']}"
    return f"{v['model']} train step, batch {v['batch']}"

  def cell(d):
    return f"{d['median_s']:.3g} s ({d['min_s']:.3g}-{d['max_s']:.3g})"
  return _table(["case", "ours", "PyTorch eager", "ours / PyTorch", "max abs diff (output scale)",
                 "ours compile", "load"],
                [[what(v), cell(v["ours"]), cell(v["torch"]), f"**{v['ours_over_torch']:.2f}x**",
                  f"{v['max_abs_diff_flax_vs_torch']:.0e} ({v['output_scale']:.2f})",
                  f"{v['ours_compile_s']:.0f} s",
                  "-".join(f"{x:.1f}" for x in v["load_average_1min"])] for v in r.values()])


def dit_peer():
  return _dit_peer("dit/dit_peer.json")


def dit_peer_1core():
  return _dit_peer("dit/dit_peer_1core.json")


def host_devices():
  one = _result("bench/host_devices.json")["cases"]
  more = _result("bench/host_devices_2_4_8.json")["cases"]
  big = _result("bench/host_devices_60m.json")["cases"]["train_60m"]
  core = _result("bench/host_devices_1core.json")["cases"]

  def row(name, case, unit_digits):
    c = one[case]
    base = f"1 ({c['variants']['1']['median_s']:.{unit_digits}f} s)"
    return [name, base, f"{c['speedup_over_1']['2']:.2f}x", f"{c['speedup_over_1']['4']:.2f}x",
            f"{more[case]['speedup_over_2']['8']:.2f}x of 2"]
  return _table(["host devices on 2 cores", "1", "2", "4", "8"], [
      row("train step, default, batch 64", "train_default", 3),
      row("50-step sampling, default, batch 64", "sample_default", 2),
      ["train step, 60M, batch 8", f"1 ({big['variants']['1']['median_s']:.1f} s)",
       f"{big['speedup_over_1']['2']:.2f}x", f"{big['speedup_over_1']['4']:.2f}x", ""],
      ["one core (taskset): train / sampling", "1",
       f"{core['train_default']['speedup_over_1']['2']:.2f}x / "
       f"{core['sample_default']['speedup_over_1']['2']:.2f}x", "", ""]])


def bench_metrics():
  r = _result("evaluation/bench_metrics.json")
  f, fr, pr, inp = r["features"], r["frechet"], r["prdc"], r["inpainting"]
  a50, a250, rp = inp["asyncpatch_50"], inp["asyncpatch_250"], inp["repaint"]
  ratio = inp["repaint_over_asyncpatch"]
  return _table(["quantity", "value"], [
      [f"FID Inception-v3 features, 64x64 inputs resized to 299 (batch {f['feature_batch']})",
       f"{f['inception_images_per_s']:.1f} images/s"],
      [f"LPIPS-AlexNet / LPIPS-VGG, 64x64 pairs (batch {f['feature_batch']})",
       f"{f['lpips_alex_pairs_per_s']:.0f} / {f['lpips_vgg_pairs_per_s']:.1f} pairs/s"],
      ["digit features (the offline default), 16x16 (batch 256)",
       f"{f['digit_features_images_per_s']:,.0f} images/s"],
      [f"Frechet distance of two {fr['dim']}-d statistics, float64 (goal: under 2 s)",
       f"{fr['frechet_seconds']:.2f} s ({fr['frechet_cpu_seconds']:.1f} CPU-s); pytorch-fid's "
       f"`sqrtm` formula {fr['sqrtm_formula_seconds']:.1f} s, relative difference "
       f"{abs(fr['frechet_value'] - fr['sqrtm_formula_value']) / fr['frechet_value']:.0e}"],
      [f"streaming statistics of 10k x {fr['dim']} features (batches of 500)",
       f"{fr['streaming_stats_10k_seconds']:.1f} s"],
      [f"PRDC, {pr['n'] // 1000}k x {pr['n'] // 1000}k x {pr['dim']}, k = 5 "
       f"({pr['block_rows']}-row blocks; the largest array {pr['largest_block_mb']:.0f} MB)",
       f"{pr['prdc_seconds']:.0f} s"],
      [f"inpainting, default digits UNet, batch {inp['batch']}: AsyncPatch 50 / 250 steps",
       f"{a50['network_evals']} / {a250['network_evals']} network evaluations, "
       f"{a50['seconds_per_image']:.3f} / {a250['seconds_per_image']:.2f} s per image"],
      [f"inpainting: RePaint {' / '.join(map(str, rp['params']))}",
       f"{rp['network_evals']} network evaluations ({ratio['network_evals']:.1f}x "
       f"AsyncPatch-250), {rp['seconds_per_image']:.1f} s per image ({ratio['seconds']:.1f}x)"]])


def bench_memory():
  r = _result("dit/memory.json")
  gib, mib = 2 ** 30, 2 ** 20

  def largest(s, key):
    found = s["largest_compiled"][key]
    line = ("≤ " if key in s["below_fitted_batches"] else "") + str(found["line"])
    compiled = str(found["largest"]) if found["exact"] else (
        f"{found['largest']}-{found['smallest_not_fitting'] - 1}")
    return f"{line} / {compiled}"

  rows = []
  for name, m in r["models"].items():
    for fsdp, e in m["fsdp"].items():
      for remat, s in e["remat"].items():
        fit, check = s["fit"], s["check"]
        rows.append([name, fsdp, remat, f"{e['state_bytes_per_device']['total'] / gib:.2f}",
                     f"{fit['a_bytes'] / gib:.2f}", f"{fit['b_bytes_per_example'] / mib:.0f}",
                     f"{check['predicted_peak'] / gib:.1f} / {check['peak'] / gib:.1f}",
                     *(largest(s, f"{g:g}GiB") for g in r["limits_gib"])])
  return _table(["model", "fsdp", "remat", "state (GiB)", "a (GiB)", "b (MiB / example)",
                 f"peak at {r['check_batch']}: line / compiled (GiB)",
                 *(f"largest batch in {g:g} GiB: line / compiled" for g in r["limits_gib"])],
                rows)


def bench_memory_fsdp():
  m = _result("dit/memory.json")["models"]["DiT-XL/2"]
  one, eight = (m["fsdp"][k]["state_bytes_per_device"] for k in ("1", "8"))
  names = {"params": "parameters (float32)", "ema_params": "EMA parameters",
           "opt_state": "Adam state (mu, nu)", "total": "train state"}
  return _table(["DiT-XL/2, per device", "fsdp=1 (GiB)", "fsdp=8 (GiB)", "fsdp=8 / fsdp=1"],
                [[v, f"{one[k] / 2 ** 30:.3f}", f"{eight[k] / 2 ** 30:.3f}",
                  f"{eight[k] / one[k]:.4f}"] for k, v in names.items()])


def dit_vs_unet():
  r = _result("dit/dit_vs_unet_digits.json")
  rows = []
  for name, m in r["table"].items():
    u, d, diff = m["unet"], m["dit"], m["dit_minus_unet"]
    rows.append([name, f"{u['mean']:.4g} ± {u['sem']:.2g}", f"{d['mean']:.4g} ± {d['sem']:.2g}",
                 f"{diff['estimate']:+.3g} [{diff['low']:+.3g}, {diff['high']:+.3g}]",
                 m["verdict_for_dit"]])
  return _table(["metric", "UNet, mean ± s.e. over seeds", "DiT, mean ± s.e.",
                 "DiT - UNet, 95% Welch interval", "verdict for the DiT"], rows)


def latent_table2():
  r = _result("latent/latent_table2.json")
  rows = []
  for c in r["comparisons"]:
    cand, base = c["candidate"], c["baseline"]
    for k, m in c["metrics"].items():
      base_cell, cand_cell, diff, verdict = _seed_row(m, base, cand)
      rows.append([f"{cand} - {base}", k, cand_cell, base_cell, c["interval_over_seeds"],
                   diff, verdict])
  return _table(["comparison", "metric", "candidate, mean ± s.e. over seeds",
                 "baseline, mean ± s.e.", "interval over seeds",
                 "candidate - baseline, 95% interval", "verdict for the candidate"], rows)


def latent_table2_inpainting():
  r = _result("latent/latent_table2.json")
  rows = []
  for c in r["inpainting_comparisons"]:
    cand, base = c["candidate"], c["baseline"]
    for family in r["settings"]["families"]:
      row = [f"{cand} - {base}", family]
      for k in ("psnr", "ssim", "fd_textures"):
        row += _seed_row(c["metrics"][f"{family} {k}"], base, cand)[2:]
      rows.append(row)
  return _table(["comparison", "mask family", "PSNR, candidate - baseline, 95%", "verdict",
                 "SSIM, candidate - baseline, 95%", "verdict",
                 "fd_textures, candidate - baseline, 95%", "verdict"], rows)


def latent_table2_cost():
  r = _result("latent/latent_table2.json")
  rows = []
  for name, c in r["training_cost"].items():
    runs = r["runs"][name].values()
    train = np.mean([x["train_seconds"] for x in runs])
    sample = np.mean([x["generation"]["sampling_seconds"] for x in runs])
    rows.append([name, f"{c['params'] / 1e6:.2f}M", c["batch"], c["steps"], c["train_images"],
                 f"{c['flops_per_step'] / 1e9:.1f}", f"{c['train_flops'] / 1e12:.1f}",
                 f"{train:.0f}", f"{sample:.0f}"])
  return _table(["model", "parameters", "batch", "steps", "training images",
                 "GFLOP a step", "training TFLOP", "training seconds (mean over seeds)",
                 "seconds to sample (mean over seeds)"], rows)


def _seed_row(m, base, cand):
  a, b, diff = m[base], m[cand], m[f"{cand}_minus_{base}"]
  return [f"{a['mean']:.4g} ± {a['sem']:.2g}", f"{b['mean']:.4g} ± {b['sem']:.2g}",
          f"{diff['estimate']:+.3g} [{diff['low']:+.3g}, {diff['high']:+.3g}]",
          m[f"verdict_for_{cand}"]]


def _adaptive_rows(r, first=(), fd="fd_digits"):
  """The paired policy - synchronous rows of an adaptive_sampling.json (the confident share's
  columns where the run has them: the digits)."""
  rows = []
  for c in r["comparison_at_equal_budget"]:
    seeds = c[f"{fd}_per_seed"]
    pol, sync = seeds[c["schedule"]], seeds["synchronous"]
    d = c[f"{fd}_difference"]
    rows.append([*first, c["schedule"], c["budget"], _pm(sync["mean"], sync["sem"], 1),
                 _pm(pol["mean"], pol["sem"], 1),
                 f"{d['estimate']:+.1f} [{d['low']:+.1f}, {d['high']:+.1f}]", c["verdict"]])
    if "confident_difference" in c:
      q = c["confident_difference"]
      rows[-1] += [f"{q['estimate']:+.3f} [{q['low']:+.3f}, {q['high']:+.3f}]",
                   c["confident_verdict"]]
  return rows


def _adaptive_head(r, first=(), fd="fd_digits"):
  n = r["comparison_at_equal_budget"][0]["sampling_seeds"]
  head = [*first, "policy", "budget", f"synchronous {fd}, mean ± s.e. over {n} sampling "
          "seeds", f"policy {fd}", "policy - synchronous, paired 95%", "verdict"]
  if "confident_difference" in r["comparison_at_equal_budget"][0]:
    head += ["confident share, policy - synchronous", "verdict"]
  return head


def dit_adaptive():
  results = {b: _result(f"dit/adaptive_{b}/adaptive_sampling.json") for b in ("unet", "dit")}
  return _table(_adaptive_head(results["unet"], ["backbone"]),
                [row for b, r in results.items() for row in _adaptive_rows(r, [b])])


def dit_adaptive_textures():
  results = {b: _result(f"dit/adaptive_textures_{b}/adaptive_sampling.json")
             for b in ("unet", "dit")}
  return _table(_adaptive_head(results["unet"], ["backbone"], "fd_textures"),
                [row for b, r in results.items()
                 for row in _adaptive_rows(r, [b], "fd_textures")])


def adaptive_1024():
  runs = [_result(f"adaptive/{d}/adaptive_sampling.json")
          for d in ("adaptive_1024x3", "adaptive_1024x3_b32", "adaptive_1024x3_b50")]
  rows = [row for r in runs for row in _adaptive_rows(r)]
  order = list(dict.fromkeys(row[0] for row in rows))      # the policies as the script runs them
  rows.sort(key=lambda row: order.index(row[0]))           # stable: each one's budgets in order
  return _table(_adaptive_head(runs[0]), rows)


def clean_vs_dit():
  r = _result("skip/clean_vs_dit_digits.json")
  return _table(["metric", "DiT, mean ± s.e. over seeds", "clean-context DiT, mean ± s.e.",
                 "clean - DiT, 95% Welch interval", "verdict for the clean-context DiT"],
                [[name, *_seed_row(m, "dit", "dit_clean")] for name, m in r["table"].items()])


def clean_vs_repaint():
  r = _result("skip/clean_vs_dit_digits.json")["repaint_equal_time"]
  rows = []
  for family, f in r.items():
    for metric, m in f["metrics"].items():
      rows.append([family, f"{f['candidate_seconds_per_image'] * 1e3:.1f}",
                   f"{'/'.join(map(str, f['repaint']))} ({f['repaint_network_evals']})",
                   metric, *_seed_row({**m, "dit": m["dit_repaint"],
                                       "dit_clean": m["dit_clean_asyncpatch"],
                                       "dit_clean_minus_dit": m["dit_clean_minus_dit_repaint"]},
                                      "dit", "dit_clean")])
  return _table(["family", "clean DiT, cached, ms / image", "RePaint on the DiT at that "
                 "time: steps/jump/resamples (evaluations)", "metric",
                 "RePaint, mean ± s.e. over seeds", "clean DiT (50 steps)",
                 "clean - RePaint, 95% Welch", "verdict for the clean DiT"], rows)


def skip_cost():
  r = _result("skip/cost_digits.json")
  rows = []
  for x in r["rows"]:
    f, t = x["flops_per_evaluation"], x["seconds_per_sample"]
    setting = {"inpaint": lambda: f"known {x['known_pixel_share']:.2f} of pixels, "
                                  f"{x['known_token_share']:.2f} of tokens",
               "autoregressive": lambda: f"{x['steps_per_stage']} steps a stage",
               "policy": lambda: f"{x['steps_run']} steps run"}[x["kind"]]()
    rows.append([x["row"], setting, f"{f['noisy_token_share']:.3f}",
                 f"{f['cached_over_full']:.3f}", f"{f['active_over_ideal']:.3f}",
                 f"{f['active_over_batch_max_ideal']:.3f}",
                 f"{f['cached_refresh'] / f['full']:.3f} ({f['refreshes']})",
                 f"{t['cached_over_full']:.3f}", f"{x['max_abs_difference']:.1e}"])
  return _table(["row", "setting", "noisy token share", "FLOPs / evaluation: cached / full",
                 "active passes / ideal", "active passes / one capacity for the batch (its "
                 "largest count)", "refreshes / full (per group)", "seconds / sample: cached / full",
                 "largest difference of the samples"], rows)


TABLES = {
    "asyncpatch": [timestep_statistics, sampler_ablation, sampler_ablation_verdicts,
                   inpainting_benchmark, inpainting_comparisons, latent_textures,
                   latent_autoencoder, latent_table2, latent_table2_inpainting,
                   latent_table2_cost, texture_synthesis, texture_synthesis_verdicts,
                   adaptive_sampling, adaptive_1024, dit_vs_unet, dit_adaptive,
                   dit_adaptive_textures, clean_vs_dit,
                   clean_vs_repaint, skip_cost],
    "pifs": [pifs_table1, jacobian_table4],
    "growing_images": [blume_capel, schedule_study_per_stripe, schedule_study_fixed_total],
    "ipr": [ipr_digits, ipr_sudoku, ipr_sudoku_orders, ipr_sudoku_ablations,
            ipr_sudoku_ablation_verdicts, ipr_even_pixels,
            ipr_even_pixels_orders, ipr_polygons,
            ipr_polygons_orders],
    "benchmarks": [bench_model, bench_train, bench_peer, bench_peer_conv, dit_peer,
                   dit_peer_1core, bench_memory, bench_memory_fsdp, host_devices, bench_metrics],
}


@pytest.mark.parametrize("group,render", [(g, r) for g, rs in TABLES.items() for r in rs],
                         ids=[f"{g}-{r.__name__}" for g, rs in TABLES.items() for r in rs])
def test_readme_table_is_the_stored_result(group, render):
  with open(os.path.join(ROOT, "experiments", group, "README.md")) as f:
    text = f.read()
  table = render()
  assert table in text, f"experiments/{group}/README.md lacks (or differs from):\n{table}"


if __name__ == "__main__":
  for group, renders in TABLES.items():
    for render in renders:
      print(f"<!-- {group}: {render.__name__} -->\n{render()}\n")


def test_every_stored_json_is_linked_from_the_documentation():
  """Each results/**/*.json is the target of a Markdown link in README.md, ROADMAP.md, docs/
  or an experiment group's README (a path in a command does not count)."""
  import glob  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  docs = ["README.md", "ROADMAP.md", *glob.glob("docs/*.md", root_dir=ROOT),
          *glob.glob("experiments/*/README.md", root_dir=ROOT)]
  linked = set()
  for doc in docs:
    with open(os.path.join(ROOT, doc)) as f:
      for target in re.findall(r"\]\(([^)#\s]+)", f.read()):
        linked.add(os.path.normpath(os.path.join(os.path.dirname(doc), target)))
  stored = sorted(os.path.relpath(p, ROOT) for p in
                  glob.glob(os.path.join(ROOT, "results", "**", "*.json"), recursive=True))
  assert stored and not [p for p in stored if p not in linked]


# Numbers in a paragraph that names a JSON but do not come from it: (document, number) ->
# where they come from.
QUOTED = {("experiments/benchmarks/README.md", "23.01"): "the DiT paper's Gflops of B/2",
          ("experiments/benchmarks/README.md", "118.64"): "the DiT paper's Gflops of XL/2"}
# The unit after a number that shows a JSON value scaled.
SCALES = {"%": 100.0, "TFLOP": 1e-12, "GFLOP": 1e-9, "MFLOP": 1e-6, "ms": 1e3}


def _numbers(value, out):
  """Every number a JSON value holds (numbers inside strings too, e.g. commands)."""
  import re  # pylint: disable=g-import-not-at-top
  if isinstance(value, dict):
    for v in value.values():
      _numbers(v, out)
  elif isinstance(value, list):
    for v in value:
      _numbers(v, out)
  elif isinstance(value, (int, float)) and not isinstance(value, bool):
    out.append(float(value))
  elif isinstance(value, str):
    out.extend(float(m) for m in re.findall(r"\d+\.?\d*", value))
  return out


def test_prose_numbers_come_from_the_json_their_paragraph_names():
  """In the documentation, a paragraph (outside tables and code) that names a
  results/**/*.json (or the .md table written beside one) may state a decimal number, or a comma-grouped integer (620,257), only as a value
  of that JSON at the paragraph's rounding (a share may be a percentage, FLOPs GFLOP, ...),
  or as a quoted fact listed in QUOTED. Differences and ratios computed by hand are not
  allowed there: the experiment's writer stores them in its JSON."""
  import glob  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  docs = ["README.md", "ROADMAP.md", *glob.glob("docs/*.md", root_dir=ROOT),
          *glob.glob("experiments/*/README.md", root_dir=ROOT)]
  checked, wrong = 0, []
  for doc in docs:
    with open(os.path.join(ROOT, doc)) as f:
      text = re.sub(r"```.*?```", "", f.read(), flags=re.S)
    for para in text.split("\n\n"):
      if para.lstrip().startswith("|"):
        continue
      names = re.findall(r"results/[\w/.\-]+?\.(?:json|md)\b", para)
      values = []
      for name in names:                  # a table .md stands for the JSON it was made from
        path = os.path.join(ROOT, os.path.splitext(name)[0] + ".json")
        if os.path.exists(path):
          with open(path) as f:
            _numbers(json.load(f), values)
      if not values:
        continue
      body = re.sub(r"\[[^\]]*\]\([^)]*\)|`[^`]*`", " ", para)      # links and code
      for match in re.finditer(r"(?<![\w.])(\d+\.\d+|\d{1,3}(?:,\d{3})+(?![\w.]))\s*(%|TFLOP|GFLOP|MFLOP|ms)?",
                               body):
        token, unit = match.groups()
        token = token.replace(",", "")                               # 620,257 -> 620257
        checked += 1
        digits = len(token.split(".")[1]) if "." in token else 0
        if (doc, token) in QUOTED:
          continue
        scale = SCALES.get(unit, 1.0)
        if not any(round(v * scale, digits) == float(token) for v in values):
          wrong.append(f"{doc}: {token} in '{para[:70]}...'")
  assert checked > 50 and not wrong, "\n".join(wrong)
