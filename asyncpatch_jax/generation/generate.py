"""Sampling from a trained UNet with any spatial schedule and guidance, and the PNG grids.

`Generator` wraps the compiled per-pixel sampler (samplers.py) around a UNet with
classifier-free and/or input guidance (guidance.py); it keeps one compiled sampler
per guidance mode, each reused for every schedule of a shape. `Generator.refine` runs
Iterative Partial Refinement (ipr.py) with the same model and guidance. With the codec of
a latent model (runs/latent_codec.py) the same pixel tasks run on tokens: `task` maps a
pixel schedule and known image to the model's space, `generate` samples and decodes, and
`write_grids` draws the training grids of pixel and latent models alike.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax import models
from asyncpatch_jax.models import dit_cache
from asyncpatch_jax.diffusion import tokens
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


@dataclasses.dataclass(frozen=True)
class Task:
  """A pixel task in the model's space (`Generator.task`): tokens for a latent model.

  tau: the model's schedule [N+1, (B,) h, w]; shape: the model's image [h, w, D];
  x: the known content in the model's space [(B,) h, w, D] or None; known: what the
  model knows [(B,) h, w] (1 = known) or None; pixels, mask: the known pixels [(B,) H, W,
  C] and their mask [(B,) H, W], pasted back exactly by `Generator.decode`.
  """
  tau: np.ndarray
  shape: tuple[int, int, int]
  x: np.ndarray | None = None
  known: np.ndarray | None = None
  pixels: np.ndarray | None = None
  mask: np.ndarray | None = None


class _Pixels:
  """A pixel model's space: the pixels themselves (the identity of runs/latent_codec.LatentCodec)."""

  def model_shape(self, image_shape) -> tuple[int, int, int]:
    return tuple(int(s) for s in image_shape)

  def to_model(self, tau, x, mask):
    return tau, x, mask

  def finish(self, z, x=None, mask=None) -> np.ndarray:
    """The samples z with the known pixels of x (mask 1) pasted back. The sampler keeps
    pixels at time 0 exactly; a DiT's partly known token was regenerated whole."""
    return paste_known(z, x, mask)

  def ipr_regions(self, grid, mask, shape) -> tuple[np.ndarray, np.ndarray]:
    """The `grid` regions and the condition set (the regions the mask fully knows); the
    mask must be a union of regions."""
    regions = schedules.grid_regions(shape[0], shape[1], tuple(grid))
    known, partly = schedules.known_regions(regions, mask)
    if (partly & ~known).any():
      raise checks.InputError(
          f"sample.task='ipr': the mask must be a union of the {tuple(grid)} grid regions "
          f"(regions {np.flatnonzero(partly & ~known).tolist()} are only partly known); align "
          "the mask or change --config.sample.grid.")
    return regions, known


def paste_known(z, x=None, mask=None) -> np.ndarray:
  """z [B, H, W, C] with the pixels of x [(B,) H, W, C] where mask [(B,) H, W] is 1."""
  z = np.asarray(z)
  if x is None or mask is None:
    return z
  m = np.broadcast_to(np.asarray(mask, np.float32)[..., None] > 0, z.shape)
  return np.where(m, np.broadcast_to(np.asarray(x, z.dtype), z.shape), z)


def token_known(known, patch_size: int):
  """A known map [..., h, w] (1 = known) on tokens: a token is known only when all of its
  pixels are (diffusion/tokens.py's rule)."""
  if known is None or patch_size == 1:
    return known
  return 1.0 - tokens.align(1.0 - np.asarray(known, np.float32), patch_size)


class Generator:
  """generator(params, tau, key=..., shape=... | x=..., labels=..., guidance=...) -> images.

  The call runs in the model's space (a latent model's tokens). The pixel pipeline --
  `task` (a pixel schedule and known image to the model's space), `generate` (sample and
  decode) and `decode` -- is the same for pixel and latent models: with a codec
  (runs/latent_codec.LatentCodec) it encodes and decodes, without it the model's images
  are the pixels.

  A DiT with p x p tokens (models/dit.py) needs one time per token (diffusion/tokens.py):
  `task` makes the schedule constant on each token (its largest time, so a token is known
  only when all of its pixels are) and `decode` pastes the known pixels back, so they stay
  bit-identical; a policy's regions become the tokens (or must be unions of them); a
  schedule given to the call directly whose time varies inside a token is refused.
  """

  def __init__(self, model, *, codec=None, mesh="auto", head=None, clean_cache: bool = False):
    """codec: a latent model's LatentCodec, or None (a pixel model).

    mesh: 'auto' (all devices, `runtime.sharding.sampling_mesh`), a Mesh, or None.
    head: an uncertainty head (models/uncertainty_head.py) whose prediction schedule
    policies see (pass its parameters as head_params); None: uncertainty 0.
    clean_cache: a clean-context DiT computes only its noisy tokens at every step, from
    the cached keys and values of the clean ones (models/dit_cache.py; the same samples
    within float32 rounding). InputError for a model trained without model.clean_context.
    """
    if clean_cache and not getattr(model, "clean_context", False):
      raise checks.InputError(
          "sample.clean_cache needs a DiT trained with model.clean_context=True: this model's "
          "clean tokens attended to noisy ones in training; sample it with "
          "sample.clean_cache=False.")
    self.clean_cache = bool(clean_cache)
    self.model = model
    self.patch_size = models.patch_size(model)
    self.codec = codec
    self._space = _Pixels() if codec is None else codec
    self.mesh = sharding.sampling_mesh() if isinstance(mesh, str) and mesh == "auto" else mesh
    self.head = head
    self._samplers: dict[tuple[bool, bool], ipr.Refiner] = {}

  # ---------------------------------------------------------------- the pixel pipeline
  def model_shape(self, image_shape) -> tuple[int, int, int]:
    """The model's image [h, w, D] for pixel images [H, W, C]."""
    return self._space.model_shape(image_shape)

  def task(self, tau, x=None, mask=None, *, image_shape=None) -> Task:
    """A pixel task in the model's space.

    tau: a pixel schedule [N+1, (B,) H, W]; x: known pixels [(B,) H, W, C] with mask
    [(B,) H, W] (1 = known), or None; image_shape: [H, W, C] (default x's). A latent
    model's token schedule gives each token the largest time of the pixels it depends on
    and its known tokens encode the masked image (runs/latent_codec.py).
    """
    if image_shape is None:
      if x is None:
        raise checks.InputError("Generator.task needs image_shape when no image x is given.")
      image_shape = np.shape(x)[-3:]
    if x is not None and mask is not None:
      mask = np.broadcast_to(np.asarray(mask, np.float32), np.shape(x)[:-1])
    tau_m, x_m, known = self._space.to_model(tau, x, mask)
    if self.patch_size > 1:                      # one time per DiT token
      tau_m = tokens.align(tau_m, self.patch_size)
      known = token_known(known, self.patch_size)
    return Task(tau=np.asarray(tau_m), shape=self.model_shape(image_shape), x=x_m,
                known=known, pixels=x, mask=mask)

  def decode(self, out, task: Task | None = None) -> np.ndarray:
    """Pixels [B, H, W, C] of the model's images `out` (the task's known pixels pasted back)."""
    if task is None or task.pixels is None:
      return self._space.finish(out)
    return self._space.finish(out, task.pixels, task.mask)

  def ipr_regions(self, grid, known, shape) -> tuple[np.ndarray, np.ndarray]:
    """IPR regions of a (rows, cols) grid over the model's image [h, w, ...] and the
    condition set: the regions `known` [h, w] (a task's `known`, or None) fully knows."""
    return self._space.ipr_regions(tuple(grid), known, shape)

  def generate(self, params, task: Task, *, key, num: int | None = None,
               **kwargs) -> np.ndarray:
    """Runs `task` on `num` images (default: x's batch) and decodes; pixels [B, H, W, C].

    kwargs: as for the call (labels, guidance_weight, eta, input_guidance, ...).
    """
    return self.decode(self(params, task.tau, key=key, **self.inputs(task, num), **kwargs),
                       task)

  def inputs(self, task: Task, num: int | None = None) -> dict:
    """The call's x= (the known content, broadcast to `num` images) or shape=."""
    if task.x is None:
      if num is None:
        raise checks.InputError("a task without known content needs the number of images.")
      return {"shape": (num, *task.shape)}
    x = np.asarray(task.x)
    if x.ndim == 3:
      x = np.broadcast_to(x, (num, *x.shape))
    return {"x": x}

  def _sampler(self, cfg: bool, input_guided: bool) -> ipr.Refiner:
    if (cfg, input_guided) not in self._samplers:
      fn = (dit_cache.cached_velocity_fn(self.model) if self.clean_cache
            else guidance.model_velocity_fn(self.model))
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
    pasted = None
    if self.patch_size > 1:
      hw = tuple((x.shape if x is not None else shape)[1:3])
      tau, policy_kwargs, pasted = self._on_tokens(tau, hw, x, policy_kwargs)
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
    out = self._sampler(cfg, input_guidance > 0)(tau, key=key, x=x, shape=shape, eta=eta,
                                                  **policy_kwargs, **cond)
    if pasted is not None:          # a policy's partly known tokens: the known pixels back
      out = out._replace(samples=paste_known(out.samples, x, pasted))
    return out

  def _on_tokens(self, tau, hw, x, policy_kwargs):
    """A DiT's schedule or policy on its p x p tokens: (tau, policy_kwargs, known pixels to
    paste back or None). InputError for a schedule whose time varies inside a token."""
    p = self.patch_size
    tokens.check_patch_size(hw[0], hw[1], p, f"the image (the DiT's patch size {p})")
    if not isinstance(tau, policies.Policy):
      if not tokens.is_token_aligned(tau, p):
        raise checks.InputError(
            f"the schedule's time varies inside the DiT's {p}x{p} tokens, which have one time "
            "each; build the task with Generator.task (which gives each token its largest "
            "time) or tokens.align(tau, p).")
      return tau, policy_kwargs, None
    regions = tau.region_map(hw)
    if tau.regions is None:                      # every token its own region
      regions = schedules.grid_regions(hw[0], hw[1], (hw[0] // p, hw[1] // p))
    elif not tokens.is_token_aligned(regions, p):
      raise checks.InputError(
          f"policy {tau.name!r}: its regions cut through the DiT's {p}x{p} tokens; use a grid "
          f"whose cells are multiples of {p} pixels.")
    policy = dataclasses.replace(tau, regions=regions)
    known = policy_kwargs.get("known")
    if known is None:
      return policy, policy_kwargs, None
    return policy, {**policy_kwargs, "known": token_known(known, p)}, known

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
    if self.patch_size > 1 and not tokens.is_token_aligned(
        schedules.check_regions(regions, np.shape(x)[1:3])[0], self.patch_size):
      raise checks.InputError(
          f"IPR regions cut through the DiT's {self.patch_size}x{self.patch_size} tokens; use "
          f"a grid whose cells are multiples of {self.patch_size} pixels.")
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
                key: jax.Array, out_dir, progress: bool = False) -> dict[str, str]:
  """Sample, inpainting and schedule grids of a pixel or latent model, as PNGs in `out_dir`.

  samples.png (synchronous schedule); samples_conditional.png (a class-conditional model,
  one column per class, CFG weight sample.guidance); inpainting.png (rows: the masked
  inputs, the right half inpainted, the same in 4 progressive stripes, the originals);
  autoregressive.png (a 2x2 grid of patches in raster order). A latent model (the
  generator's codec) runs the same pixel schedules on tokens.

  references: [N, H, W, C] real images used as inpainting inputs.
  out_dir: a local folder or a gs:// URL; every process samples (the sampler may be
    sharded over all devices), process 0 writes.
  progress: show a progress bar over the sampling calls.
  Returns {name: path}.
  """
  num_classes = generator.model.num_classes
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

  def run(tau, key, x=None, mask=None, **kwargs):
    task = generator.task(tau, x, mask, image_shape=(h, w, c))
    return generator.generate(params, task, key=key, num=n, eta=eta, **kwargs)

  sync = schedules.synchronous(steps, h, w)
  save("samples", run(sync, keys[0]))
  if num_classes:
    save("samples_conditional", run(sync, keys[1], labels=np.arange(n) % num_classes,
                                    guidance_weight=sample_config.guidance), ncols=num_classes)
  # Inpainting of the right half and progressive stripes, on real images.
  k = min(n, len(references), 16)
  x = references[:k]
  mask = left_half_mask(h, w)
  inpainted = run(schedules.inpainting(mask, steps), keys[2], x, mask)
  progressive = run(schedules.progressive(mask, 4, max(steps // 4, 1)), keys[3], x, mask)
  masked = np.where(mask[None, :, :, None] > 0, x, -1.0)
  bar.update(1)
  save("inpainting", np.concatenate([masked, inpainted, progressive, x]), ncols=k)
  lh, lw, _ = generator.model_shape((h, w, c))    # the patches cover whole tokens
  grid = (2, 2) if lh % 2 == 0 and lw % 2 == 0 else (1, 1)
  save("autoregressive", run(schedules.autoregressive(h, w, grid, max(steps // 4, 1)),
                             keys[4]))
  return paths
