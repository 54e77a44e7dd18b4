"""The train state (step, params, EMA params, optimizer state) and its optimizer.

AsyncPatch App. E: Adam with gradient clipping, a learning-rate schedule with
warmup, and an EMA of the weights (decay 0.999) used for evaluation.
"""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from asyncpatch_jax.runtime import checks


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the config and the data order (a function of step).

  Attributes:
    step: int32 scalar, number of completed steps.
    params: model parameters (float32).
    ema_params: exponential moving average of params.
    opt_state: optax state.
    nonfinite_step: int32 scalar, the first step whose loss or gradient was not finite
      (-1 if none), so the loop can stop with an error naming the step.
  """
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  nonfinite_step: jax.Array


def check_optim(optim_config) -> None:
  """Range checks of the optimizer and schedule settings (InputError naming the key)."""
  o = optim_config
  checks.check_range(o.learning_rate, "optim.learning_rate", 0, low_open=True)
  checks.check_range(o.b1, "optim.b1", 0, 1, high_open=True)
  checks.check_range(o.b2, "optim.b2", 0, 1, high_open=True)
  checks.check_range(o.eps, "optim.eps", 0, low_open=True)
  checks.check_range(o.weight_decay, "optim.weight_decay", 0)
  checks.check_range(o.grad_clip, "optim.grad_clip", 0, low_open=True,
                     hint="(the global gradient norm is clipped to it)")
  checks.check_range(o.end_lr_ratio, "optim.end_lr_ratio", 0, 1)
  if not (isinstance(o.warmup_steps, int) and o.warmup_steps >= 0) or \
      isinstance(o.warmup_steps, bool):
    raise checks.InputError(f"optim.warmup_steps={o.warmup_steps!r}; expected an integer >= 0.")


def learning_rate_schedule(optim_config, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to end_lr_ratio * peak or constant."""
  peak, warmup = optim_config.learning_rate, optim_config.warmup_steps
  if optim_config.decay == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1), end_value=peak * optim_config.end_lr_ratio)
  if optim_config.decay == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, max(warmup, 1)), optax.constant_schedule(peak)],
        [warmup])
  raise checks.InputError(f"optim.decay={optim_config.decay!r}; expected 'cosine' or 'constant'.")


def make_optimizer(optim_config, num_steps: int, *, flatten: bool = False
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Global-norm clipping, then Adam(W) on the schedule.

  flatten=True runs the (elementwise) optimizer on one concatenated vector: the same
  update, but one fused kernel instead of one per parameter leaf, which halves XLA:CPU
  compile times for small models. Only for unsharded parameters (no FSDP).
  """
  check_optim(optim_config)
  schedule = learning_rate_schedule(optim_config, num_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim_config.grad_clip),
      optax.adamw(schedule, b1=optim_config.b1, b2=optim_config.b2, eps=optim_config.eps,
                  weight_decay=optim_config.weight_decay))
  return (optax.flatten(tx) if flatten else tx), schedule


def create(params, tx: optax.GradientTransformation) -> TrainState:
  """A fresh state at step 0 with EMA = params."""
  return TrainState(step=jnp.int32(0), params=params,
                    ema_params=jax.tree.map(jnp.copy, params), opt_state=tx.init(params),
                    nonfinite_step=jnp.int32(-1))


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
  """min(decay, (1 + step) / (10 + step)): short runs are not dominated by the init."""
  step = step.astype(jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema, params, decay: jax.Array):
  return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def first_nonfinite(state, loss: jax.Array, grad_norm: jax.Array) -> jax.Array:
  """The state's `nonfinite_step` after this step: the first step whose loss or gradient
  norm was not finite (-1 while none was). The host loop checks it before every save and
  at every log and stops there, so no checkpoint ever holds a state past it."""
  bad = ~(jnp.isfinite(loss) & jnp.isfinite(grad_norm))
  return jnp.where((state.nonfinite_step < 0) & bad, state.step, state.nonfinite_step)


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation,
                    ema_decay: float, loss: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimiser step with the EMA (`ema_decay_at`) and the non-finite record:
  (the next state, {loss, grad_norm, param_norm, update_norm})."""
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = ema_update(state.ema_params, params, ema_decay_at(state.step, ema_decay))
  grad_norm = optax.tree.norm(grads)
  new_state = TrainState(step=state.step + 1, params=params, ema_params=ema,
                         opt_state=opt_state,
                         nonfinite_step=first_nonfinite(state, loss, grad_norm))
  return new_state, {"loss": loss, "grad_norm": grad_norm, "param_norm": optax.tree.norm(params),
                     "update_norm": optax.tree.norm(updates)}
