"""`train_and_evaluate(config, workdir)`: the sharded training loop, resumable from its workdir.

One compiled train step (donated state) runs over a ('data', 'fsdp') mesh; the batch
of step k is a pure function of (seed, k) assembled into a global jax.Array from
each process's share; all randomness is `fold_in(root_key, step)`. The latest
checkpoint in the workdir is restored before anything else, so a preempted or
killed run continues bit-for-bit (on CPU) as if it had not been interrupted.
AsyncPatch Sec. 3.1 and App. E; shared/SPEC.md section 2.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import time
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from asyncpatch_jax.runs import checkpointing
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import progress as progress_lib
from asyncpatch_jax.data import datasets
from asyncpatch_jax.diffusion import flow
from asyncpatch_jax.generation import generate
from asyncpatch_jax.data import input_pipeline
from asyncpatch_jax.runtime import storage
from asyncpatch_jax.training import memory
from asyncpatch_jax.training import metric_writer
from asyncpatch_jax import models
from asyncpatch_jax.runs import run_lock
from asyncpatch_jax.runtime import sharding
from asyncpatch_jax.diffusion import timesteps
from asyncpatch_jax.training import train_state


class Setup:
  """Everything built from a config before compiling: validated, nothing allocated.

  Args:
    config: the experiment config.
    devices: the devices training will use (default: all).
    image_shape: build without a dataset for this [H, W, C] (benchmarks, and sampling
      from a workdir, whose checkpoints record it); by default the training source
      is opened and gives the shape.
  """

  def __init__(self, config: ml_collections.ConfigDict, devices=None, image_shape=None):
    self.config = cfg = config
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
    self.pixel_shape = self.image_shape
    self.codec = None
    latent_cfg = cfg.get("latent")
    if latent_cfg is not None and latent_cfg.autoencoder_workdir:
      # Latent AsyncPatch (Sec. 5.2): the UNet diffuses a frozen autoencoder's latents.
      from asyncpatch_jax.runs import latent_codec as latent  # pylint: disable=g-import-not-at-top
      self.codec = latent.LatentCodec.load(latent_cfg.autoencoder_workdir, self.pixel_shape,
                                           latent_cfg.scale, cfg.model)
      self.image_shape = self.codec.latent_shape
    self.model = models.build_unet(cfg.model)
    if self.model.out_channels != self.image_shape[-1]:
      raise checks.InputError(f"model.out_channels={self.model.out_channels} but dataset "
                       f"{cfg.data.dataset!r} has {self.image_shape[-1]} channels; set "
                       f"--config.model.out_channels={self.image_shape[-1]}.")
    num_classes = self.source.num_classes if self.source is not None else self.model.num_classes
    if self.model.num_classes and self.model.num_classes != (num_classes or 0):
      raise checks.InputError(f"model.num_classes={self.model.num_classes} but dataset "
                       f"{cfg.data.dataset!r} has {num_classes or 'no'} classes; "
                       f"set --config.model.num_classes={num_classes or 0}.")
    ts = cfg.timesteps
    self.timestep_sampler = timesteps.TimestepSampler(
        name=ts.sampler, t_min=ts.t_min, t_max=ts.t_max,
        patch_sizes=tuple(ts.patch_sizes) or None, perlin_cells=tuple(ts.perlin_cells),
        perlin_octaves=ts.perlin_octaves, perlin_threshold=tuple(ts.perlin_threshold),
        antithetic=ts.antithetic)
    h, w, _ = self.image_shape
    if ts.sampler in ("patchwise", "asyncpatch"):
      self.timestep_sampler.patch_sizes_for(h, w)
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
  t = setup.timestep_sampler(k_t, b, h, w)                       # [B, H, W]
  eps = jax.random.normal(k_eps, x.shape, x.dtype)
  z = flow.add_noise(x, eps, t)
  target = flow.velocity_target(x, eps)
  y = None
  if model.num_classes:
    drop = jax.random.bernoulli(k_label, cfg.train.label_dropout, (b,))
    y = jnp.where(drop, model.null_label, batch["label"]).astype(jnp.int32)

  def loss_fn(params):
    v_hat = model.apply({"params": params}, z, t, y, train=True, rngs={"dropout": k_dropout})
    loss = jnp.mean(flow.per_pixel_loss(target, v_hat, t, cfg.loss.weighting, cfg.loss.bias))
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
  updates, opt_state = setup.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = train_state.ema_update(state.ema_params, params,
                               train_state.ema_decay_at(state.step, cfg.train.ema_decay))
  grad_norm = optax.tree.norm(grads)
  bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
  # The first non-finite step is recorded; the host loop checks it before every save and
  # at every log, and stops there, so no checkpoint ever holds a state past it.
  new_state = train_state.TrainState(
      step=state.step + 1, params=params, ema_params=ema, opt_state=opt_state,
      nonfinite_step=jnp.where((state.nonfinite_step < 0) & bad, state.step,
                               state.nonfinite_step))
  metrics = {"loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
             "update_norm": optax.tree.norm(updates),
             "learning_rate": setup.lr_schedule(state.step), **aux}
  return new_state, metrics


def compile_train_step(setup: Setup, mesh, root_key: jax.Array) -> jax.stages.Compiled:
  """`train_step` jitted over `mesh` (state donated), compiled on shapes, memory checked.

  Nothing is allocated: the state, the global batch of `train.batch_size` and the frozen
  autoencoder are `jax.ShapeDtypeStruct`s with their shardings. Logs the parameter count
  and the estimated peak memory per device, and raises InputError when the step does not
  fit the devices (memory.compile_train_step). Call the result as
  `step(state, batch, *frozen)`, with arrays of those shapes and shardings.
  """
  state_shardings = sharding.state_shardings(setup.abstract_state, mesh)
  keys = ("image", "label") if setup.model.num_classes else ("image",)
  example = {k: setup.source[0][k] for k in keys}
  frozen = () if setup.codec is None else (setup.codec.variables,)
  step_fn = jax.jit(functools.partial(train_step, setup=setup, root_key=root_key),
                    in_shardings=(state_shardings, sharding.batch_sharding(mesh))
                    + (sharding.replicated(mesh),) * len(frozen),
                    out_shardings=(state_shardings, sharding.replicated(mesh)),
                    donate_argnums=(0,))

  def abstract_args(batch_size):
    return (memory.with_shardings(setup.abstract_state, state_shardings),
            memory.abstract_batch(example, batch_size, sharding.batch_sharding(mesh)),
            *(memory.with_shardings(v, sharding.replicated(mesh)) for v in frozen))

  return memory.compile_train_step(step_fn, abstract_args, config=setup.config, mesh=mesh,
                                   params=setup.abstract_state.params)


class _Preemption:
  """SIGTERM or SIGINT (Ctrl-C) sets a flag; the loop then saves and stops.

  A second SIGINT exits at once (exit code 130, no save). With several processes,
  SIGINT keeps Python's default (KeyboardInterrupt) and SIGTERM goes through orbax's
  `reached_preemption`, which makes the processes agree on the step.
  """

  signum: int | None = None   # the signal that stopped the last run (for the exit code)

  def __init__(self):
    self.requested = False
    self._previous = {}

  def __enter__(self):
    _Preemption.signum = None
    wanted = [signal.SIGTERM] + ([signal.SIGINT] if jax.process_count() == 1 else [])
    for sig in wanted:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread
        pass
    return self

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      sys.stderr.write("\nInterrupted again: exiting now without saving.\n")
      sys.stderr.flush()
      os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access
    self.requested = True
    _Preemption.signum = signum
    if signum == signal.SIGINT:
      sys.stderr.write("\nInterrupted: saving a checkpoint of the current step, then stopping "
                       "(Ctrl-C again to exit at once, without saving).\n")
      sys.stderr.flush()

  def __exit__(self, *exc):
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)


def interrupt_exit_code() -> int:
  """128 + the signal that stopped the last training run: 130 (SIGINT) or 143 (SIGTERM)."""
  return 128 + (_Preemption.signum or signal.SIGTERM)


def _check_finite(state: train_state.TrainState, last_metrics: dict | None) -> None:
  bad = int(jax.device_get(state.nonfinite_step))
  if bad >= 0:
    loss = None if last_metrics is None else float(jax.device_get(last_metrics["loss"]))
    raise FloatingPointError(
        f"The loss became non-finite at step {bad} (last logged loss {loss}); training "
        "stopped and no checkpoint was written after it. Lower optim.learning_rate or "
        "check the data; the last good checkpoint is kept in the workdir.")


def initial_state(ckpt, init_state: Callable, abstract_state, state_shardings, root_key):
  """The workdir's latest verified checkpoint, or a fresh state from `init_state(key)`.

  The fresh state's key is `fold_in(root_key, -1)` (never a step's key). On XLA:CPU the
  one-off init program is compiled without backend optimisation (it runs once).
  """
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_state, state_shardings)
  state = ckpt.restore(target)
  if state is None:
    init = jax.jit(init_state, out_shardings=state_shardings)
    options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
    init_key = jax.random.fold_in(root_key, -1 % 2 ** 31)
    state = init.lower(init_key).compile(compiler_options=options)(init_key)
  return state


def run_steps(cfg, state, step_fn: Callable, step_args: Iterable[tuple], ckpt, writer, *,
              postfix: Callable[[dict], dict], after_step: Callable | None = None
              ) -> dict[str, Any]:
  """The training loop shared by the model, the uncertainty head and the autoencoder.

  Runs `state, metrics = step_fn(state, *args)` for the steps from the state's step to
  `cfg.train.num_steps`, one `args` tuple (global batch and any frozen inputs) per step
  from `step_args`. Every `train.log_every` steps it checks the state is finite and writes
  the metrics (with steps/s and images/s); it saves every `train.checkpoint_every` steps,
  at the end, and on SIGTERM / Ctrl-C (then stops, `preempted`); a failed background save
  stops it at the next step (`ckpt.poll`). `postfix(scalars)` is the progress bar's
  postfix; `after_step(done, state)` runs after each step's bookkeeping (e.g. grids).

  Returns {"preempted", "step", "state", "metrics"} (and "signal" when preempted).
  """
  start, total = int(jax.device_get(state.step)), cfg.train.num_steps
  summary: dict[str, Any] = {"preempted": False}
  metrics, done = None, start
  with progress_lib.bar(total, "train", enabled=bool(cfg.train.progress_bar), unit="step",
                        initial=start) as bar, _Preemption() as preemption:
    t_log, n_log = time.time(), 0
    for step, args in zip(range(start, total), step_args):
      state, metrics = step_fn(state, *args)
      done, n_log = step + 1, n_log + 1
      bar.update(1)
      ckpt.poll()              # a failed background save stops training here
      if done % cfg.train.log_every == 0 or done == total:
        scalars = jax.device_get(metrics)
        dt = time.time() - t_log
        scalars.update(steps_per_s=n_log / dt, images_per_s=n_log * cfg.train.batch_size / dt)
        _check_finite(state, metrics)
        writer.write(done, scalars)
        bar.set_postfix(**postfix(scalars))
        t_log, n_log = time.time(), 0
      preempted = (ckpt.reached_preemption(done) if jax.process_count() > 1
                   else preemption.requested)
      if done % cfg.train.checkpoint_every == 0 or done == total or preempted:
        _check_finite(state, metrics)
        ckpt.save(done, state, force=True)
      if after_step is not None and not preempted:
        after_step(done, state)
      if preempted:
        summary["preempted"] = True
        summary["signal"] = signal.Signals(_Preemption.signum or signal.SIGTERM).name
        break
  writer.close()
  ckpt.wait()
  if summary["preempted"]:
    logging.warning("%s: saved step %d, stopping; rerun the same command to resume.",
                    summary["signal"], done)
  summary["step"] = int(jax.device_get(state.step))
  summary["state"] = state
  if metrics is not None:
    summary["metrics"] = {k: float(v) for k, v in jax.device_get(metrics).items()}
  return summary


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
  if "autoencoder" in config:
    # The localized VQ autoencoder of latent AsyncPatch (Sec. 5.2, App. F).
    from asyncpatch_jax.training import autoencoder_train  # pylint: disable=g-import-not-at-top
    return autoencoder_train.train_and_evaluate(config, workdir, devices=devices)
  if "uncertainty" in config and config.uncertainty.model_workdir:
    # An uncertainty head on a trained model's frozen parameters (AsyncPatch Sec. 5.5).
    from asyncpatch_jax.training import head_train  # pylint: disable=g-import-not-at-top
    return head_train.train_head(config, workdir, devices=devices)
  sharding.maybe_initialize_distributed()
  setup = Setup(config, devices)           # bad settings stop before the workdir is touched
  storage.precheck_writable(workdir, "workdir")  # a bad workdir stops before compiling
  run_lock.check_free(workdir, config.train.get("lock_timeout", run_lock.DEFAULT_TIMEOUT))
  cfg = config
  mesh = sharding.make_mesh(cfg.train.fsdp, devices)
  state_shardings = sharding.state_shardings(setup.abstract_state, mesh)
  root_key = jax.random.key(cfg.seed)
  # Compiled on shapes alone and checked against the devices' memory before anything is
  # allocated or written (a resumed run's state has these shapes too); training calls it.
  step_fn = compile_train_step(setup, mesh, root_key)
  workdir = storage.check_writable(workdir, "workdir")
  ckpt = checkpointing.Checkpointer(workdir, cfg, setup.pixel_shape,
                                    every=cfg.train.checkpoint_every,
                                    keep=cfg.train.keep_checkpoints)
  writer = None
  try:
    ckpt.check_compatible()
    ckpt.write_config_json()
    state = initial_state(ckpt, setup.init_state, setup.abstract_state, state_shardings,
                          root_key)
    start = int(jax.device_get(state.step))
    total = cfg.train.num_steps
    logging.info("Training %s from step %d to %d on %d devices (mesh %s), %d parameters.",
                 cfg.data.dataset, start, total, jax.device_count(), dict(mesh.shape),
                 sum(x.size for x in jax.tree.leaves(setup.abstract_state.params)))

    frozen = () if setup.codec is None else (
        jax.device_put(setup.codec.variables, sharding.replicated(mesh)),)
    pipeline = input_pipeline.InputPipeline(setup.source, cfg.train.batch_size, seed=cfg.seed)
    writer = metric_writer.MetricWriter(workdir, start)
    keys = ("image", "label") if setup.model.num_classes else ("image",)
    generator = generate.Generator(setup.model, mesh=None if devices is not None else "auto")

    def after_step(done, state):
      if cfg.train.sample_every and done % cfg.train.sample_every == 0 and done != total:
        _write_grids(generator, state, cfg, setup, workdir, f"step_{done}")

    step_args = ((input_pipeline.make_global_batch({k: local[k] for k in keys}, mesh), *frozen)
                 for local in pipeline.iterate(start, total - start))
    summary = run_steps(cfg, state, step_fn, step_args, ckpt, writer, after_step=after_step,
                        postfix=lambda scalars: {"loss": f"{scalars['loss']:.4f}"})
    state = summary["state"]
    if summary["preempted"] or summary["step"] < total:
      return summary
    if cfg.sample.num_images:
      summary["grids"] = _write_grids(generator, state, cfg, setup, workdir, "final")
    summary["eval"] = _evaluate(generator, state, cfg, setup, workdir)
    return summary
  finally:
    if writer is not None:
      writer.close()
    ckpt.close()


def saved_image_shape(workdir) -> tuple[int, int, int]:
  """The [H, W, C] recorded in the workdir's latest checkpoint; InputError if it has none."""
  meta = checkpointing.saved_meta(workdir)
  if meta is None:
    raise checks.InputError(f"workdir {str(workdir)!r} has no checkpoints; train first "
                            "(python -m asyncpatch_jax.main --config=... --workdir=...).")
  return tuple(meta["image_shape"])


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
  if config is None:
    if not (path / "config.json").is_file():
      raise checks.InputError(f"workdir {str(workdir)!r} has no config.json; train there first "
                              f"(python -m asyncpatch_jax.main --config=configs/default.py "
                              f"--workdir={workdir}).")
    config = ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))
  if setup is None:
    setup = Setup(config, image_shape=saved_image_shape(path))
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
  if setup.codec is not None:
    from asyncpatch_jax.runs import latent_codec as latent  # pylint: disable=g-import-not-at-top
    paths = latent.write_grids(generator, state.ema_params, setup.codec, cfg.sample, refs, key,
                               workdir / "samples" / name)
    return paths if jax.process_index() == 0 else {}
  paths = generate.write_grids(generator, state.ema_params, cfg.sample, refs, key,
                               workdir / "samples" / name,
                               num_classes=setup.model.num_classes,
                               progress=bool(cfg.train.progress_bar))
  return paths if jax.process_index() == 0 else {}


def _evaluate(generator, state, cfg, setup, workdir) -> dict[str, Any]:
  result: dict[str, Any] = {"step": int(jax.device_get(state.step)),
                            "dataset": cfg.data.dataset}
  if cfg.data.dataset == "digits" and cfg.eval.num_samples > 0 and setup.codec is None:
    from asyncpatch_jax.evaluation import end_of_training  # pylint: disable=g-import-not-at-top
    key = jax.random.fold_in(jax.random.key(cfg.seed), 2 ** 30 + 2)
    with progress_lib.bar(end_of_training.num_updates(cfg.sample, cfg.eval), "evaluation",
                          enabled=bool(cfg.train.progress_bar)) as bar:
      result.update(end_of_training.evaluate_digits(generator, state.ema_params, cfg.sample,
                                                    cfg.eval, setup.image_shape, key, bar))
  if jax.process_index() == 0:
    storage.write_text_atomic(workdir / "eval.json", json.dumps(result, indent=2))
  return result
