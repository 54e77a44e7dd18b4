"""The spatially asynchronous DDIM sampler: one `lax.scan` over a schedule `tau` inside `jax.jit`.

Every step moves each pixel from its time t = tau[k] to s = tau[k+1] with the DDIM
update for rectified flow (alpha_t = 1 - t, sigma_t = t; Song et al. 2021 with the
per-pixel times of AsyncPatch Sec. 3.2):

    x_hat = z - t v,   eps_hat = z + (1 - t) v,
    c = eta * (s / t) * sqrt(t^2 - (alpha_t / alpha_s)^2 s^2),
    z_s = alpha_s x_hat + sqrt(s^2 - c^2) eps_hat + c xi,    xi ~ N(0, I).

eta = 0 is deterministic and equals the Euler step z_s = z - (t - s) v; eta = 1 is
ancestral (DDPM) sampling; the paper evaluates with eta = 0.25. A pixel with s = t
is returned bit-identical, so known pixels (tau = 0 throughout) are never altered.

The sampler is a pure function of a `velocity_fn(z, t_map, **cond)`; the schedule is
data, so one compilation per (shapes, step count) serves every schedule.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from asyncpatch_jax import checks
from asyncpatch_jax.diffusion import flow
from asyncpatch_jax.diffusion import schedules

VelocityFn = Callable[..., jax.Array]


def ddim_step(z: jax.Array, v: jax.Array, t: jax.Array, s: jax.Array,
              eta: jax.Array | float, noise: jax.Array) -> jax.Array:
  """One per-pixel DDIM step from time map t to s <= t (see module docstring).

  z, v, noise: [B, H, W, C]; t, s: [B, H, W]. Pixels with s == t are returned as is.
  """
  t4, s4 = flow.expand_time(t, z.ndim), flow.expand_time(s, z.ndim)
  moving = s4 < t4
  # Safe values where a pixel does not move (t = s, possibly 0 or 1); never selected.
  t_safe = jnp.where(moving, t4, 1.0)
  alpha_s = jnp.where(moving, 1.0 - s4, 1.0)
  x_hat = z - t4 * v
  eps_hat = z + (1.0 - t4) * v
  ratio = (1.0 - t4) / alpha_s
  c = eta * (s4 / t_safe) * jnp.sqrt(jnp.maximum(t4 * t4 - (ratio * s4) ** 2, 0.0))
  z_s = (1.0 - s4) * x_hat + jnp.sqrt(jnp.maximum(s4 * s4 - c * c, 0.0)) * eps_hat + c * noise
  return jnp.where(moving, z_s, z)


def initial_state(x: jax.Array, t0: jax.Array, noise: jax.Array) -> jax.Array:
  """z at the start times: the forward noising of the known content x to tau[0]."""
  return flow.add_noise(x, noise, t0)


def sample_loop(velocity_fn: VelocityFn, tau: jax.Array, x: jax.Array, key: jax.Array,
                eta: jax.Array | float = 0.0, cond: dict | None = None) -> jax.Array:
  """Runs the schedule; pure and traceable (call it inside your own jit, or use `Sampler`).

  Args:
    velocity_fn: v_hat = velocity_fn(z [B, H, W, C], t_map [B, H, W], **cond).
    tau: [N+1, H, W] or [N+1, B, H, W], a valid schedule (see schedules.py).
    x: [B, H, W, C] known content (any values where tau[0] = 1).
    key: PRNG key; step k draws from fold_in(key, k + 1), the start noise from fold_in(key, 0).
    eta: stochastic coefficient in [0, 1].
    cond: extra keyword arguments of velocity_fn (parameters, labels, ...).
  Returns:
    The sample at tau[N] = 0: [B, H, W, C].
  """
  cond = cond or {}
  b, h, w, _ = x.shape
  tau = jnp.broadcast_to(tau if tau.ndim == 4 else tau[:, None], (tau.shape[0], b, h, w))
  z0 = initial_state(x, tau[0], jax.random.normal(jax.random.fold_in(key, 0), x.shape,
                                                  x.dtype))

  def step(z, inputs):
    t, s, k = inputs
    v = velocity_fn(z, t, **cond).astype(z.dtype)
    noise = jax.random.normal(jax.random.fold_in(key, k + 1), z.shape, z.dtype)
    return ddim_step(z, v, t, s, eta, noise), None

  steps = jnp.arange(tau.shape[0] - 1)
  z, _ = jax.lax.scan(step, z0, (tau[:-1], tau[1:], steps))
  return z


def place(mesh: jax.sharding.Mesh | None, tree, batched: bool, batch: int):
  """Shards `tree` over its leading (batch) axis on `mesh` when it divides, else replicates."""
  if mesh is None:
    return tree
  spec = P("data") if batched and batch % mesh.devices.size == 0 else P()
  return jax.device_put(tree, NamedSharding(mesh, spec))


class Sampler:
  """A compiled sampler for one velocity function; reused across schedules and calls.

  sampler = Sampler(velocity_fn)
  images = sampler(tau, key=key, shape=(B, H, W, C), params=params, y=labels)

  It compiles once per (shapes, step count): the schedule, the key, eta and the
  conditioning are traced arguments. Given a mesh with a `data` axis (built by
  `training.sharding.sampling_mesh()`), the batch is sharded over it when B divides
  evenly; keyword arguments named in `batched_cond` carry the batch as their leading
  axis, the others are replicated. mesh=None runs on the default device.
  """

  def __init__(self, velocity_fn: VelocityFn, *, mesh: jax.sharding.Mesh | None = None,
               batched_cond: Sequence[str] = ("y",)):
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
      raise checks.InputError(f"mesh={mesh!r}; expected a jax.sharding.Mesh with a 'data' axis or None.")
    self.velocity_fn = velocity_fn
    self.batched_cond = tuple(batched_cond)
    self.mesh = mesh
    self._run = jax.jit(functools.partial(sample_loop, velocity_fn))

  def _place(self, tree, batched: bool, batch: int):
    return place(self.mesh, tree, batched, batch)

  def place_cond(self, cond: dict, batch: int) -> dict:
    """Shards the arguments named in `batched_cond` over the batch; replicates the rest."""
    batched = {k: v for k, v in cond.items() if k in self.batched_cond}
    shared = {k: v for k, v in cond.items() if k not in self.batched_cond}
    return {**self._place(batched, True, batch), **self._place(shared, False, batch)}

  def __call__(self, tau, *, key: jax.Array, x=None, shape: Sequence[int] | None = None,
               eta: float = 0.0, **cond) -> jax.Array:
    """Samples with schedule `tau` from noise (and the known content `x`, if given).

    Args:
      tau: [N+1, H, W] or [N+1, B, H, W] schedule.
      key: PRNG key.
      x: [B, H, W, C] known content in [-1, 1]; required where tau[0] < 1.
      shape: (B, H, W, C) when x is None.
      eta: stochastic coefficient in [0, 1].
      **cond: further arguments of velocity_fn.
    """
    if x is None:
      if shape is None or len(shape) != 4:
        raise checks.InputError(f"shape={shape}; pass x [B, H, W, C] or shape=(B, H, W, C).")
      x = jnp.zeros(tuple(shape), jnp.float32)
    checks.check_image(x, "x")
    b, h, w, _ = x.shape
    if checks.is_concrete(tau):
      tau_np = schedules.validate_schedule(tau, (h, w), batch=b)
      if shape is not None and tau_np[0].min() < 1.0:
        raise checks.InputError("tau[0] < 1 at some pixels, so they start from known content: "
                         "pass x [B, H, W, C] instead of shape.")
      tau = tau_np
    if not 0.0 <= float(eta) <= 1.0:
      raise checks.InputError(f"eta={eta}; expected a value in [0, 1] (0 = deterministic).")
    tau = jnp.asarray(tau, jnp.float32)
    cond = self.place_cond(cond, b)
    x = self._place(jnp.asarray(x, jnp.float32), True, b)
    if tau.ndim == 4:
      tau = jax.device_put(tau, NamedSharding(self.mesh, P(None, "data"))) if (
          self.mesh is not None and b % self.mesh.devices.size == 0) else tau
    else:
      tau = self._place(tau, False, b)
    return self._run(tau, x, key, jnp.float32(eta), cond)
