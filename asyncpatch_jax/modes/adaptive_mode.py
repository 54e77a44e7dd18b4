"""`--mode=sample` tasks that use an uncertainty head: `adaptive`, `ordered`, and `ipr` in SRM's order.

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

import json

import jax
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.generation import generate
from asyncpatch_jax.modes import sample_mode
from asyncpatch_jax.data import image_io
from asyncpatch_jax.runtime import storage
from asyncpatch_jax.diffusion import policies
from asyncpatch_jax.runtime import multihost
from asyncpatch_jax.training import head_train
from asyncpatch_jax.training import train

TASKS = ("adaptive", "ordered")
ADAPTIVE_POLICIES = ("uncertainty_accelerated", "look_ahead", "dual_loop")
IPR_ORDERS = ("raster", "uncertainty")


def uses_head(config) -> bool:
  """Whether --mode=sample's task is one of this module's."""
  return config.sample.task in TASKS or (config.sample.task == "ipr" and
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


def sample_from_workdir(config, workdir: str) -> dict:
  """Runs an adaptive task (see the module docstring); returns the settings written."""
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
  setup, state = train.load_trained(workdir, config)
  shape = setup.image_shape
  h, w, _ = shape
  x = mask = None
  if sc.image or sc.mask:
    if not (sc.image and sc.mask):
      raise checks.InputError("give both sample.image and sample.mask (white = known) to "
                              "condition on an image, or neither.")
    x = image_io.load_image(sc.image, shape)
    mask = image_io.load_mask(sc.mask, (h, w))
  if sc.task == "ipr":
    regions, condition = sample_mode._ipr_regions(sc, shape, mask)  # pylint: disable=protected-access
  head, head_params = head_train.load_head(u.head_workdir, setup, state)
  n = sc.num_images
  labels = sample_mode._labels(str(sc.label), n, setup.model.num_classes,  # pylint: disable=protected-access
                               known_image=x is not None)
  out_dir = storage.path(sc.out_dir or storage.path(workdir) / "samples" / sc.task,
                         "sample.out_dir")
  storage.check_replaceable(out_dir, "sample.out_dir")
  key = jax.random.key(config.seed)
  gen = generate.Generator(setup.model, head=head)
  guide = dict(labels=labels, guidance_weight=sc.guidance if labels is not None else 0.0,
               eta=sc.eta)
  xs = None if x is None else np.broadcast_to(x, (n, *shape))
  result = gen(state.ema_params, policy, key=key, x=xs,
               shape=None if x is not None else (n, *shape), budget=budget, known=mask,
               head_params=head_params, debug=bool(u.debug), **guide)
  out = np.asarray(result.samples)
  steps = np.asarray(result.steps)
  evaluations = np.asarray(result.evaluations)
  extra = {}
  if sc.task == "ipr":
    out, history, _ = gen.refine(
        state.ema_params, out, key=jax.random.fold_in(key, 1), regions=regions,
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
      "task": sc.task, "step": int(jax.device_get(state.step)), "num_images": n,
      "policy": policy.name, "policy_params": policy.params,
      "policy_grid": None if policy.regions is None else list(policy.regions),
      "budget": budget, "eta": sc.eta, "guidance": sc.guidance, "label": str(sc.label),
      "image": sc.image, "mask": sc.mask, "head_workdir": u.head_workdir,
      "mean_steps_per_pixel": float(steps[:, (mask if mask is not None else
                                              np.zeros((h, w))) == 0].mean()),
      "network_evaluations_mean": float(evaluations.mean()),
      "network_evaluations_max": int(evaluations.max()),
      "grid": grid_path, "steps_grid": steps_path, "out_dir": str(out_dir), **extra}
  if multihost.is_writer():
    scale = 4 if h <= 32 else 1
    with storage.replaced_folder(out_dir, "sample.out_dir") as folder:
      if sc.task == "ipr":
        image_io.save_grid(rows.reshape(-1, *shape), folder.file("rounds.png"),
                           ncols=rows.shape[1], scale=scale)
      image_io.save_grid(out, folder.file("samples.png"), scale=scale)
      image_io.save_grid(_steps_image(steps, budget), folder.file("steps.png"), scale=scale)
      for i in range(min(n, 16)):
        image_io.save_png(image_io.to_uint8(out[i]), folder.file(f"sample_{i:03d}.png"))
      storage.write_text_atomic(folder.file("settings.json"), json.dumps(settings, indent=2))
  return settings
