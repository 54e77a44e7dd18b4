"""The maps the PIFS analysis differentiates: DDIM steps, chains, the RF -> VP bridge.

* `ddim_step`: the deterministic DDIM step Phi_t (PIFS Eq. 4) of any
  epsilon-predictor, along any chain (`pifs.chain_steps`).
* `Chain` / `ddim_chain_fn`: a whole reverse chain as one `lax.scan`, so a
  Jacobian through 50 steps of a UNet compiles the network once.
* `velocity_to_eps`: a rectified-flow velocity model seen as a VP
  epsilon-predictor (docs/conventions.md, "The PIFS analysis convention").
* `gaussian_eps_fn`: the exact (Bayes-optimal) epsilon-predictor of Gaussian data
  N(mean, Sigma) (PIFS Thm. 17 proof), the closed-form model the Jacobian tools
  are tested against.

Epsilon-predictors are callables `eps_fn(x, abar) -> eps` with `x: [H, W, C]` or
`[B, H, W, C]` (the VP state `x = sqrt(abar) x0 + sqrt(1 - abar) eps`) and a scalar
`abar`. Everything returned here is a `jax.tree_util.Partial`: its arrays (model
parameters, abar values) are pytree leaves, so passing the map into a jitted
function as an argument reuses the compiled code when only those values change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import Partial

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.analysis import pifs


def as_partial(fn: Callable) -> Partial:
  """`fn` as a `jax.tree_util.Partial` (unchanged if it already is one).

  A plain callable becomes a Partial without arguments: it is then static (keyed
  by identity) when passed through `jax.jit`.
  """
  if isinstance(fn, Partial):
    return fn
  if not callable(fn):
    raise checks.InputError(f"expected a callable, got {type(fn).__name__}.")
  return Partial(fn)


# -----------------------------------------------------------------------------
# DDIM step and chain (Eq. 4).
# -----------------------------------------------------------------------------


def _ddim_apply(eps_fn, abar_t, abar_prev, x):
  a = jnp.asarray(abar_t, x.dtype)
  ap = jnp.asarray(abar_prev, x.dtype)
  return jnp.sqrt(ap / a) * x + pifs.score_coefficient(a, ap) * eps_fn(x, a)


def ddim_step(eps_fn: Callable, abar_t, abar_prev) -> Partial:
  """The DDIM step Phi_t(x) = sqrt(abar_prev / abar_t) x + b_t eps(x, abar_t) (Eq. 4).

  Args:
    eps_fn: `eps_fn(x, abar) -> eps`, x `[H, W, C]` or `[B, H, W, C]`.
    abar_t, abar_prev: scalars, `0 < abar_t < abar_prev <= 1` (the step's start and
      end on the chain).

  Returns:
    `phi(x) -> x_prev` of the same shape as `x`.
  """
  a, ap = float(abar_t), float(abar_prev)
  if not 0 < a < ap <= 1:
    raise checks.InputError(f"abar_t = {a}, abar_prev = {ap}; a DDIM step needs "
                     "0 < abar_t < abar_prev <= 1.")
  return Partial(_ddim_apply, as_partial(eps_fn), jnp.asarray(a), jnp.asarray(ap))


def ddim_step_fns(eps_fn: Callable, abar, timesteps) -> list[Partial]:
  """The steps of a reverse DDIM chain, in application order (highest t first).

  Args:
    eps_fn: an epsilon-predictor.
    abar: `[T + 1]` schedule; timesteps: a chain `[N + 1]` (see `pifs.check_chain`).

  Returns:
    `N` maps; `fns[-1](... fns[0](x_T))` is x at the chain's first timestep.
  """
  steps = pifs.chain_steps(abar, timesteps)
  return [ddim_step(eps_fn, a, ap)
          for a, ap in zip(steps.abar_t[::-1], steps.abar_prev[::-1])]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Chain:
  """A chain of maps `x -> step(consts, params[i], x)` applied for i = 0..N-1 by scan.

  Attributes:
    step: static; `step(consts, params_i, x) -> x` with x `[H, W, C]`.
    consts: pytree shared by every step (e.g. the eps-predictor).
    params: pytree whose leaves all have leading axis `[N]`, in application order.
  """
  step: Callable = dataclasses.field(metadata=dict(static=True))
  consts: Any
  params: Any

  def __len__(self) -> int:
    return int(jax.tree_util.tree_leaves(self.params)[0].shape[0])

  def __call__(self, x):
    def body(x, p):
      return self.step(self.consts, p, x), None
    return jax.lax.scan(body, x, self.params)[0]


def _ddim_scan_step(eps_fn, p, x):
  return _ddim_apply(eps_fn, p[0], p[1], x)


def ddim_chain_fn(eps_fn: Callable, abar, timesteps) -> Chain:
  """The whole reverse DDIM chain Phi = Phi_{t_1} o ... o Phi_{t_N} as one scan.

  Same maps as `ddim_step_fns`, applied with `lax.scan` (the network is traced
  once). Usable wherever the Lyapunov tools take `step_fns`.

  Returns:
    `Chain` with N steps; `chain(x_T)` is x at the chain's first timestep.
  """
  steps = pifs.chain_steps(abar, timesteps)
  params = (jnp.asarray(steps.abar_t[::-1].copy()), jnp.asarray(steps.abar_prev[::-1].copy()))
  return Chain(step=_ddim_scan_step, consts=as_partial(eps_fn), params=params)


# -----------------------------------------------------------------------------
# Rectified flow -> VP epsilon-predictor.
# -----------------------------------------------------------------------------


def rf_time(abar):
  """The rectified-flow time of the VP level abar: t = sqrt(1-abar) / (sqrt(abar) + sqrt(1-abar)).

  Follows from (1 - t) / t = sqrt(abar) / sqrt(1 - abar) (equal signal-to-noise).
  """
  sa, s1 = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
  return s1 / (sa + s1)


def _eps_from_velocity(per_image_time, velocity_fn, x, abar):
  single = x.ndim == 3
  xb = x[None] if single else x
  abar = jnp.asarray(abar, x.dtype)
  sa, s1 = jnp.sqrt(abar), jnp.sqrt(1.0 - abar)
  scale = 1.0 / (sa + s1)  # z_rf = (1 - t) / sqrt(abar) * x_vp
  t = s1 * scale
  z = scale * xb
  t_in = jnp.full(xb.shape[:1] if per_image_time else xb.shape[:3], t, xb.dtype)
  eps = z + (1.0 - t) * velocity_fn(z, t_in)
  return eps[0] if single else eps


def _eps_from_velocity_map(velocity_fn, x, abar):
  return _eps_from_velocity(False, velocity_fn, x, abar)


def _eps_from_velocity_image(velocity_fn, x, abar):
  return _eps_from_velocity(True, velocity_fn, x, abar)


def velocity_to_eps(velocity_fn: Callable, *, per_image_time: bool = False) -> Partial:
  """A rectified-flow velocity model as a VP epsilon-predictor (docs/conventions.md, "The
  PIFS analysis convention").

  VP: `x = sqrt(abar) x0 + sqrt(1 - abar) eps`; RF: `z = (1 - t) x0 + t eps`. The two
  share (x0, eps) when `z = x / (sqrt(abar) + sqrt(1 - abar))` and
  `t = sqrt(1 - abar) / (sqrt(abar) + sqrt(1 - abar))`; then
  `eps_hat = z + (1 - t) v_hat(z, t)` (docs/conventions.md: eps_hat = z + (1 - t) v_hat). The
  reverse scaling is `x = z / sqrt((1 - t)^2 + t^2)`.

  Args:
    velocity_fn: `velocity_fn(z, t_map) -> v_hat` with z `[B, H, W, C]`, t_map
      `[B, H, W]` (pass a `jax.tree_util.Partial` holding the model parameters so
      they stay traced arguments).
    per_image_time: pass the (constant) time as `[B]` instead of a map `[B, H, W]`;
      models that follow docs/conventions.md give the same result either way, the
      per-image path is cheaper.

  Returns:
    `eps_fn(x, abar) -> eps_hat`, x `[H, W, C]` or `[B, H, W, C]`.
  """
  fn = _eps_from_velocity_image if per_image_time else _eps_from_velocity_map
  return Partial(fn, as_partial(velocity_fn))


# -----------------------------------------------------------------------------
# Exact epsilon-predictor of Gaussian data.
# -----------------------------------------------------------------------------


def _gaussian_eps(mean, eigvecs, eigvals, x, abar):
  shape = x.shape
  n = mean.shape[0]
  xf = x.reshape(shape[:-3] + (n,))
  abar = jnp.asarray(abar, x.dtype)
  v = 1.0 - abar
  r = xf - jnp.sqrt(abar) * mean.astype(x.dtype)
  u = eigvecs.astype(x.dtype)
  coef = jnp.sqrt(v) / (abar * eigvals.astype(x.dtype) + v)
  eps = ((r @ u) * coef) @ u.T
  return eps.reshape(shape)


def gaussian_eps_fn(cov, mean=None, *, image_shape=None) -> Partial:
  """Exact epsilon-predictor of data N(mean, Sigma) (PIFS Thm. 17 proof).

  `eps*(x, abar) = E[eps | x_abar = x] = sqrt(v) (abar Sigma + v I)^{-1} (x - sqrt(abar) mean)`
  with `v = 1 - abar`; its Jacobian is `sqrt(v) (abar Sigma + v I)^{-1}` for every x,
  so the DDIM step's Jacobian is `sqrt(abar_prev/abar_t) I + b_t sqrt(v) (abar Sigma +
  v I)^{-1}`, with eigenvalue f_t(mu) along an eigenvector of Sigma of eigenvalue mu.

  Args:
    cov: `[n, n]` symmetric positive definite, over images flattened in `[H, W, C]`
      (row-major) order.
    mean: `[n]` or an image `[H, W, C]`; zero by default.
    image_shape: optional `(H, W, C)` to check against `n`.

  Returns:
    `eps_fn(x, abar)`, x `[H, W, C]` or `[B, H, W, C]` with `H * W * C = n`.
  """
  cov = np.asarray(cov, dtype=np.float64)
  if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
    raise checks.InputError(f"cov has shape {cov.shape}; expected a square matrix [n, n].")
  n = cov.shape[0]
  if image_shape is not None and int(np.prod(image_shape)) != n:
    raise checks.InputError(f"cov is [{n}, {n}] but image_shape {tuple(image_shape)} has "
                     f"{int(np.prod(image_shape))} entries.")
  scale = max(np.abs(cov).max(), 1e-300)
  if not np.allclose(cov, cov.T, rtol=0, atol=1e-10 * scale):
    raise checks.InputError("cov is not symmetric (max |cov - cov^T| = "
                     f"{np.abs(cov - cov.T).max():.3g}).")
  eigvals, eigvecs = np.linalg.eigh(0.5 * (cov + cov.T))
  if eigvals[0] <= 1e-12 * max(eigvals[-1], 0.0) or eigvals[0] <= 0:
    raise checks.InputError(f"cov is not positive definite: its smallest eigenvalue is "
                     f"{eigvals[0]:.3g} (largest {eigvals[-1]:.3g}).")
  mean = np.zeros(n) if mean is None else np.asarray(mean, dtype=np.float64).reshape(-1)
  if mean.shape != (n,):
    raise checks.InputError(f"mean has {mean.size} entries; expected {n} to match cov.")
  return Partial(_gaussian_eps, jnp.asarray(mean), jnp.asarray(eigvecs), jnp.asarray(eigvals))


# -----------------------------------------------------------------------------
# Boundary check of image maps (used by every Jacobian tool).
# -----------------------------------------------------------------------------


_SHAPE_CACHE: dict = {}


def _output_shape(fn, shape, dtype):
  """Shape of fn(x) by `jax.eval_shape`, cached per (pytree structure, leaf avals)."""
  leaves, treedef = jax.tree_util.tree_flatten(as_partial(fn))
  key = (treedef, tuple((np.shape(v), str(jnp.result_type(v))) for v in leaves),
         shape, str(dtype))
  try:
    hash(key)
  except TypeError:
    key = None
  if key is not None and key in _SHAPE_CACHE:
    return _SHAPE_CACHE[key]
  out = getattr(jax.eval_shape(fn, jax.ShapeDtypeStruct(shape, dtype)), "shape", None)
  if key is not None and len(_SHAPE_CACHE) < 1024:
    _SHAPE_CACHE[key] = out
  return out


def check_image_map(fn: Callable, x, name: str = "fn") -> None:
  """`x` must be one image `[H, W, C]` and `fn(x)` must have its shape."""
  shape = tuple(np.shape(x))
  if len(shape) != 3:
    raise checks.InputError(f"x has shape {shape}; expected one image [H, W, C] (no batch axis).")
  if not callable(fn):
    raise checks.InputError(f"{name} must be callable, got {type(fn).__name__}.")
  out_shape = _output_shape(fn, shape, jnp.result_type(x))
  if out_shape != shape:
    raise checks.InputError(f"{name} maps x of shape {shape} to an output of shape {out_shape}; "
                     "the Jacobian tools need a map from [H, W, C] to the same shape.")
