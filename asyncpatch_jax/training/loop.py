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

import os
import signal
import sys
import time
from typing import Any, Callable, Iterable

import jax
from absl import logging

from asyncpatch_jax.runtime import progress as progress_lib
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
