"""`train_and_evaluate(config, workdir)`: the sharded training loop, resumable from its workdir.

One compiled train step (donated state) runs over a ('data', 'fsdp') mesh; the batch
of step k is a pure function of (seed, k) assembled into a global jax.Array from
each process's share; all randomness is `fold_in(root_key, step)`. The latest
checkpoint in the workdir is restored before anything else, so a preempted or
killed run continues bit-for-bit (on CPU) as if it had not been interrupted.
AsyncPatch Sec. 3.1 and App. E; docs/conventions.md, "Randomness".
"""

from __future__ import annotations

import functools
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from asyncpatch_jax.runs import checkpointing
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import multihost
from asyncpatch_jax.runtime import progress as progress_lib
from asyncpatch_jax.data import datasets
from asyncpatch_jax.evaluation.evaluators import base as evaluators_base
from asyncpatch_jax.evaluation.evaluators import common as evaluators
from asyncpatch_jax.diffusion import flow
from asyncpatch_jax.generation import generate
from asyncpatch_jax.runtime import storage
from asyncpatch_jax.training import loop
from asyncpatch_jax import models
from asyncpatch_jax.runs import loader
from asyncpatch_jax.runtime import sharding
from asyncpatch_jax.diffusion import timesteps
from asyncpatch_jax.training import train_state


class Setup(loop.Trainer):
  """The diffusion trainer: everything built from a config before compiling, validated,
  nothing allocated.

  Args:
    config: the experiment config.
    devices: the devices training will use (default: all).
    image_shape: build without a dataset for this [H, W, C] (benchmarks, and sampling
      from a workdir, whose checkpoints record it); by default the training source
      is opened and gives the shape.
  """

  def __init__(self, config: ml_collections.ConfigDict, devices=None, image_shape=None):
    self.config = cfg = config
    self.devices = devices
    checks.check_choice(cfg.loss.weighting, ("sigmoid", "mse"), "loss.weighting")
    checks.check_choice(cfg.optim.decay, ("cosine", "constant"), "optim.decay")
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
      checks.check_positive_int(cfg.train[key], f"train.{key}")
    checks.check_range(cfg.train.ema_decay, "train.ema_decay", 0, 1, high_open=True)
    checks.check_range(cfg.train.label_dropout, "train.label_dropout", 0, 1)
    train_state.check_optim(cfg.optim)
    self.source = None
    if image_shape is None:
      self.source = datasets.get_dataset(cfg.data.dataset, "train",
                                         data_dir=cfg.data.data_dir or None,
                                         **dict(cfg.data.options))
      image_shape = self.source.image_shape
    self.image_shape = tuple(image_shape)
    self.pixel_shape = self.checkpoint_shape = self.image_shape
    self.step_fn = train_step
    self.codec = None
    latent_cfg = cfg.get("latent")
    if latent_cfg is not None and latent_cfg.autoencoder_workdir:
      # Latent AsyncPatch (Sec. 5.2): the UNet diffuses a frozen autoencoder's latents.
      self.codec = loader.load_codec(latent_cfg.autoencoder_workdir, self.pixel_shape,
                                     latent_cfg.scale, cfg.model)
      self.image_shape = self.codec.latent_shape
    # The end-of-training evaluators (config.evaluate.at_end), their settings checked now.
    self.evaluators = evaluators.from_config(cfg, cfg.evaluate.at_end, self.pixel_shape,
                                             latent=self.codec is not None,
                                             setting="evaluate.at_end")
    self.model = models.build_model(cfg.model)
    self.remat = self.model.remat
    loader.check_model(self.model, cfg, self.image_shape,
                       self.source.num_classes if self.source is not None else None)
    ts = cfg.timesteps
    # A DiT trains on token-aligned time maps (one time per token: diffusion/tokens.py).
    self.noise_level_sampler = timesteps.NoiseLevelSampler.from_config(
        ts, token_size=models.patch_size(self.model))
    h, w, _ = self.image_shape
    self.noise_level_sampler.patch_sizes_for(h, w)
    self.tx, self.lr_schedule = train_state.make_optimizer(
        cfg.optim, cfg.train.num_steps, flatten=cfg.train.fsdp == 1)
    n_dev = jax.device_count() if devices is None else len(devices)
    if cfg.train.batch_size % n_dev:
      raise checks.InputError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                       f"{n_dev} devices.")
    # Traces the model once (shape and input checks happen here, before compiling).
    # (The key is made inside the trace: nothing runs, nothing compiles.)
    self.abstract_state = jax.eval_shape(lambda: self.init_state(jax.random.key(0)))

  def init_state(self, key: jax.Array) -> train_state.TrainState:
    z, t, y = models.example_inputs(self.model, self.image_shape)
    params = self.model.init(key, z, t, y)["params"]
    return train_state.create(params, self.tx)

  # -- the loop's trainer interface (loop.Trainer) --------------------------------------------

  @property
  def class_conditional(self) -> bool:
    return bool(self.model.num_classes)

  def example(self) -> dict[str, np.ndarray]:
    if self.source is not None:
      return super().example()
    # Built without a dataset (image_shape given): an example of the shapes and dtypes the
    # sources give (float32 pixels [H, W, C], an int32 label), for compiling the step.
    example = {"image": np.zeros(self.pixel_shape, np.float32)}
    if self.class_conditional:
      example["label"] = np.int32(0)
    return example

  def frozen(self, mesh):
    # A latent model's step encodes each batch with the frozen autoencoder (Sec. 5.2).
    return () if self.codec is None else ((self.codec.variables, sharding.replicated(mesh)),)

  def describe(self, start, total, mesh):
    return (f"Training {self.config.data.dataset} from step {start} to {total} on "
            f"{jax.device_count()} devices (mesh {dict(mesh.shape)}), "
            f"{sum(x.size for x in jax.tree.leaves(self.abstract_state.params))} parameters.")

  @functools.cached_property
  def generator(self) -> generate.Generator:
    return generate.Generator(self.model, codec=self.codec,
                              mesh=None if self.devices is not None else "auto",
                              clean_cache=self.config.sample.get("clean_cache", False))

  def after_step(self, done, state, workdir):
    cfg = self.config
    if cfg.train.sample_every and done % cfg.train.sample_every == 0 and done != cfg.train.num_steps:
      _write_grids(self.generator, state, cfg, self, workdir, f"step_{done}")

  def finish(self, summary, workdir, completed):
    if not completed:
      return summary
    state, cfg = summary["state"], self.config
    if cfg.sample.num_images:
      summary["grids"] = _write_grids(self.generator, state, cfg, self, workdir, "final")
    summary["eval"] = _evaluate(self.generator, state, cfg, self, workdir)
    return summary


def train_step(state: train_state.TrainState, batch: dict[str, jax.Array], frozen=None, *,
               setup: Setup, root_key: jax.Array
               ) -> tuple[train_state.TrainState, dict[str, jax.Array]]:
  """One optimisation step on the global batch; the state is donated by the caller.

  frozen: the autoencoder's variables of a latent model (setup.codec), else None.
  """
  cfg = setup.config
  model = setup.model
  key = jax.random.fold_in(root_key, state.step)
  k_t, k_eps, k_label, k_dropout, k_reg = jax.random.split(key, 5)
  x = batch["image"]
  if setup.codec is not None:
    x = setup.codec.encode(frozen, x)          # frozen autoencoder: latents [B, h, w, D]
  b, h, w, _ = x.shape
  t = setup.noise_level_sampler(k_t, b, h, w)                       # [B, H, W]
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  z = flow.add_noise(x, eps, t)
  target = flow.velocity_target(x, eps)
  y = None
  if model.num_classes:
    drop = jax.random.bernoulli(k_label, cfg.train.label_dropout, (b,))
    y = jnp.where(drop, model.null_label, batch["label"]).astype(jnp.int32)

  def loss_fn(params):
    v_hat = model.apply({"params": params}, z, t, y, train=True, rngs={"dropout": k_dropout})
    per_pixel = flow.per_pixel_loss(target, v_hat, t, cfg.loss.weighting, cfg.loss.bias)
    if cfg.timesteps.get("clean_fraction", 0.0) > 0:
      # Clean tokens (time 0) are never moved by a sampler: no velocity to learn there.
      per_pixel = jnp.where(t > 0.0, per_pixel, 0.0)
    loss = jnp.mean(per_pixel)
    aux = {"velocity_loss": loss}
    if cfg.loss.mu_reg > 0:
      from asyncpatch_jax.analysis import collage  # pylint: disable=g-import-not-at-top
      reg = collage.collage_loss_for_velocity_model(
          lambda p, zz, tt: model.apply({"params": p}, zz, tt, y), params, z, t,
          key=k_reg, patch_size=cfg.loss.reg_patch_size, num_probes=cfg.loss.reg_probes)
      aux["collage_reg"] = reg
      loss = loss + cfg.loss.mu_reg * reg
    return loss, aux

  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, metrics = train_state.apply_gradients(state, grads, setup.tx,
                                                   cfg.train.ema_decay, loss)
  metrics.update(learning_rate=setup.lr_schedule(state.step), **aux)
  return new_state, metrics


def compile_train_step(setup: Setup, mesh, root_key: jax.Array) -> jax.stages.Compiled:
  """`train_step` jitted over `mesh`, compiled on shapes and memory checked (loop.compile_step)."""
  return loop.compile_step(setup, mesh, root_key, setup.frozen(mesh))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *,
                       devices=None) -> dict[str, Any]:
  """Trains `config` in `workdir` (resuming its latest checkpoint), then samples and evaluates.

  Args:
    config: a config from configs/ (see base_config.py for every key).
    workdir: a local folder or a gs:// URL (runtime/storage.py) for checkpoints,
      config.json, metrics.jsonl, tensorboard/, samples/, eval.json.
    devices: the devices of the mesh (default: all devices of all processes).
  Returns:
    A summary: final step, last metrics, eval results, the PNG grids, whether it was
    preempted, and the final `state` (TrainState).
  """
  return loop.train(lambda: Setup(config, devices), config, workdir, devices=devices)


def load_trained(workdir, config: ml_collections.ConfigDict | None = None, *,
                 setup: Setup | None = None) -> tuple[Setup, train_state.TrainState]:
  """(setup, state) of the latest checkpoint in a trained workdir, for sampling and analysis.

  Needs only the workdir (a local folder or a gs:// URL): the image shape comes from
  the checkpoint, so the training data is never opened.
  config: the run's config; None reads `workdir/config.json`. A config of another
  model is refused with the differing keys listed (checkpointing.Checkpointer).
  setup: a `Setup` already built (e.g. to check inputs before restoring).
  """
  path = storage.check_bucket(workdir, "workdir")
  config = loader.read_config(workdir) if config is None else config
  if setup is None:
    setup = Setup(config, image_shape=loader.saved_image_shape(path))
  ckpt = checkpointing.Checkpointer(workdir, config, setup.pixel_shape, every=1, keep=None,
                                    read_only=True)
  try:
    ckpt.check_compatible(training=False)
    state = ckpt.restore(setup.abstract_state)
  finally:
    ckpt.close()
  if state is None:
    raise checks.InputError(f"workdir {str(workdir)!r} has no checkpoint to sample from.")
  return setup, state


def _write_grids(generator, state, cfg, setup, workdir, name) -> dict[str, str]:
  # The inpainting references come from the test split, which training has at hand.
  test = datasets.get_dataset(cfg.data.dataset, "test", data_dir=cfg.data.data_dir or None,
                              **dict(cfg.data.options))
  refs = np.stack([test[i]["image"] for i in range(min(16, len(test)))])
  key = jax.random.fold_in(jax.random.key(cfg.seed), 2 ** 30 + 1)
  paths = generate.write_grids(generator, state.ema_params, cfg.sample, refs, key,
                               workdir / "samples" / name,
                               progress=bool(cfg.train.progress_bar))
  return paths if multihost.is_writer() else {}


def _evaluate(generator, state, cfg, setup, workdir) -> dict[str, Any]:
  """The evaluators of config.evaluate.at_end on the EMA parameters, into eval.json."""
  result: dict[str, Any] = {"step": int(jax.device_get(state.step)),
                            "dataset": cfg.data.dataset}
  shards = 1 if generator.mesh is None else generator.mesh.size
  total = evaluators.num_updates(setup.evaluators, cfg, shards)
  with progress_lib.bar(total, "evaluation",
                        enabled=bool(cfg.train.progress_bar) and total > 0) as bar:
    ctx = evaluators_base.Context(generator, state.ema_params, cfg,
                                  image_shape=setup.pixel_shape, key=jax.random.key(cfg.seed),
                                  mesh=generator.mesh, bar=bar)
    result.update(evaluators.run(setup.evaluators, ctx)[0])
  if multihost.is_writer():
    storage.write_text_atomic(workdir / "eval.json", json.dumps(result, indent=2))
  return result
