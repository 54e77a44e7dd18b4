"""Sampling from a trained UNet with any spatial schedule and guidance, and the PNG grids.

`Generator` wraps the compiled per-pixel sampler (samplers.py) around a UNet with
classifier-free and/or input guidance (guidance.py); it keeps one compiled sampler
per guidance mode, each reused for every schedule of a shape. `Generator.refine` runs
Iterative Partial Refinement (ipr.py) with the same model and guidance.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import progress as progress_lib
from asyncpatch_jax.diffusion import guidance
from asyncpatch_jax.data import image_io
from asyncpatch_jax.runtime import storage
from asyncpatch_jax.diffusion import ipr
from asyncpatch_jax.diffusion import policies
from asyncpatch_jax.models import uncertainty_head
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.runtime import sharding


class Generator:
  """generator(params, tau, key=..., shape=... | x=..., labels=..., guidance=...) -> images."""

  def __init__(self, model, *, mesh="auto", head=None):
    """mesh: 'auto' (all devices, `training.sharding.sampling_mesh`), a Mesh, or None.

    head: an uncertainty head (models/uncertainty_head.py) whose prediction schedule
    policies see (pass its parameters as head_params); None: uncertainty 0.
    """
    self.model = model
    self.mesh = sharding.sampling_mesh() if isinstance(mesh, str) and mesh == "auto" else mesh
    self.head = head
    self._samplers: dict[tuple[bool, bool], ipr.Refiner] = {}

  def _sampler(self, cfg: bool, input_guided: bool) -> ipr.Refiner:
    if (cfg, input_guided) not in self._samplers:
      fn = guidance.model_velocity_fn(self.model)
      if cfg:
        fn = guidance.classifier_free(fn, self.model.null_label)
      if input_guided:
        fn = guidance.input_guidance(fn)
      self._samplers[cfg, input_guided] = ipr.Refiner(
          fn, mesh=self.mesh, batched_cond=("y", "guide_mask", "guide_noise"),
          uncertainty_fn=None if self.head is None else uncertainty_head.uncertainty_fn(
              self.head))
    return self._samplers[cfg, input_guided]

  def __call__(self, params, tau, *, key, x=None, shape=None, labels=None,
               guidance_weight: float = 0.0, eta: float = 0.0, input_guidance: float = 0.0,
               input_guidance_t: float = 0.6, guide_mask=None, head_params=None,
               **policy_kwargs):
    """Samples a batch; see samplers.Sampler for tau, key, x, shape and eta.

    labels: [B] class labels (None or the null label = unconditional) for a
      class-conditional model. guidance_weight: CFG weight w_c. input_guidance: w_i;
      guide_mask [B, H, W] defaults to the pixels known from the start (tau[0] = 0).
    tau may be a schedule policy (diffusion/policies.py): then pass `budget` (and
    `known`, `debug`, `return_history`: samplers.Sampler.run_policy) in policy_kwargs and
    the head's parameters as head_params; it returns a samplers.AdaptiveResult.
    """
    checks.check_range(input_guidance, "input_guidance", 0.0, hint=(
        "Input guidance (AsyncPatch Eq. 8) pushes the prediction away from the one at the "
        "noisier input with a weight w_i >= 0; 0 turns it off."))
    b = (x.shape if x is not None else shape)[0]
    cond, cfg = self._class_cond(params, labels, guidance_weight, b)
    is_policy = isinstance(tau, policies.Policy)
    if is_policy and head_params is not None:
      if self.head is None:
        raise checks.InputError("head_params given to a Generator built without a head.")
      policy_kwargs["uncertainty_cond"] = {"head_params": head_params}
    if input_guidance > 0:
      if guide_mask is None:
        hw = tuple((x.shape if x is not None else shape)[1:3])
        given = (np.asarray(policy_kwargs.get("known", np.zeros(hw))) > 0 if is_policy
                 else np.asarray(tau)[0] == 0)
        guide_mask = np.broadcast_to(given, (b, *hw))
      img_shape = (x.shape if x is not None else shape)
      cond.update(guide_mask=jnp.asarray(guide_mask, jnp.float32),
                  guide_noise=jax.random.normal(jax.random.fold_in(key, 2 ** 31 - 1), img_shape),
                  input_guidance=jnp.float32(input_guidance),
                  input_guidance_t=jnp.float32(input_guidance_t))
    return self._sampler(cfg, input_guidance > 0)(tau, key=key, x=x, shape=shape, eta=eta,
                                                   **policy_kwargs, **cond)

  def _class_cond(self, params, labels, guidance_weight: float, batch: int) -> tuple[dict, bool]:
    """The velocity function's arguments for labels and CFG; and whether CFG is on."""
    cond = {"params": params}
    cfg = bool(self.model.num_classes) and guidance_weight > 0
    if self.model.num_classes:
      labels = (np.full((batch,), self.model.null_label) if labels is None
                else np.asarray(labels))
      if labels.shape != (batch,):
        raise checks.InputError(f"labels has shape {labels.shape}; expected [{batch}].")
      cond["y"] = jnp.asarray(labels, jnp.int32)
    elif labels is not None:
      raise checks.InputError("labels were given for an unconditional model.")
    if cfg:
      cond["guidance"] = jnp.float32(guidance_weight)
    return cond, cfg

  def refine(self, params, x, *, key, regions, num_rounds: int, alpha: float = 0.25,
             num_steps: int = 50, condition=None, labels=None, guidance_weight: float = 0.0,
             eta: float = 0.0, fixed_noise: bool = False, fixed_regions: bool = False,
             return_history: bool = False, policy=None, head_params=None):
    """Iterative Partial Refinement of the samples x [B, H, W, C]; see `ipr.Refiner.refine`.

    policy: regenerate with a schedule policy (e.g. policies.uncertainty_ordered, the
    IPR paper's SRM order) and this Generator's head (head_params).
    """
    cond, cfg = self._class_cond(params, labels, guidance_weight, np.shape(x)[0])
    ucond = None if head_params is None else {"head_params": head_params}
    return self._sampler(cfg, False).refine(
        x, key=key, regions=regions, num_rounds=num_rounds, alpha=alpha, num_steps=num_steps,
        condition=condition, eta=eta, fixed_noise=fixed_noise, fixed_regions=fixed_regions,
        return_history=return_history, policy=policy, uncertainty_cond=ucond, **cond)


def left_half_mask(height: int, width: int) -> np.ndarray:
  """Known left half (Growing Images' inpainting mask): [H, W]."""
  m = np.zeros((height, width), np.float32)
  m[:, : width // 2] = 1.0
  return m


def write_grids(generator: Generator, params, sample_config, references: np.ndarray,
                key: jax.Array, out_dir, num_classes: int = 0,
                progress: bool = False) -> dict[str, str]:
  """Sample, inpainting and schedule grids of a model, as PNGs in `out_dir`.

  references: [N, H, W, C] real images used as inpainting inputs.
  out_dir: a local folder or a gs:// URL; every process samples (the sampler may be
    sharded over all devices), process 0 writes.
  progress: show a progress bar over the sampling calls.
  Returns {name: path}.
  """
  with progress_lib.bar(5 if num_classes else 4, "grids", enabled=progress,
                        unit="grid") as bar:
    return _write_grids(generator, params, sample_config, references, key, out_dir,
                        num_classes, bar)


def _write_grids(generator, params, sample_config, references, key, out_dir, num_classes,
                 bar) -> dict[str, str]:
  out_dir = storage.path(out_dir, "sample folder")
  n = sample_config.num_images
  _, h, w, c = references.shape
  steps, eta = sample_config.num_steps, sample_config.eta
  paths = {}
  keys = jax.random.split(key, 5)

  def save(name, images, ncols=None):
    path = out_dir / f"{name}.png"
    bar.update(1)
    image_io.write_grid(images, path, ncols=ncols)
    paths[name] = str(path)

  sync = schedules.synchronous(steps, h, w)
  save("samples", generator(params, sync, key=keys[0], shape=(n, h, w, c), eta=eta))
  if num_classes:
    labels = np.arange(n) % num_classes
    save("samples_conditional", generator(params, sync, key=keys[1], shape=(n, h, w, c),
                                          labels=labels, guidance_weight=sample_config.guidance,
                                          eta=eta), ncols=num_classes)
  # Inpainting of the right half and progressive stripes, on real images.
  k = min(n, len(references), 16)
  x = references[:k]
  mask = left_half_mask(h, w)
  inpainted = generator(params, schedules.inpainting(mask, steps), key=keys[2], x=x, eta=eta)
  progressive = generator(params, schedules.progressive(mask, 4, max(steps // 4, 1)),
                          key=keys[3], x=x, eta=eta)
  masked = np.where(mask[None, :, :, None] > 0, x, -1.0)
  bar.update(1)
  save("inpainting", np.concatenate([masked, np.asarray(inpainted), np.asarray(progressive), x]),
       ncols=k)
  grid = (2, 2) if h % 2 == 0 and w % 2 == 0 else (1, 1)
  auto = generator(params, schedules.autoregressive(h, w, grid, max(steps // 4, 1)),
                   key=keys[4], shape=(n, h, w, c), eta=eta)
  save("autoregressive", auto)
  return paths


def write_latent_grids(generator, params, codec, sample_config, references: np.ndarray,
                key: jax.Array, out_dir) -> dict[str, str]:
  """The pixel model's grids (`write_grids`) for a latent model (runs/latent_codec.py): samples, inpainting
  of the right half (masked input, latent inpainting with known pixels pasted, originals)
  and autoregressive generation over a 2x2 grid of token patches; PNGs in `out_dir`."""
  n = sample_config.num_images
  h, w, c = codec.pixel_shape
  lh, lw, lc = codec.latent_shape
  steps, eta = sample_config.num_steps, sample_config.eta
  keys = jax.random.split(key, 3)
  paths = {}

  def save(name, images, ncols=None):
    path = out_dir / f"{name}.png"
    image_io.write_grid(images, path, ncols=ncols)
    paths[name] = str(path)

  sync = schedules.synchronous(steps, lh, lw)
  save("samples", codec.finish(generator(params, sync, key=keys[0], shape=(n, lh, lw, lc),
                                         eta=eta)))
  k = min(n, len(references), 16)
  x = references[:k]
  mask = np.broadcast_to(left_half_mask(h, w), (k, h, w))
  z_known, _ = codec.known_latents(x, mask)
  tau = codec.latent_schedule(schedules.inpainting(mask[0], steps), known_content=True)
  z = generator(params, tau, key=keys[1], x=z_known, eta=eta)
  masked = np.where(mask[..., None] > 0, x, -1.0)
  save("inpainting", np.concatenate([masked, codec.finish(z, x, mask), x]), ncols=k)
  grid = (2, 2) if lh % 2 == 0 and lw % 2 == 0 else (1, 1)
  auto = generator(params, schedules.autoregressive(lh, lw, grid, max(steps // 4, 1)),
                   key=keys[2], shape=(n, lh, lw, lc), eta=eta)
  save("autoregressive", codec.finish(auto))
  return paths
