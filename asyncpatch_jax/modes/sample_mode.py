"""`--mode=sample`: generate, inpaint, outpaint, autoregressive, progressive or interleaved
sampling, or Iterative Partial Refinement (`ipr`), from the latest checkpoint in a workdir
(EMA parameters); writes PNGs, `samples.npz` (every sample, uint8 and float32) and the
settings used to `config.sample.out_dir` (default `<workdir>/samples/<task>`).

Needs only the workdir (a local folder or a gs:// URL): the image shape is read from the
checkpoint, and no dataset is opened. The command line's default config is the
workdir's own `config.json`. `sample.num_images` are generated in batches of
`sample.batch_size` (the last batch padded to the same shape, so one compilation
serves all), batch b with the key fold_in(key, b * batch_size); IPR runs its rounds one
compiled round at a time (round r with fold_in(fold_in(batch key, 1), r)), so the
progress bar moves per round and only the rounds shown in `rounds.png` are kept.

Labels (`sample.label`): `auto` (the default) is `null` (unconditional, no guidance) for
tasks that start from a known image (inpaint, outpaint, progressive, interleaved, ipr
with an image): a class label with guidance would pull the completion away from the
known pixels; the user's class id (e.g. the image's class) is used when given. For the
other tasks `auto` is `cycle` (0, 1, 2, ...).

Tasks with an uncertainty head:

  adaptive  config.uncertainty.policy (uncertainty_accelerated, look_ahead or dual_loop)
            within config.uncertainty.budget steps (0: sample.num_steps) (AsyncPatch
            Sec. 5.5, Patch Forcing);
  ordered   SRM's sequential adaptive order over the sample.grid patches, consecutive
            patches overlapping by uncertainty.overlap;
  ipr       with uncertainty.ipr_order='uncertainty': x^(0) in SRM's order, then every IPR
            round regenerates its regions in SRM's order (the IPR paper's backbone).

The model comes from --workdir (EMA parameters), the head from uncertainty.head_workdir
(refused if it was trained on another model). With sample.image and sample.mask the
white pixels of the mask are given (known) and the rest is generated. Writes samples.png,
steps.png (per-pixel step counts, white = the budget), the first 16 samples, and
settings.json (with the step counts and network evaluations) to sample.out_dir
(default <workdir>/samples/<task>).
"""

from __future__ import annotations

import io
import json

import jax
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.generation import generate
from asyncpatch_jax.runtime import progress as progress_lib
from asyncpatch_jax.data import image_io
from asyncpatch_jax.runtime import storage
from asyncpatch_jax.diffusion import policies
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.runtime import multihost
from asyncpatch_jax.runs import loader

# The tasks of sample.task, each with one line for `--help` (main.py reads this literal from
# the source, so that --help does not load jax).
TASKS = {
    "generate": "new images from noise, every pixel on one synchronous schedule",
    "inpaint": "fill the black pixels of sample.mask in sample.image (AsyncPatch Eq. 4)",
    "outpaint": "grow the canvas around a smaller sample.image placed at sample.box, in "
                "sample.num_stripes bands",
    "autoregressive": "the sample.grid patches one after another in raster order "
                      "(AsyncPatch Sec. 3.2)",
    "progressive": "inpaint in sample.num_stripes stripes from the known boundary inward "
                   "(Growing Images Sec. 2)",
    "interleaved": "progressive's stripes visited round-robin, sample.num_rounds visits each "
                   "(Growing Images Sec. 4.2)",
    "ipr": "Iterative Partial Refinement: sample.ipr_rounds rounds that regenerate the "
           "sample.grid regions (IPR Alg. 1); with sample.image and sample.mask only the unknown "
           "ones",
    "adaptive": "an uncertainty head (uncertainty.head_workdir) paces each pixel by "
                "uncertainty.policy (AsyncPatch Sec. 5.5)",
    "ordered": "the sample.grid patches one at a time, the most certain first by an uncertainty "
               "head (SRM's order)",
}


# Tasks whose samples start from a known image (sample.image): label 'auto' means 'null'.
KNOWN_IMAGE_TASKS = ("inpaint", "outpaint", "progressive", "interleaved")


def label_spec(sc) -> str:
  """The label setting in force: sample.label, with 'auto' resolved for sc.task."""
  spec = str(sc.label)
  if spec != "auto":
    return spec
  known = sc.task in KNOWN_IMAGE_TASKS or (sc.task in ("ipr", "adaptive", "ordered")
                                           and bool(sc.image))
  return "null" if known else "cycle"


def _labels(spec: str, n: int, num_classes: int, known_image: bool = False):
  """Labels [n] (or None = unconditional) for 'cycle', 'null', a class id, or 'auto'
  ('null' when the task starts from a known image, else 'cycle')."""
  if spec == "auto":
    spec = "null" if known_image else "cycle"
  if not num_classes:
    if spec not in ("cycle", "null"):
      raise checks.InputError(f"sample.label={spec!r} given for an unconditional model.")
    return None
  if spec == "cycle":
    return np.arange(n) % num_classes
  if spec == "null":
    return None
  try:
    label = int(spec)
  except ValueError:
    raise checks.InputError(f"sample.label={spec!r}; expected 'auto', 'cycle', 'null' or a class "
                            "id.") from None
  if not 0 <= label < num_classes:
    raise checks.InputError(f"sample.label={label} is not a class id in 0..{num_classes - 1}.")
  return np.full((n,), label)


def _schedule_and_input(sc, shape):
  """(tau, x, mask) for the task, from the PNG inputs named in the config."""
  h, w, c = shape
  steps = checks.check_positive_int(sc.num_steps, "sample.num_steps")
  grid = tuple(sc.grid) if isinstance(sc.grid, (tuple, list)) else (sc.grid,)
  if len(grid) != 2 or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0
                               for g in grid):
    raise checks.InputError(f"sample.grid={sc.grid!r}; expected (rows, cols) of positive "
                            "integers, e.g. --config.sample.grid='(2,2)'.")
  checks.check_positive_int(sc.num_stripes, "sample.num_stripes")
  checks.check_positive_int(sc.num_rounds, "sample.num_rounds")
  if sc.task == "generate":
    return schedules.synchronous(steps, h, w), None, None
  if sc.task == "autoregressive" or (sc.task == "ipr" and not sc.image):
    rows, cols = sc.grid
    return schedules.autoregressive(h, w, (rows, cols), max(steps // (rows * cols), 1)), None, None
  if not sc.image:
    raise checks.InputError(f"sample.task={sc.task!r} needs --config.sample.image=<PNG>.")
  if sc.task == "outpaint":
    iw, ih = image_io.open_image(sc.image).size
    if ih > h or iw > w:
      raise checks.InputError(f"image {sc.image!r} is {iw}x{ih}; outpainting needs an image smaller "
                       f"than the model's {w}x{h} canvas.")
    top, left = tuple(sc.box) if sc.box else ((h - ih) // 2, (w - iw) // 2)
    small = image_io.load_image(sc.image, (ih, iw, c))
    bands = sc.num_stripes if steps % sc.num_stripes == 0 else 1
    tau, mask = schedules.outpainting(h, w, (top, left, ih, iw), steps, bands)
    x = np.full((h, w, c), -1.0, np.float32)
    x[top:top + ih, left:left + iw] = small
    return tau, x, mask
  x = image_io.load_image(sc.image, shape)
  if not sc.mask:
    raise checks.InputError(f"sample.task={sc.task!r} needs --config.sample.mask=<PNG> "
                     "(white = known, black = generate).")
  mask = image_io.load_mask(sc.mask, (h, w))
  if sc.task in ("inpaint", "ipr"):
    return schedules.inpainting(mask, steps), x, mask
  if sc.task == "progressive":
    return schedules.progressive(mask, sc.num_stripes, max(steps // sc.num_stripes, 1)), x, mask
  per_visit = max(steps // (sc.num_stripes * sc.num_rounds), 1)
  return schedules.interleaved(mask, sc.num_stripes, sc.num_rounds, per_visit), x, mask


def _check_ipr(sc) -> None:
  if not 0.0 < sc.ipr_alpha <= 1.0 or sc.ipr_rounds < 1:
    raise checks.InputError(f"sample.ipr_alpha={sc.ipr_alpha}, sample.ipr_rounds={sc.ipr_rounds}; "
                            "expected alpha in (0, 1] and a positive number of rounds.")


def sample_from_workdir(config, workdir: str) -> dict:
  """Runs config.sample.task from the workdir's latest checkpoint; returns the settings."""
  if "autoencoder" in config:
    raise checks.InputError("an autoencoder workdir has nothing to sample; a latent diffusion "
                            "config names it in --config.latent.autoencoder_workdir.")
  sc = config.sample
  checks.check_choice(sc.task, tuple(TASKS), "sample.task")
  if "uncertainty" in config and uses_head(config):
    # Tasks with an uncertainty head and schedule policies (AsyncPatch Sec. 5.5, SRM).
    return _sample_with_head(config, workdir)
  workdir = storage.check_bucket(workdir, "workdir")
  setup = loader.open_run(workdir, config)
  # A latent workdir's codec runs the pixel task on tokens (generate.Generator.task).
  gen = generate.Generator(setup.model, codec=setup.codec,
                           clean_cache=sc.get("clean_cache", False))
  # Bad inputs fail here, before restoring or compiling anything.
  n = checks.check_positive_int(sc.num_images, "sample.num_images")
  bs = checks.check_positive_int(sc.batch_size, "sample.batch_size")
  tau, x, mask = _schedule_and_input(sc, setup.pixel_shape)
  task = gen.task(tau, x, mask, image_shape=setup.pixel_shape)
  spec = label_spec(sc)
  labels = _labels(spec, n, setup.model.num_classes)
  if sc.task == "ipr":
    _check_ipr(sc)
    regions, condition = gen.ipr_regions(sc.grid, task.known, task.shape)
  # The call's outputs replace the folder's as one unit (storage.replaced_folder), in a
  # temporary folder beside it: its parent must be writable.
  out_dir = storage.path(sc.out_dir or workdir / "samples" / sc.task, "sample.out_dir")
  storage.check_replaceable(out_dir, "sample.out_dir")
  setup = loader.load_run(workdir, config, run=setup)
  key = jax.random.key(config.seed)
  guidance = sc.guidance if labels is not None else 0.0
  b = min(n, bs)                     # every call has this batch (the last one padded)
  starts = list(range(0, n, b))
  rounds = sc.ipr_rounds if sc.task == "ipr" else 0
  shown = sorted({0, rounds // 4, rounds // 2, rounds})
  outs, history = [], {}
  with progress_lib.bar(len(starts) * (1 + rounds), f"sample {sc.task}",
                        enabled=bool(config.train.progress_bar), unit="call") as bar:
    for start in starts:
      k = jax.random.fold_in(key, start)
      ys = None if labels is None else np.resize(labels[start:start + b], (b,))
      out = gen(setup.params, task.tau, key=k, **gen.inputs(task, b), labels=ys,
                guidance_weight=guidance, eta=sc.eta,
                input_guidance=sc.input_guidance if x is not None else 0.0,
                input_guidance_t=sc.input_guidance_t)
      bar.update(1)
      for r in range(1, rounds + 1):
        if start == 0 and r - 1 in shown:
          history[r - 1] = np.asarray(out[:min(n, 8)])
        out = gen.refine(setup.params, out, key=jax.random.fold_in(jax.random.fold_in(k, 1), r),
                         regions=regions, num_rounds=1, alpha=sc.ipr_alpha,
                         num_steps=sc.num_steps, condition=condition, labels=ys,
                         guidance_weight=guidance, eta=sc.eta)
        bar.update(1)
      out = np.asarray(out)
      if start == 0 and rounds:
        history[rounds] = out[:min(n, 8)]
      outs.append(out[:n - start])
  out = gen.decode(np.concatenate(outs), task)     # a latent model's tokens decoded
  extra, grids = {}, {}
  if sc.task == "ipr":
    # Rows: the first 8 samples at rounds 0 (sequential inference), ~R/4, ~R/2, R.
    rows = np.stack([gen.decode(history[r], task) for r in shown])
    grids["rounds.png"] = (rows.reshape(-1, *rows.shape[2:]), rows.shape[1])
    extra = {"ipr_rounds": sc.ipr_rounds, "ipr_alpha": sc.ipr_alpha, "regions_grid": list(sc.grid),
             "condition_regions": np.flatnonzero(condition).tolist(), "rounds_shown": shown,
             "rounds_grid": str(out_dir / "rounds.png")}
  grid_path = str(out_dir / "samples.png")
  npz_path = str(out_dir / "samples.npz")
  settings = {"task": sc.task, "step": setup.step, "num_images": n,
              "batch_size": b, "steps": int(task.tau.shape[0] - 1), "eta": sc.eta,
              "guidance": guidance, "input_guidance": sc.input_guidance,
              "label": spec if str(sc.label) == spec else f"{spec} (sample.label={sc.label})",
              "image": sc.image, "mask": sc.mask, "grid": grid_path, "npz": npz_path,
              "out_dir": str(out_dir), **extra}
  arrays = {"samples_uint8": image_io.to_uint8(out), "samples": out.astype(np.float32)}
  if labels is not None:
    arrays["labels"] = np.asarray(labels, np.int32)
  _write_outputs(out_dir, out, settings, grids=grids, mask=mask, arrays=arrays)
  return settings


def _write_outputs(out_dir, out, settings, *, grids=None, mask=None, arrays=None) -> None:
  """Process 0 replaces `out_dir` with the call's files as one unit: the extra grids
  ({name: (images [N, H, W, C], columns or None)}), samples.png, the first 16 samples,
  mask.png, samples.npz (`arrays`) and settings.json (last)."""
  if not multihost.is_writer():
    return
  with storage.replaced_folder(out_dir, "sample.out_dir") as folder:
    for name, (images, ncols) in (grids or {}).items():
      image_io.write_grid(images, folder.file(name), ncols=ncols)
    image_io.write_grid(out, folder.file("samples.png"))
    for i in range(min(len(out), 16)):
      image_io.save_png(image_io.to_uint8(out[i]), folder.file(f"sample_{i:03d}.png"))
    if mask is not None:
      image_io.save_png((mask[..., None] * 255).astype(np.uint8), folder.file("mask.png"))
    if arrays is not None:
      buf = io.BytesIO()
      np.savez_compressed(buf, **arrays)
      storage.write_bytes_atomic(folder.file("samples.npz"), buf.getvalue())
    storage.write_text_atomic(folder.file("settings.json"), json.dumps(settings, indent=2))


# ---- tasks with an uncertainty head (AsyncPatch Sec. 5.5, SRM) -------------------------

HEAD_TASKS = ("adaptive", "ordered")
ADAPTIVE_POLICIES = ("uncertainty_accelerated", "look_ahead", "dual_loop")
IPR_ORDERS = ("raster", "uncertainty")


def uses_head(config) -> bool:
  """Whether --mode=sample's task samples with an uncertainty head."""
  return config.sample.task in HEAD_TASKS or (config.sample.task == "ipr" and
                                         config.uncertainty.ipr_order != "raster")


def policy_from_config(config) -> policies.Policy:
  """The schedule policy of `config.sample.task` from `config.uncertainty`."""
  u, sc = config.uncertainty, config.sample
  if sc.task in ("ordered", "ipr"):
    grid = tuple(u.grid) or tuple(sc.grid)
    return policies.uncertainty_ordered(grid, u.overlap)
  checks.check_choice(u.policy, ADAPTIVE_POLICIES, "uncertainty.policy")
  grid = tuple(u.grid) or None
  if u.policy == "uncertainty_accelerated":
    return policies.uncertainty_accelerated(u.speedup, grid)
  if u.policy == "look_ahead":
    return policies.look_ahead(u.look_ahead, u.quantile, grid)
  return policies.dual_loop(u.sub_steps, u.quantile, grid)


def _steps_image(steps: np.ndarray, budget: int) -> np.ndarray:
  """Step counts [N, H, W] as images in [-1, 1] (0 steps black, the budget white)."""
  return (2.0 * steps / budget - 1.0)[..., None].astype(np.float32)


def _sample_with_head(config, workdir: str) -> dict:
  """Runs a task with an uncertainty head (see the module docstring); returns the settings."""
  sc, u = config.sample, config.uncertainty
  checks.check_choice(u.ipr_order, IPR_ORDERS, "uncertainty.ipr_order")
  if not uses_head(config):
    raise checks.InputError(f"sample.task={sc.task!r} with uncertainty.ipr_order="
                            f"{u.ipr_order!r} does not sample with an uncertainty head.")
  if not u.head_workdir:
    raise checks.InputError(f"sample.task={sc.task!r} needs an uncertainty head: train one "
                            "(configs/uncertainty_digits.py) and pass "
                            "--config.uncertainty.head_workdir=<its workdir>.")
  budget = checks.check_positive_int(u.budget or sc.num_steps, "uncertainty.budget")
  policy = policy_from_config(config)
  if sc.task == "ipr":
    _check_ipr(sc)
  setup = loader.load_run(workdir, config)
  shape = setup.image_shape
  h, w, _ = shape
  x = mask = None
  if sc.image or sc.mask:
    if not (sc.image and sc.mask):
      raise checks.InputError("give both sample.image and sample.mask (white = known) to "
                              "condition on an image, or neither.")
    x = image_io.load_image(sc.image, shape)
    mask = image_io.load_mask(sc.mask, (h, w))
  trained_head = loader.load_head(u.head_workdir, setup)
  head, head_params = trained_head.module, trained_head.params
  gen = generate.Generator(setup.model, head=head,
                           clean_cache=config.sample.get("clean_cache", False))
  if sc.task == "ipr":
    regions, condition = gen.ipr_regions(sc.grid, mask, shape)
  n = sc.num_images
  labels = _labels(str(sc.label), n, setup.model.num_classes,
                               known_image=x is not None)
  out_dir = storage.path(sc.out_dir or storage.path(workdir) / "samples" / sc.task,
                         "sample.out_dir")
  storage.check_replaceable(out_dir, "sample.out_dir")
  key = jax.random.key(config.seed)
  guide = dict(labels=labels, guidance_weight=sc.guidance if labels is not None else 0.0,
               eta=sc.eta)
  xs = None if x is None else np.broadcast_to(x, (n, *shape))
  result = gen(setup.params, policy, key=key, x=xs,
               shape=None if x is not None else (n, *shape), budget=budget, known=mask,
               head_params=head_params, debug=bool(u.debug), **guide)
  out = np.asarray(result.samples)
  steps = np.asarray(result.steps)
  evaluations = np.asarray(result.evaluations)
  extra = {}
  if sc.task == "ipr":
    out, history, _ = gen.refine(
        setup.params, out, key=jax.random.fold_in(key, 1), regions=regions,
        num_rounds=sc.ipr_rounds, alpha=sc.ipr_alpha, num_steps=budget,
        condition=condition, return_history=True,
        policy=policies.uncertainty_ordered(None, u.overlap), head_params=head_params,
        **guide)
    out = np.asarray(out)
    shown = sorted({0, sc.ipr_rounds // 4, sc.ipr_rounds // 2, sc.ipr_rounds})
    rows = np.asarray(history)[shown, :min(n, 8)]
    rounds_path = str(out_dir / "rounds.png")
    extra = {"ipr_rounds": sc.ipr_rounds, "ipr_alpha": sc.ipr_alpha,
             "regions_grid": list(sc.grid), "rounds_shown": shown, "rounds_grid": rounds_path,
             "condition_regions": np.flatnonzero(condition).tolist()}
  grid_path, steps_path = str(out_dir / "samples.png"), str(out_dir / "steps.png")
  settings = {
      "task": sc.task, "step": setup.step, "num_images": n,
      "policy": policy.name, "policy_params": policy.params,
      "policy_grid": None if policy.regions is None else list(policy.regions),
      "budget": budget, "eta": sc.eta, "guidance": sc.guidance, "label": str(sc.label),
      "image": sc.image, "mask": sc.mask, "head_workdir": u.head_workdir,
      "mean_steps_per_pixel": float(steps[:, (mask if mask is not None else
                                              np.zeros((h, w))) == 0].mean()),
      "network_evaluations_mean": float(evaluations.mean()),
      "network_evaluations_max": int(evaluations.max()),
      "grid": grid_path, "steps_grid": steps_path, "out_dir": str(out_dir), **extra}
  grids = {"steps.png": (_steps_image(steps, budget), None)}
  if sc.task == "ipr":
    grids["rounds.png"] = (rows.reshape(-1, *shape), rows.shape[1])
  _write_outputs(out_dir, out, settings, grids=grids)
  return settings
