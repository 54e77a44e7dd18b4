"""RePaint (Lugmayr et al. 2022): inpainting with resampling jumps, for a rectified-flow velocity field.

RePaint's schedule (`get_schedule_jump` of the paper's code, Sec. 4.2 "resampling")
visits integer times t_T - 1, t_T - 2, ..., -1; at every multiple j of `jump_length`
below t_T - jump_length it goes back up `jump_length` steps, `jump_n_sample - 1` times
in all, and walks down again. With the defaults 250 / 10 / 10: 2410 model steps and
2160 steps back up (Lugmayr et al. 2022, `get_schedule_jump`; docs/conventions.md,
"RePaint on rectified flow").

For rectified flow (z_t = (1 - t) x + t eps), index i is the time t = (i + 1) / t_T,
so index t_T - 1 is pure noise and -1 is the clean image. A step down from t to s < t
first replaces the known region (mask = 1) with the clean image noised to t with fresh
noise, (1 - t) x + t eps (RePaint Eq. 8, "x_known"), then runs the model and the
project's DDIM step (samplers.ddim_step; eta = 1 is RePaint's ancestral DDPM step).
A step back up from t to t' > t is the forward transition of the flow,
z_t' = ((1 - t') / (1 - t)) z_t + sqrt(t'^2 - ((1 - t') / (1 - t))^2 t^2) eps
(guidance.renoise). The known pixels of the result are the input's, bit for bit.

The whole list is data of one `lax.scan` inside one `jax.jit`, so a sampler compiles
once per (shapes, list length).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.diffusion import flow
from asyncpatch_jax.diffusion import guidance
from asyncpatch_jax.diffusion import samplers


def _check_params(num_steps, jump_length, jump_n_sample) -> tuple[int, int, int]:
  num_steps = checks.check_positive_int(num_steps, "num_steps")
  jump_length = checks.check_positive_int(jump_length, "jump_length")
  jump_n_sample = checks.check_positive_int(jump_n_sample, "jump_n_sample")
  if jump_length > num_steps or num_steps % jump_length:
    raise checks.InputError(f"jump_length={jump_length} must divide num_steps={num_steps} "
                            "(RePaint's defaults are 250 / 10 / 10).")
  return num_steps, jump_length, jump_n_sample


def jump_schedule(num_steps: int = 250, jump_length: int = 10,
                  jump_n_sample: int = 10) -> np.ndarray:
  """The integer time indices RePaint visits, in order: [L] int32, from num_steps - 1 to -1.

  RePaint's `get_schedule_jump` (with its second and third jump levels off): walk down
  one index at a time; on reaching a multiple j of jump_length with j < num_steps -
  jump_length that has jumps left (jump_n_sample - 1 each), go back up jump_length
  indices one at a time. A decrease is a model step, an increase a re-noising step.
  """
  num_steps, jump_length, jump_n_sample = _check_params(num_steps, jump_length, jump_n_sample)
  jumps = {j: jump_n_sample - 1 for j in range(0, num_steps - jump_length, jump_length)}
  t, times = num_steps, []
  while t >= 1:
    t -= 1
    times.append(t)
    if jumps.get(t, 0) > 0:
      jumps[t] -= 1
      for _ in range(jump_length):
        t += 1
        times.append(t)
  times.append(-1)
  return np.asarray(times, np.int32)


def params_for_budget(budget: int, jump_length: int) -> tuple[int, int, int]:
  """RePaint's (num_steps, jump_length, jump_n_sample) spending exactly `budget` network
  evaluations at this jump length, with at least one resampling (jump_n_sample >= 2):
  the most steps, so the fewest resamplings (budget 50, jump length 5: 20 / 5 / 3).

  A schedule of n steps costs n + (jump_n_sample - 1) * jump_length * (n / jump_length - 1)
  evaluations (50 / 5 / 5: 230; 250 / 10 / 10: 2410)."""
  budget = checks.check_positive_int(budget, "budget")
  jump_length = checks.check_positive_int(jump_length, "jump_length")
  for num_steps in range(budget - budget % jump_length, jump_length, -jump_length):
    rounds = num_steps // jump_length - 1          # the jump points below the top
    extra = budget - num_steps
    if rounds and extra > 0 and extra % (jump_length * rounds) == 0:
      return num_steps, jump_length, extra // (jump_length * rounds) + 1
  raise checks.InputError(f"no RePaint schedule with jump_length={jump_length} spends exactly "
                          f"{budget} network evaluations with a resampling; try another "
                          "budget or jump length (jump length 1 fits every budget from 3).")


def schedule_times(indices, num_steps: int) -> np.ndarray:
  """Rectified-flow times t = (i + 1) / num_steps of RePaint indices i (float32, [L])."""
  return ((np.asarray(indices, np.float64) + 1.0) / num_steps).astype(np.float32)


def num_model_steps(indices) -> int:
  """Network evaluations of a jump schedule: its decreasing transitions."""
  indices = np.asarray(indices)
  return int(np.sum(indices[1:] < indices[:-1]))


def repaint_loop(velocity_fn: samplers.VelocityFn, times: jax.Array, x: jax.Array,
                 mask: jax.Array, key: jax.Array, eta: jax.Array | float = 1.0,
                 cond: dict | None = None) -> jax.Array:
  """RePaint over a list of times; pure and traceable (see `RePaint` for the compiled one).

  Args:
    velocity_fn: v_hat = velocity_fn(z [B, H, W, C], t_map [B, H, W], **cond).
    times: [L] float times in [0, 1], starting at 1 and ending at 0; a step down runs
      the model, a step up re-noises.
    x: [B, H, W, C] the images whose known pixels are kept.
    mask: [B, H, W], 1 = known.
    key: PRNG key; transition k draws from fold_in(key, k + 1), the start from fold_in(key, 0).
    eta: DDIM stochasticity of the steps down (1 = RePaint's ancestral DDPM step).
  Returns:
    [B, H, W, C]: generated where mask = 0, exactly x where mask = 1.
  """
  cond = cond or {}
  b, h, w, _ = x.shape
  known = (mask > 0)[..., None]
  z0 = jax.random.normal(jax.random.fold_in(key, 0), x.shape, x.dtype)

  def step(z, inputs):
    t, s, k = inputs
    kk = jax.random.fold_in(key, k + 1)
    noise = jax.random.normal(jax.random.fold_in(kk, 0), z.shape, z.dtype)
    t_map, s_map = jnp.full((b, h, w), t, z.dtype), jnp.full((b, h, w), s, z.dtype)

    def down(z):
      eps = jax.random.normal(jax.random.fold_in(kk, 1), z.shape, z.dtype)
      z = jnp.where(known, flow.add_noise(x, eps, t_map), z)          # x_known at time t
      v = velocity_fn(z, t_map, **cond).astype(z.dtype)
      return samplers.ddim_step(z, v, t_map, s_map, eta, noise)

    def up(z):
      return guidance.renoise(z, t_map, s_map, noise)

    return jax.lax.cond(s < t, down, up, z), None

  steps = jnp.arange(times.shape[0] - 1)
  z, _ = jax.lax.scan(step, z0, (times[:-1], times[1:], steps))
  return jnp.where(known, x, z)


class RePaint:
  """A compiled RePaint inpainter for one velocity function (any model, e.g. a `global` one).

  repaint = RePaint(velocity_fn)
  out = repaint(x, mask, key=key, num_steps=250, jump_length=10, jump_n_sample=10, **cond)

  `velocity_fn(z, t_map, **cond)` is any rectified-flow velocity field: a closed-form
  one (gaussian.GaussianVelocity) or a UNet's (`guidance.model_velocity_fn(model)`
  with `params=...`, `y=...`; wrap it in `guidance.classifier_free` for CFG). Compiles
  once per (shapes, schedule length); the schedule, key, eta and conditioning are
  traced. With a mesh the batch is sharded over its `data` axis as in samplers.Sampler.
  """

  def __init__(self, velocity_fn: samplers.VelocityFn, *, mesh: jax.sharding.Mesh | None = None,
               batched_cond: Sequence[str] = ("y",)):
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
      raise checks.InputError(f"mesh={mesh!r}; expected a jax.sharding.Mesh with a 'data' axis or None.")
    self.velocity_fn = velocity_fn
    self.mesh = mesh
    self.batched_cond = tuple(batched_cond)
    self._run = jax.jit(functools.partial(repaint_loop, velocity_fn))

  def __call__(self, x, mask, *, key: jax.Array, num_steps: int = 250, jump_length: int = 10,
               jump_n_sample: int = 10, eta: float = 1.0, **cond) -> jax.Array:
    """Inpaints x [B, H, W, C] where mask ([H, W] or [B, H, W], 1 = known) is 0."""
    checks.check_image(x, "x")
    b, h, w, _ = np.shape(x)
    mask = np.asarray(mask)
    mask = checks.check_mask(np.broadcast_to(mask, (b, h, w)) if mask.shape == (h, w) else mask,
                             (b, h, w))
    if not 0.0 <= float(eta) <= 1.0:
      raise checks.InputError(f"eta={eta}; expected a value in [0, 1] (1 = RePaint's DDPM step).")
    times = jnp.asarray(schedule_times(jump_schedule(num_steps, jump_length, jump_n_sample),
                                       num_steps))
    place = functools.partial(samplers.place, self.mesh, batch=b)
    batched = {k: v for k, v in cond.items() if k in self.batched_cond}
    shared = {k: v for k, v in cond.items() if k not in self.batched_cond}
    cond = {**place(batched, True), **place(shared, False)}
    x = place(jnp.asarray(x, jnp.float32), True)
    mask = place(jnp.asarray(mask), True)
    return self._run(place(times, False), x, mask, key, jnp.float32(eta), cond)
