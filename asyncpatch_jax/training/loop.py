"""The training loop every trainer runs: resume or initialise, step, log, save, stop.

`initial_state` restores the workdir's newest verified checkpoint or initialises a fresh
state; `run_steps` runs a compiled step over the steps left, writes metrics, saves every
`train.checkpoint_every` steps, stops at the first non-finite loss, and on SIGTERM or
Ctrl-C saves the current step and stops (`preempted`; the exit code is
`interrupt_exit_code()`). The diffusion model (train.py), the autoencoder
(autoencoder_train.py) and the uncertainty head (head_train.py) each supply a setup and
a step and call these.
"""

from __future__ import annotations

import abc
import functools
import os
import signal
import sys
import time
from typing import Any, Callable, Iterable

import jax
import ml_collections
import numpy as np
from absl import logging

from asyncpatch_jax.data import input_pipeline
from asyncpatch_jax.runs import checkpointing
from asyncpatch_jax.runs import run_lock
from asyncpatch_jax.runtime import progress as progress_lib
from asyncpatch_jax.runtime import sharding
from asyncpatch_jax.runtime import storage
from asyncpatch_jax.training import memory
from asyncpatch_jax.training import metric_writer
from asyncpatch_jax.training import train_state


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


class Trainer(abc.ABC):
  """What a trainer gives the loop: a state, a step, its data and its checkpoint's identity.

  A subclass is built from a config (validated, nothing allocated) and sets `config`,
  `source` (the training data), `abstract_state` (`jax.eval_shape` of `init_state`),
  `checkpoint_shape` (the [H, W, C] its checkpoints record) and `step_fn`.
  """
  config: ml_collections.ConfigDict
  source: Any
  abstract_state: Any
  checkpoint_shape: tuple[int, ...]
  what = "train step"          # the step's name in the compile and memory messages
  remat: str | None = None     # the model.remat of the network the step trains, if any

  @abc.abstractmethod
  def init_state(self, key: jax.Array):
    """A fresh state (params, optimizer state, step 0, ...)."""

  # The step: `step_fn(state, batch, *frozen, setup=trainer, root_key=...) -> (state,
  # metrics)` on the global batch (jitted, state donated); a module-level function.
  step_fn: Callable

  class_conditional = False    # whether the step reads the labels

  def batch(self, step: int, local: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays the step reads, from this process's share of step `step`'s batch: the
    images, and the labels when `class_conditional`."""
    del step
    return {k: local[k] for k in (("image", "label") if self.class_conditional else ("image",))}

  def example(self) -> dict[str, np.ndarray]:
    """One example's arrays as the step reads them (shapes and dtypes for compiling)."""
    return self.batch(0, self.source[0])

  def frozen(self, mesh) -> tuple[tuple[Any, Any], ...]:
    """((value, sharding), ...) of the frozen inputs the step takes after the batch."""
    del mesh
    return ()

  def checkpoint_model(self) -> dict | None:
    """What its checkpoints record as the model (None: config.model)."""
    return None

  @abc.abstractmethod
  def describe(self, start: int, total: int, mesh) -> str:
    """The log line announcing the run."""

  def postfix(self, scalars: dict) -> dict:
    """The progress bar's postfix for a step's metrics."""
    return {"loss": f"{scalars['loss']:.4f}"}

  def after_step(self, done: int, state, workdir) -> None:
    """Runs after each step's bookkeeping (e.g. intermediate grids)."""

  def finish(self, summary: dict[str, Any], workdir, completed: bool) -> dict[str, Any]:
    """The summary after the last step (`completed`: it reached train.num_steps)."""
    del workdir, completed
    return summary


def jit_step(trainer: Trainer, mesh, root_key: jax.Array, frozen
             ) -> tuple[Callable, Callable[[int], tuple]]:
  """(`trainer.step_fn` jitted over `mesh` with its state donated, its abstract arguments).

  The second is `batch_size -> (state, global batch, *frozen)` as `jax.ShapeDtypeStruct`s
  with their shardings: `jitted.lower(*abstract_args(n)).compile()` compiles the step
  training runs at a global batch of n without allocating anything (`compile_step`;
  experiments/benchmarks/bench_memory.py at several batch sizes).
  """
  state_shardings = sharding.state_shardings(trainer.abstract_state, mesh)
  example = trainer.example()
  frozen_shardings = tuple(s for _, s in frozen)
  step_fn = jax.jit(functools.partial(trainer.step_fn, setup=trainer, root_key=root_key),
                    in_shardings=(state_shardings, sharding.batch_sharding(mesh),
                                  *frozen_shardings),
                    out_shardings=(state_shardings, sharding.replicated(mesh)),
                    donate_argnums=(0,))

  def abstract_args(batch_size):
    return (memory.with_shardings(trainer.abstract_state, state_shardings),
            memory.abstract_batch(example, batch_size, sharding.batch_sharding(mesh)),
            *(memory.with_shardings(v, s) for v, s in frozen))

  return step_fn, abstract_args


def compile_step(trainer: Trainer, mesh, root_key: jax.Array, frozen) -> jax.stages.Compiled:
  """`trainer.step_fn` jitted over `mesh` (state donated), compiled on shapes, memory checked.

  Nothing is allocated: the state, the global batch of `train.batch_size` and the frozen
  inputs are `jax.ShapeDtypeStruct`s with their shardings (`jit_step`);
  memory.compile_train_step raises InputError when the step does not fit the devices.
  Call the result as `step(state, batch, *frozen)`.
  """
  step_fn, abstract_args = jit_step(trainer, mesh, root_key, frozen)
  return memory.compile_train_step(step_fn, abstract_args, config=trainer.config, mesh=mesh,
                                   params=trainer.abstract_state.params, what=trainer.what,
                                   remat=trainer.remat)


def train(make_trainer: Callable[[], Trainer], config: ml_collections.ConfigDict, workdir, *,
          devices=None) -> dict[str, Any]:
  """Trains in `workdir`, resuming its newest checkpoint: the skeleton every trainer shares.

  In order: distributed start-up; the trainer (its settings validated, nothing allocated);
  the workdir checked writable and free (runs/run_lock.py) before anything compiles; the
  mesh and shardings; the step compiled on shapes and checked against the devices'
  memory; then the workdir is created and locked, the checkpoint checked against this
  config, `config.json` written, the state restored or initialised, and the steps run
  (`run_steps`: logging, checkpoints, the non-finite stop, SIGTERM and Ctrl-C). The
  metric writer and the checkpointer are closed whatever happens.

  Returns the summary of `run_steps` as `trainer.finish` completes it.
  """
  sharding.maybe_initialize_distributed()
  trainer = make_trainer()                 # bad settings stop before the workdir is touched
  storage.precheck_writable(workdir, "workdir")  # a bad workdir stops before compiling
  run_lock.check_free(workdir, config.train.get("lock_timeout", run_lock.DEFAULT_TIMEOUT))
  cfg = config
  mesh = sharding.make_mesh(cfg.train.fsdp, devices)
  state_shardings = sharding.state_shardings(trainer.abstract_state, mesh)
  root_key = jax.random.key(cfg.seed)
  frozen = trainer.frozen(mesh)
  # Compiled on shapes alone and checked against the devices' memory before anything is
  # allocated or written (a resumed run's state has these shapes too).
  step_fn = compile_step(trainer, mesh, root_key, frozen)
  workdir = storage.check_writable(workdir, "workdir")
  ckpt = checkpointing.Checkpointer(workdir, cfg, trainer.checkpoint_shape,
                                    every=cfg.train.checkpoint_every,
                                    keep=cfg.train.keep_checkpoints,
                                    model=trainer.checkpoint_model())
  writer = None
  try:
    ckpt.check_compatible()
    ckpt.write_config_json()
    state = initial_state(ckpt, trainer.init_state, trainer.abstract_state, state_shardings,
                          root_key)
    start, total = int(jax.device_get(state.step)), cfg.train.num_steps
    logging.info("%s", trainer.describe(start, total, mesh))
    frozen_values = tuple(jax.device_put(v, s) for v, s in frozen)
    pipeline = input_pipeline.InputPipeline(trainer.source, cfg.train.batch_size, seed=cfg.seed)
    writer = metric_writer.MetricWriter(workdir, start)
    step_args = ((input_pipeline.make_global_batch(trainer.batch(step, local), mesh),
                  *frozen_values)
                 for step, local in enumerate(pipeline.iterate(start, total - start), start))
    summary = run_steps(cfg, state, step_fn, step_args, ckpt, writer, postfix=trainer.postfix,
                        after_step=lambda done, s: trainer.after_step(done, s, workdir))
    completed = not summary["preempted"] and summary["step"] >= total
    return trainer.finish(summary, workdir, completed)
  finally:
    if writer is not None:
      writer.close()
    ckpt.close()
