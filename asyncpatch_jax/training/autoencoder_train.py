"""Training the localized VQ autoencoder: `train_and_evaluate(config, workdir)` for configs/vqae_*.py.

The same machinery as the diffusion loop (training/train.py): one compiled, donated
train step over the ('data', 'fsdp') mesh, the batch of step k a pure function of
(seed, k) (images from data/input_pipeline.py, masks from data/training_masks.py
seeded by (seed, k)), orbax checkpoints restored before anything else (bitwise
resume), metrics.jsonl + TensorBoard, a progress bar, SIGTERM/preemption saves and a
stop naming the step on a non-finite loss.

Loss (taming-transformers' VQLPIPSWithDiscriminator, as latent diffusion's VQ models;
AsyncPatch App. F trains the encoder on masked images, Sec. 5.2):
  nll   = l1_weight * mean over known pixels |x - x_rec| (+ lpips_weight * LPIPS)
  vq    = ae_losses.vq_loss (beta = 0.25 on the codebook term: taming's legacy form)
  g     = -mean D(x_rec)                                   (PatchGAN hinge generator loss)
  w     = disc_weight * clip(||d nll / dW|| / (||d g / dW|| + 1e-4), 0, 1e4), no gradient,
          W = the decoder's last layer (`conv_out` kernel)
  loss  = nll + w * [step >= disc_start] * g + codebook_weight * vq
  d_loss = [step >= disc_start] * 0.5 (mean relu(1 - D(x)) + mean relu(1 + D(sg x_rec)))
Both use Adam with latent diffusion's betas (0.5, 0.9) (config.optim).

Dead codes: a code that no batch has used for `dead_after` steps is dead (counted in the
metrics); with `restart_dead_codes` (the default) it is re-initialised, inside the
step, to the pre-quantisation latent of a random token of the current batch (the
restart of Dhariwal et al. 2020 / Zeghidour et al. 2021; latent diffusion itself does
nothing). Restarts keep a small codebook in use on short runs; its Adam moments are
left as they are.
"""

from __future__ import annotations

import functools
import json
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.data import datasets
from asyncpatch_jax.data import image_io
from asyncpatch_jax.runtime import storage
from asyncpatch_jax.data import training_masks
from asyncpatch_jax.models import patchgan
from asyncpatch_jax.models import vqae
from asyncpatch_jax.runs import loader
from asyncpatch_jax.training import loop
from asyncpatch_jax.training import autoencoder_losses as ae_losses
from asyncpatch_jax.training import train_state

@flax.struct.dataclass
class AutoencoderState:
  """Everything a resumed autoencoder run needs besides the config.

  code_age: [K] int32, steps since each code was last used by a batch.
  nonfinite_step: the first step whose loss or gradient was not finite (-1 if none).
  disc_params / disc_opt_state: {} / () when the discriminator is off.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  disc_params: Any
  disc_opt_state: Any
  code_age: jax.Array
  nonfinite_step: jax.Array


class AutoencoderSetup(loop.Trainer):
  """Everything built from an autoencoder config before compiling: validated, nothing allocated.

  image_shape: build without a dataset for this [H, W, C] (loading a trained workdir,
  benchmarks); by default the training source is opened and gives the shape.
  """

  def __init__(self, config: ml_collections.ConfigDict, devices=None, image_shape=None):
    self.config = cfg = config
    ac = cfg.autoencoder
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
      checks.check_positive_int(cfg.train[key], f"train.{key}")
    checks.check_positive_int(ac.dead_after, "autoencoder.dead_after")
    checks.check_choice(ac.beta_on, ae_losses.BETA_CONVENTIONS, "autoencoder.beta_on")
    for key in ("beta", "codebook_weight", "l1_weight", "lpips_weight", "disc_weight"):
      if not ac[key] >= 0:
        raise checks.InputError(f"autoencoder.{key}={ac[key]}; expected a value >= 0.")
    training_masks.check_families(ac.mask_families)
    if not 0.0 <= ac.mask_fraction <= 1.0:
      raise checks.InputError(f"autoencoder.mask_fraction={ac.mask_fraction}; expected [0, 1].")
    self.source = None
    if image_shape is None:
      self.source = datasets.get_dataset(cfg.data.dataset, "train",
                                         data_dir=cfg.data.data_dir or None,
                                         **dict(cfg.data.options))
      image_shape = self.source.image_shape
    self.image_shape = self.checkpoint_shape = tuple(int(s) for s in image_shape)
    self.step_fn = train_step
    self.ae = vqae.build_autoencoder(ac)
    self.latent_shape = self.ae.latent_shape(self.image_shape)   # checks H, W, C
    self.disc = None
    if ac.disc_weight > 0:
      checks.check_positive_int(ac.disc_layers, "autoencoder.disc_layers")
      checks.check_positive_int(ac.disc_channels, "autoencoder.disc_channels")
      need = patchgan.min_image_size(ac.disc_layers)
      if min(self.image_shape[:2]) < need:
        raise checks.InputError(
            f"autoencoder.disc_layers={ac.disc_layers} needs images of at least {need}x{need}; "
            f"these are {self.image_shape[0]}x{self.image_shape[1]}. Use fewer layers.")
      self.disc = patchgan.PatchDiscriminator(ac.disc_channels, ac.disc_layers)
    self.lpips = _lpips_fn(ac) if ac.lpips_weight > 0 else None
    flatten = cfg.train.fsdp == 1
    self.tx, self.lr_schedule = train_state.make_optimizer(cfg.optim, cfg.train.num_steps,
                                                           flatten=flatten)
    self.disc_tx, _ = train_state.make_optimizer(cfg.optim, cfg.train.num_steps, flatten=flatten)
    n_dev = jax.device_count() if devices is None else len(devices)
    if cfg.train.batch_size % n_dev:
      raise checks.InputError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                              f"{n_dev} devices.")
    self.abstract_state = jax.eval_shape(self.init_state, jax.random.key(0))

  # -- the loop's trainer interface (loop.Trainer) --------------------------------------------

  what = "autoencoder's train step"

  def batch(self, step, local):
    h, w, _ = self.image_shape
    return {"image": local["image"], "mask": batch_masks(self.config, step, h, w)}

  def example(self):
    h, w, _ = self.image_shape
    return {"image": self.source[0]["image"], "mask": np.ones((h, w), np.float32)}

  def checkpoint_model(self):
    return loader.architecture(self.config.autoencoder)

  def describe(self, start, total, mesh):
    return (f"Training the autoencoder on {self.config.data.dataset} from step {start} to "
            f"{total} on {jax.device_count()} devices, "
            f"{sum(x.size for x in jax.tree.leaves(self.abstract_state.params))} parameters, "
            f"halo {self.ae.halo} pixels.")

  def postfix(self, scalars):
    return {"l1": f"{scalars['rec_l1']:.4f}", "ppl": f"{scalars['perplexity']:.0f}"}

  def finish(self, summary, workdir, completed):
    if completed:
      summary["eval"] = _evaluate(self, summary["state"].params, workdir)
    return summary

  def init_state(self, key: jax.Array) -> AutoencoderState:
    k_ae, k_disc = jax.random.split(key)
    params = vqae.init_variables(self.ae, k_ae, self.image_shape)["params"]
    disc_params, disc_opt = {}, ()
    if self.disc is not None:
      disc_params = self.disc.init(k_disc, jnp.zeros((1, *self.image_shape)))["params"]
      disc_opt = self.disc_tx.init(disc_params)
    return AutoencoderState(
        step=jnp.int32(0), params=params, opt_state=self.tx.init(params),
        disc_params=disc_params, disc_opt_state=disc_opt,
        code_age=jnp.zeros((self.ae.codebook_size,), jnp.int32), nonfinite_step=jnp.int32(-1))


def _lpips_fn(ac):
  """LPIPS(x, y) -> [B] from the evaluation wing's module and the weights file, or InputError."""
  if not ac.lpips_weights:
    raise checks.InputError("autoencoder.lpips_weight > 0 needs autoencoder.lpips_weights=<file> "
                            "(LPIPS weights converted to npz/safetensors; nothing is downloaded).")
  try:
    from asyncpatch_jax.evaluation import lpips  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise checks.InputError(
        "autoencoder.lpips_weight > 0 but this installation has no LPIPS module "
        "(asyncpatch_jax.evaluation.lpips); set --config.autoencoder.lpips_weight=0.") from None
  return lpips.load(ac.lpips_weights)


def losses(params, disc_params, batch: dict[str, jax.Array], *, setup: AutoencoderSetup,
           disc_on: jax.Array) -> tuple[jax.Array, tuple[dict, jax.Array, jax.Array, jax.Array]]:
  """(loss, (scalars, x_rec, h, indices)) of the autoencoder on a batch (module docstring)."""
  ac = setup.config.autoencoder
  ae = setup.ae
  x, m = batch["image"], batch["mask"]
  h = ae.apply({"params": params}, x, m, method=ae.encode)
  z_st, z_q, indices = ae.apply({"params": params}, h, method=ae.quantize)
  feats = ae.apply({"params": params}, z_st, m, method=ae.decode_features)
  bias = params["conv_out"]["bias"]

  def pixels(kernel, f):
    return ae.apply({"params": {"conv_out": {"kernel": kernel, "bias": bias}}}, f,
                    method=ae.to_pixels)

  def nll_of(x_rec):
    rec = ae_losses.masked_l1(x, x_rec, m)
    nll = ac.l1_weight * rec
    if setup.lpips is not None:
      # Hidden pixels are taken from the target, so only the known ones are compared.
      composite = jnp.where(m[..., None] > 0, x_rec, x)
      nll = nll + ac.lpips_weight * jnp.mean(setup.lpips(composite, x))
    return nll, rec

  def g_of(x_rec):
    return -jnp.mean(setup.disc.apply({"params": disc_params}, x_rec))

  kernel = params["conv_out"]["kernel"]
  x_rec = pixels(kernel, feats)
  nll, rec = nll_of(x_rec)
  vq, vq_terms = ae_losses.vq_loss(h, z_q, ac.beta, ac.beta_on)
  loss = nll + ac.codebook_weight * vq
  scalars = {"rec_l1": rec, "nll": nll, "vq_loss": vq, **vq_terms}
  if setup.disc is not None:
    g = g_of(x_rec)
    f_sg = jax.lax.stop_gradient(feats)
    w = ae_losses.adaptive_weight(lambda k: nll_of(pixels(k, f_sg))[0], lambda k: g_of(pixels(k, f_sg)),
                        kernel, scale=ac.disc_weight)
    loss = loss + w * disc_on * g
    scalars.update(g_loss=g, adaptive_weight=w)
  return loss, (scalars, x_rec, h, indices)


def train_step(state: AutoencoderState, batch: dict[str, jax.Array], *, setup: AutoencoderSetup,
               root_key: jax.Array) -> tuple[AutoencoderState, dict[str, jax.Array]]:
  """One optimisation step of autoencoder and discriminator; the state is donated by the caller."""
  ac = setup.config.autoencoder
  key = jax.random.fold_in(root_key, state.step)
  disc_on = (state.step >= ac.disc_start).astype(jnp.float32)
  grad_fn = jax.value_and_grad(
      functools.partial(losses, setup=setup, disc_on=disc_on), has_aux=True)
  (loss, (scalars, x_rec, h, indices)), grads = grad_fn(state.params, state.disc_params, batch)
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  disc_params, disc_opt_state = state.disc_params, state.disc_opt_state
  if setup.disc is not None:
    fake = jax.lax.stop_gradient(x_rec)

    def d_loss_fn(dp):
      real_logits = setup.disc.apply({"params": dp}, batch["image"])
      fake_logits = setup.disc.apply({"params": dp}, fake)
      return disc_on * ae_losses.hinge_d_loss(real_logits, fake_logits), (jnp.mean(real_logits),
                                                                jnp.mean(fake_logits))

    (d_loss, (lr_, lf_)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(disc_params)
    d_updates, disc_opt_state = setup.disc_tx.update(d_grads, disc_opt_state, disc_params)
    disc_params = optax.apply_updates(disc_params, d_updates)
    scalars.update(d_loss=d_loss, logits_real=lr_, logits_fake=lf_)

  # Codebook usage; dead codes are restarted to random latents of this batch.
  counts, perplexity = ae_losses.codebook_usage(indices, setup.ae.codebook_size)
  age = jnp.where(counts > 0, 0, state.code_age + 1)
  dead = age >= ac.dead_after
  if ac.restart_dead_codes:
    flat = jax.lax.stop_gradient(h).reshape(-1, h.shape[-1])
    pick = jax.random.randint(key, (setup.ae.codebook_size,), 0, flat.shape[0])
    codebook = params["quantizer"]["codebook"]
    params = {**params, "quantizer": {**params["quantizer"],
                                      "codebook": jnp.where(dead[:, None], flat[pick], codebook)}}
    age = jnp.where(dead, 0, age)

  grad_norm = optax.tree.norm(grads)
  new_state = AutoencoderState(
      step=state.step + 1, params=params, opt_state=opt_state, disc_params=disc_params,
      disc_opt_state=disc_opt_state, code_age=age,
      nonfinite_step=train_state.first_nonfinite(state, loss, grad_norm))
  metrics = {"loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
             "update_norm": optax.tree.norm(updates),
             "learning_rate": setup.lr_schedule(state.step),
             "perplexity": perplexity, "codes_used": jnp.sum(counts > 0),
             "dead_codes": jnp.sum(dead), **scalars}
  return new_state, metrics


def batch_masks(config, step: int, height: int, width: int, process_index: int | None = None,
                process_count: int | None = None) -> np.ndarray:
  """This process's masks of `step`: the global batch's masks (seeded by (seed, step)), sliced."""
  ac = config.autoencoder
  g = config.train.batch_size
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  masks = training_masks.sample_masks(ac.mask_families, g, height, width,
                                      seed=(config.seed, 7, step), fraction=ac.mask_fraction)
  local = g // pc
  return masks[pi * local:(pi + 1) * local]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       devices=None) -> dict[str, Any]:
  """Trains the autoencoder of `config` in `workdir` (resuming its latest checkpoint), then
  writes reconstructions, `eval.json` and `latent_stats.json` (the latent's mean and std,
  which latent diffusion uses to scale the latents).

  Returns a summary: final step, last metrics, eval results, preempted, and the `state`.
  """
  return loop.train(lambda: AutoencoderSetup(config, devices), config, workdir,
                    devices=devices)


def _evaluate(setup: AutoencoderSetup, params, workdir: str) -> dict[str, Any]:
  """Reconstruction metrics on the test split, a reconstruction grid, the latent statistics."""
  from asyncpatch_jax.evaluation import reconstruction  # pylint: disable=g-import-not-at-top
  cfg = setup.config
  n = cfg.evaluate.reconstruct_images
  result: dict[str, Any] = {"step": int(cfg.train.num_steps), "dataset": cfg.data.dataset,
                            "halo": setup.ae.halo}
  h, w, _ = setup.image_shape
  codec = reconstruction.Reconstructor(setup.ae, jax.device_get(params))
  if n > 0:
    test = datasets.get_dataset(cfg.data.dataset, "test", data_dir=cfg.data.data_dir or None,
                                **dict(cfg.data.options))
    images = np.stack([test[i]["image"] for i in range(min(n, len(test)))])
    masks = training_masks.sample_masks(cfg.autoencoder.mask_families, len(images), h, w,
                                        seed=(cfg.seed, 11), fraction=1.0)
    result.update(codec.metrics(images, masks))
    train_images = np.stack([setup.source[i]["image"] for i in range(min(n, len(setup.source)))])
    stats = codec.latent_statistics(train_images)
    if jax.process_index() == 0:
      storage.write_text_atomic(workdir / loader.LATENT_STATS, json.dumps(stats, indent=2))
      k = min(8, len(images))
      rows = [images[:k], codec.reconstruct(images[:k]),
              np.where(masks[:k, ..., None] > 0, images[:k], -1.0),
              codec.reconstruct(images[:k], masks[:k])]
      path = workdir / "samples" / "final" / "reconstructions.png"
      image_io.write_grid(np.concatenate(rows), path, ncols=k)
      result["grid"] = str(path)
  if jax.process_index() == 0:
    storage.write_text_atomic(workdir / "eval.json", json.dumps(result, indent=2))
  return result
