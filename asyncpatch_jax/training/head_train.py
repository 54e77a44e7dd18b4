"""Training an uncertainty head on top of a frozen trained model (AsyncPatch Sec. 5.5).

`train_head(config, workdir)` is what `train.train_and_evaluate` runs for a config whose
`uncertainty.model_workdir` names a trained workdir: it restores that workdir's model
(EMA parameters, frozen: they are an input of the step, never updated or donated) and
trains models/uncertainty_head.py with the Gaussian NLL of the velocity target under the
frozen prediction (SRM / Patch Forcing), on the model's own dataset and with the model's
own timestep sampler and label dropout. The machinery is the model's: one jitted step
with donated head state over the ('data', 'fsdp') mesh, per-process batches assembled
into a global array (input_pipeline), `fold_in(root_key, step)` randomness, orbax
checkpoints resumed before anything else, SIGTERM saves, metrics.jsonl/TensorBoard.

The head's checkpoints live in their own workdir and record the model they belong to
(its model config, image shape, step and a SHA-256 fingerprint of the frozen parameters);
resuming or loading a head with any other model is refused with the differences listed.
The config's own data, model and timesteps sections are not used.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from asyncpatch_jax import models
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.data import datasets
from asyncpatch_jax.diffusion import flow
from asyncpatch_jax.diffusion import timesteps
from asyncpatch_jax.models import uncertainty_head
from asyncpatch_jax.runs import loader
from asyncpatch_jax.runtime import sharding
from asyncpatch_jax.training import loop
from asyncpatch_jax.training import train_state


def head_update(state: train_state.TrainState, x: jax.Array, y, frozen, key: jax.Array, *,
                head: uncertainty_head.UncertaintyHead, tx: optax.GradientTransformation,
                velocity_fn, noise_level_sampler, ema_decay: float, lr_schedule=None):
  """One head step on clean images x [B, H, W, C]: pure, for any frozen velocity function.

  velocity_fn(frozen, z, t, y) -> v_hat is the frozen model (a UNet's apply, or the exact
  Gaussian field in the tests); noise_level_sampler(key, B, H, W) -> t [B, H, W].
  """
  k_t, k_eps = jax.random.split(key)
  b, h, w, _ = x.shape
  t = noise_level_sampler(k_t, b, h, w)
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  z = flow.add_noise(x, eps, t)
  v = flow.velocity_target(x, eps)
  v_hat = jax.lax.stop_gradient(velocity_fn(frozen, z, t, y)).astype(jnp.float32)

  def loss_fn(params):
    logvar = head.apply({"params": params}, z, t, v_hat)
    return uncertainty_head.gaussian_nll(logvar, v, v_hat, t), logvar

  (loss, logvar), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  new_state, metrics = train_state.apply_gradients(state, grads, tx, ema_decay, loss)
  err2 = jnp.mean(jnp.square(v - v_hat), axis=-1)
  weight = (t > 0).astype(jnp.float32)
  n = jnp.maximum(jnp.sum(weight), 1.0)
  # The frozen model's velocity MSE (constant in the head's parameters) and the
  # calibration E[err^2 / sigma^2] (1 for a calibrated head), over t > 0.
  metrics.update(velocity_mse=jnp.sum(weight * err2) / n,
                 calibration=jnp.sum(weight * err2 * jnp.exp(-logvar)) / n,
                 mean_logvar=jnp.sum(weight * logvar) / n)
  if lr_schedule is not None:
    metrics["learning_rate"] = lr_schedule(state.step)
  return new_state, metrics


class HeadSetup(loop.Trainer):
  """The frozen model (restored), the head, its optimizer: validated before compiling."""

  def __init__(self, config: ml_collections.ConfigDict, devices=None):
    self.config = cfg = config
    model_workdir = cfg.uncertainty.model_workdir
    if not model_workdir:
      raise checks.InputError("uncertainty.model_workdir is empty; set it to the trained "
                              "workdir whose model the head extends.")
    for key in ("num_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
      checks.check_positive_int(cfg.train[key], f"train.{key}")
    checks.check_choice(cfg.optim.decay, ("cosine", "constant"), "optim.decay")
    self.head = uncertainty_head.build_head(cfg.uncertainty)
    n_dev = jax.device_count() if devices is None else len(devices)
    if cfg.train.batch_size % n_dev:
      raise checks.InputError(f"train.batch_size={cfg.train.batch_size} is not divisible by the "
                              f"{n_dev} devices.")
    # The model's data (the head trains on it) and its latest checkpoint (refused if it is
    # not that config's model).
    model_config = loader.read_config(model_workdir)
    data = model_config.data
    self.source = datasets.get_dataset(data.dataset, "train", data_dir=data.data_dir or None,
                                       **dict(data.options))
    run = loader.load_run(model_workdir, model_config)
    loader.check_model(run.model, model_config, run.image_shape, self.source.num_classes)
    self.model = run.model
    self.image_shape = self.checkpoint_shape = run.image_shape
    self.step_fn = head_train_step
    self.frozen_params = run.params
    self.identity = loader.frozen_identity(model_config.model, self.image_shape, self.frozen_params,
                                           run.step)
    self.label_dropout = model_config.train.label_dropout
    self.noise_level_sampler = timesteps.NoiseLevelSampler.from_config(
        model_config.timesteps, token_size=models.patch_size(self.model))
    self.tx, self.lr_schedule = train_state.make_optimizer(
        cfg.optim, cfg.train.num_steps, flatten=cfg.train.fsdp == 1)
    self.abstract_state = jax.eval_shape(self.init_state, jax.random.key(0))

  def init_state(self, key: jax.Array) -> train_state.TrainState:
    params = self.head.init(key, *uncertainty_head.example_inputs(self.image_shape))["params"]
    return train_state.create(params, self.tx)

  def velocity(self, frozen, z, t, y):
    return self.model.apply({"params": frozen}, z, t, y)

  # -- the loop's trainer interface (loop.Trainer) --------------------------------------------

  what = "uncertainty head's train step"

  @property
  def class_conditional(self) -> bool:
    return bool(self.model.num_classes)

  def frozen(self, mesh):
    # The frozen model is an argument of the step, so the memory check counts it.
    return ((self.frozen_params, sharding.state_shardings(self.frozen_params, mesh)),)

  def checkpoint_model(self):
    return loader.head_meta_model(self.config.uncertainty, self.identity)

  def describe(self, start, total, mesh):
    return (f"Training an uncertainty head for {self.config.uncertainty.model_workdir} "
            f"(frozen model step {self.identity['step']}, fingerprint "
            f"{self.identity['fingerprint'][:12]}) from step {start} to {total}.")

  def postfix(self, scalars):
    return {"nll": f"{scalars['loss']:.4f}", "calib": f"{scalars['calibration']:.2f}"}

  def finish(self, summary, workdir, completed):
    del workdir, completed
    summary.update(frozen_model=self.identity, frozen=self.frozen_params)
    return summary


def head_train_step(state, batch, frozen, *, setup: HeadSetup, root_key):
  """The jitted step of `train_head`: the model's label dropout, then `head_update`."""
  key = jax.random.fold_in(root_key, state.step)
  k_label, k_update = jax.random.split(key)
  model = setup.model
  y = None
  if model.num_classes:
    drop = jax.random.bernoulli(k_label, setup.label_dropout,
                                batch["label"].shape)
    y = jnp.where(drop, model.null_label, batch["label"]).astype(jnp.int32)
  return head_update(state, batch["image"], y, frozen, k_update, head=setup.head, tx=setup.tx,
                     velocity_fn=setup.velocity,
                     noise_level_sampler=setup.noise_level_sampler,
                     ema_decay=setup.config.train.ema_decay, lr_schedule=setup.lr_schedule)


def train_head(config: ml_collections.ConfigDict, workdir: str, *, devices=None) -> dict[str, Any]:
  """Trains the head of `config.uncertainty` in `workdir` (resuming its latest checkpoint).

  Returns a summary: step, last metrics, whether it was preempted, the frozen model's
  identity, the final `state` (head TrainState) and the `frozen` parameters it used.
  """
  return loop.train(lambda: HeadSetup(config, devices), config, workdir, devices=devices)
