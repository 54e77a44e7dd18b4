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

A schedule can also be a *policy* (policies.py, AsyncPatch Sec. 5.5): the next time map is
chosen at every step from the loop state (times, sample, the model's velocity and, with an
`uncertainty_fn`, its predicted error variance). `policy_loop` runs it in one
`lax.while_loop` that stops when every pixel is at 0 or the step budget is spent (the last
step of the budget finishes every pixel), and returns the per-pixel step counts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.diffusion import flow
from asyncpatch_jax.diffusion import policies
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.runtime import multihost

VelocityFn = Callable[..., jax.Array]


class CachedVelocity(NamedTuple):
  """A velocity function with a cache carried across the steps of one sampling loop (the
  clean tokens' keys and values of a clean-context DiT: models/dit_cache.py).

  init(z, t, **cond) -> cache: an empty cache (the first `apply` fills what it needs).
  apply(cache, z, t, **cond) -> (v_hat, cache).
  The loops below take a plain `velocity_fn(z, t, **cond)` or a CachedVelocity; every loop
  (and every IPR round) starts from `init`'s cache.
  """
  init: Callable[..., object]
  apply: Callable[..., tuple[jax.Array, object]]


def as_cached(velocity_fn) -> CachedVelocity:
  """`velocity_fn` as a CachedVelocity (a plain function gets an empty cache ())."""
  if isinstance(velocity_fn, CachedVelocity):
    return velocity_fn
  return CachedVelocity(
      init=lambda z, t, *args, **cond: (),
      apply=lambda cache, z, t, *args, **cond: (velocity_fn(z, t, *args, **cond), cache))


def like_input(velocity_fn, wrapped: CachedVelocity):
  """`wrapped` (a wrapper built on `as_cached(velocity_fn)`) as the kind `velocity_fn` is:
  a CachedVelocity, or for a plain function a plain function (its caches are empty)."""
  if isinstance(velocity_fn, CachedVelocity):
    return wrapped
  return lambda z, t, *args, **cond: wrapped.apply(wrapped.init(z, t, *args, **cond), z, t,
                                                   *args, **cond)[0]


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
    velocity_fn: v_hat = velocity_fn(z [B, H, W, C], t_map [B, H, W], **cond), or a
      CachedVelocity.
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
  fn = as_cached(velocity_fn)

  def step(carry, inputs):
    z, cache = carry
    t, s, k = inputs
    v, cache = fn.apply(cache, z, t, **cond)
    noise = jax.random.normal(jax.random.fold_in(key, k + 1), z.shape, z.dtype)
    return (ddim_step(z, v.astype(z.dtype), t, s, eta, noise), cache), None

  steps = jnp.arange(tau.shape[0] - 1)
  (z, _), _ = jax.lax.scan(step, (z0, fn.init(z0, tau[0], **cond)),
                           (tau[:-1], tau[1:], steps))
  return z


class AdaptiveResult(NamedTuple):
  """What a policy run returns.

  samples: [B, H, W, C] at t = 0.
  steps: [B, H, W] int32, the steps in which each pixel's time changed.
  evaluations: [B] int32, network evaluations until the image's last pixel reached 0.
  history: None, or (with return_history) {'times': [N+1, B, H, W], 'uncertainty':
    [N, B, H, W], 'x0': [N, B, H, W, C] (the prediction x_hat = z - t v at each step),
    'num_steps': the loop's steps}; entries past num_steps are 0.
  """
  samples: jax.Array
  steps: jax.Array
  evaluations: jax.Array
  history: dict | None = None


# Debug-mode violations, in the order they are checked.
VIOLATIONS = ("moved known pixels (returned a time != 0 there)",
              "returned increasing times", "returned non-finite times")


def policy_loop(velocity_fn: VelocityFn, uncertainty_fn: Callable[..., jax.Array] | None,
                x: jax.Array, known: jax.Array, key: jax.Array, eta, budget, params: dict,
                cond: dict | None = None, uncertainty_cond: dict | None = None, *,
                policy_fn: policies.PolicyFn, history_steps: int = 0, debug: bool = False):
  """Samples with a schedule policy; pure and traceable (see `Sampler` for the checked form).

  Args:
    velocity_fn: v_hat = velocity_fn(z, t_map, **cond), or a CachedVelocity.
    uncertainty_fn: None (uncertainty 0) or u = uncertainty_fn(z, t_map, v_hat,
      **uncertainty_cond), the predicted velocity-error variance [B, H, W]; it is set
      to 0 where t = 0.
    x: [B, H, W, C] known content (any values where unknown).
    known: [B, H, W] bool, pixels given (start and stay at t = 0); the rest start at 1.
    key: start noise from fold_in(key, 0), step k from fold_in(key, k + 1) (as sample_loop).
    eta: stochastic coefficient in [0, 1].
    budget: int32 N, the most steps (network evaluations); step N - 1 sends every pixel
      to 0, so every pixel ends at t = 0 within the budget.
    params: the policy's traced parameters (Policy.arguments).
    policy_fn: the policy (static).
    history_steps: 0, or the length of the history buffers (>= budget) to return.
    debug: also return, per violation kind (VIOLATIONS), the first step where the raw
      policy output broke the invariant (-1: never); the loop clips it either way.
  Returns:
    AdaptiveResult, and with debug the violation steps [3] int32.
  """
  cond = cond or {}
  uncertainty_cond = uncertainty_cond or {}
  b, h, w, _ = x.shape
  known = known.astype(bool)
  t0 = jnp.where(known, 0.0, 1.0).astype(x.dtype)
  z0 = initial_state(x, t0, jax.random.normal(jax.random.fold_in(key, 0), x.shape, x.dtype))
  budget = jnp.asarray(budget, jnp.int32)
  fn = as_cached(velocity_fn)

  def body(carry):
    k, z, t, steps, done_at, violation, hist, cache = carry
    v, cache = fn.apply(cache, z, t, **cond)
    v = v.astype(z.dtype)
    if uncertainty_fn is None:
      u = jnp.zeros(t.shape, z.dtype)
    else:
      u = jnp.where(t > 0, uncertainty_fn(z, t, v, **uncertainty_cond).astype(z.dtype), 0.0)
    state = policies.LoopState(t=t, z=z, v=v, u=u, step=k, budget=budget, known=known)
    raw = policy_fn(state, params).astype(t.dtype)
    s = jnp.where(jnp.isfinite(raw), jnp.clip(raw, 0.0, t), t)
    s = jnp.where(known | (k + 1 >= budget), 0.0, s)
    if debug:
      bad = jnp.stack([jnp.any(known & (raw != 0.0)), jnp.any(raw > t),
                       jnp.any(~jnp.isfinite(raw))])
      violation = jnp.where((violation < 0) & bad, k, violation)
    noise = jax.random.normal(jax.random.fold_in(key, k + 1), z.shape, z.dtype)
    z_next = ddim_step(z, v, t, s, eta, noise)
    steps = steps + (s < t).astype(jnp.int32)
    finished = jnp.all(s == 0.0, axis=(1, 2))
    done_at = jnp.where((done_at < 0) & finished, k + 1, done_at)
    if history_steps:
      hist = {"times": hist["times"].at[k + 1].set(s), "uncertainty": hist["uncertainty"].at[k].set(u),
              "x0": hist["x0"].at[k].set(flow.x0_from_v(z, v, t))}
    return k + 1, z_next, s, steps, done_at, violation, hist, cache

  def keep_going(carry):
    k, _, t = carry[:3]
    return (k < budget) & jnp.any(t > 0.0)

  hist = None
  if history_steps:
    hist = {"times": jnp.zeros((history_steps + 1, b, h, w), x.dtype).at[0].set(t0),
            "uncertainty": jnp.zeros((history_steps, b, h, w), x.dtype),
            "x0": jnp.zeros((history_steps, *x.shape), x.dtype)}
  done0 = jnp.where(jnp.all(known, axis=(1, 2)), 0, -1).astype(jnp.int32)
  carry = (jnp.int32(0), z0, t0, jnp.zeros((b, h, w), jnp.int32), done0,
           jnp.full((3,), -1, jnp.int32), hist, fn.init(z0, t0, **cond))
  k, z, _, steps, done_at, violation, hist, _ = jax.lax.while_loop(keep_going, body, carry)
  if hist is not None:
    hist["num_steps"] = k
  result = AdaptiveResult(z, steps, done_at, hist)
  return (result, violation) if debug else result


def announce_compiling(what: str, fn: Callable) -> Callable:
  """`fn`, logging "compiling <what> ..." each time jax traces it (jit it after wrapping).

  A jitted function is traced once per new input signature, just before XLA compiles
  it (or loads it from the persistent cache), so the line marks the wait a user would
  otherwise see as a progress bar stuck at 0.
  """
  @functools.wraps(fn)
  def traced(*args, **kwargs):
    logging.info("compiling %s for these shapes (once; later calls reuse it) ...", what)
    return fn(*args, **kwargs)
  return traced


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
               batched_cond: Sequence[str] = ("y",),
               uncertainty_fn: Callable[..., jax.Array] | None = None):
    if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
      raise checks.InputError(f"mesh={mesh!r}; expected a jax.sharding.Mesh with a 'data' axis or None.")
    self.velocity_fn = velocity_fn
    self.uncertainty_fn = uncertainty_fn
    self.batched_cond = tuple(batched_cond)
    self.mesh = mesh
    self._run = jax.jit(announce_compiling("the sampler",
                                           functools.partial(sample_loop, velocity_fn)))
    self._run_policy = jax.jit(
        announce_compiling("the policy sampler",
                           functools.partial(policy_loop, velocity_fn, uncertainty_fn)),
        static_argnames=("policy_fn", "history_steps", "debug"))

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
      tau: [N+1, H, W] or [N+1, B, H, W] schedule, or a `policies.Policy` (then see
        `run_policy` for its extra arguments and the `AdaptiveResult` it returns).
      key: PRNG key.
      x: [B, H, W, C] known content in [-1, 1]; required where tau[0] < 1.
      shape: (B, H, W, C) when x is None.
      eta: stochastic coefficient in [0, 1].
      **cond: further arguments of velocity_fn.
    """
    if isinstance(tau, policies.Policy):
      return self.run_policy(tau, key=key, x=x, shape=shape, eta=eta, **cond)
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
    # On a mesh of several processes, the samples come back whole to every process.
    return multihost.gather(self._run(tau, x, key, jnp.float32(eta), cond))

  def run_policy(self, policy: policies.Policy, *, key: jax.Array, budget: int, x=None,
                 shape: Sequence[int] | None = None, known=None, eta: float = 0.0,
                 uncertainty_cond: dict | None = None, debug: bool = False,
                 return_history: bool | int = False, **cond) -> AdaptiveResult:
    """Samples with a schedule policy within `budget` steps (network evaluations).

    Args:
      policy: a `policies.Policy` (policies.get(name, ...) or policies.custom(fn)).
      key: PRNG key.
      budget: the most steps; the loop stops earlier once every pixel is at 0.
      x: [B, H, W, C] known content in [-1, 1]; required when `known` marks pixels.
      shape: (B, H, W, C) when x is None.
      known: None, [H, W] or [B, H, W] mask, 1 = given pixel (held at t = 0, never altered).
      eta: stochastic coefficient in [0, 1].
      uncertainty_cond: arguments of the sampler's uncertainty_fn (e.g. head parameters).
      debug: raise InputError naming the first step where the policy returned increasing
        times, moved known pixels or returned non-finite times (compiles a debug variant).
      return_history: also return every step's times, uncertainty and x0 prediction: True
        (buffers of `budget` steps) or an int >= budget (the buffer length, static: one
        compilation then serves every budget up to it).
      **cond: further arguments of velocity_fn.
    One compilation per (shapes, policy function, debug, history length); the budget, the
    policy's parameters and regions, the key, eta and the conditioning are traced.
    """
    if x is None:
      if shape is None or len(shape) != 4:
        raise checks.InputError(f"shape={shape}; pass x [B, H, W, C] or shape=(B, H, W, C).")
      x = jnp.zeros(tuple(shape), jnp.float32)
    checks.check_image(x, "x")
    b, h, w, _ = x.shape
    budget = checks.check_positive_int(budget, "budget")
    if not 0.0 <= float(eta) <= 1.0:
      raise checks.InputError(f"eta={eta}; expected a value in [0, 1] (0 = deterministic).")
    if known is None:
      known_np = np.zeros((b, h, w), bool)
    else:
      arr = np.asarray(known)
      if arr.shape not in ((h, w), (b, h, w)):
        raise checks.InputError(f"known has shape {arr.shape}; expected [{h}, {w}] or "
                                f"[{b}, {h}, {w}] (1 = known pixel).")
      known_np = np.broadcast_to(checks.check_mask(arr, arr.shape, "known") > 0, (b, h, w))
      if known_np.any() and shape is not None:
        raise checks.InputError("known marks pixels as given: pass their content as x "
                                "[B, H, W, C] instead of shape.")
    if uncertainty_cond and self.uncertainty_fn is None:
      raise checks.InputError("uncertainty_cond was given, but this sampler has no "
                              "uncertainty_fn (build it with Sampler(..., uncertainty_fn=...)).")
    history_steps = 0
    if return_history is True:
      history_steps = budget
    elif return_history is not False:
      history_steps = checks.check_positive_int(return_history, "return_history")
      if history_steps < budget:
        raise checks.InputError(f"return_history={history_steps} is shorter than the budget "
                                f"{budget}; pass True or a length >= the budget.")
    params = policy.arguments((h, w), known_np, budget)
    x = self._place(jnp.asarray(x, jnp.float32), True, b)
    known_arr = self._place(jnp.asarray(known_np), True, b)
    params = self._place(params, False, b)
    ucond = self._place(dict(uncertainty_cond or {}), False, b)
    cond = self.place_cond(cond, b)
    out = multihost.gather(self._run_policy(x, known_arr, key, jnp.float32(eta),
                                            jnp.int32(budget), params, cond, ucond,
                                            policy_fn=policy.fn, history_steps=history_steps,
                                            debug=bool(debug)))
    if debug:
      out, violation = out
      violation = np.asarray(jax.device_get(violation))
      for kind, step in zip(VIOLATIONS, violation):
        if step >= 0:
          raise checks.InputError(
              f"policy {policy.name!r} {kind} at step {int(step)} (debug mode); a policy must "
              "return times in [0, t] and keep known pixels at 0.")
    return out
