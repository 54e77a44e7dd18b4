"""Lyapunov spectrum and Kaplan-Yorke dimension of a reverse chain (PIFS Sec. 5).

The chain is `step_fns`: either a sequence of maps `[H, W, C] -> [H, W, C]` applied
in order (`step_fns[0]` first, e.g. `pifs_operators.ddim_step_fns`), or a
`pifs_operators.Chain` applied with `lax.scan` (`ddim_chain_fn`; the network is
traced once however long the chain). T is the number of steps.

* `lyapunov_spectrum`: `l_i = (1/T) log s_i(J)` (Eq. 43) for the top singular values
  of the chain's Jacobian J at x, by block subspace iteration with vmapped JVPs and
  VJPs through the whole chain (`jax.linearize` once, J never materialised).
* `lyapunov_qr`: the QR (Benettin) estimate, pushing k tangent vectors through every
  step with vmapped JVPs and re-orthonormalising after each; returns the running
  estimate along the trajectory.
* the Kaplan-Yorke dimension of a spectrum is `pifs.kaplan_yorke_dimension` (Eq. 44).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.analysis import jacobian_norms
from asyncpatch_jax.analysis.ddim_maps import Chain, as_partial


def _as_chain(step_fns):
  """Validates the chain container; returns (pytree for jit, T)."""
  if isinstance(step_fns, Chain):
    t = len(step_fns)
    if t < 1:
      raise checks.InputError("step_fns is an empty Chain; need at least one step.")
    return step_fns, t
  if callable(step_fns) or not isinstance(step_fns, Sequence) or not step_fns:
    raise checks.InputError("step_fns must be a non-empty sequence of maps [H, W, C] -> "
                     "[H, W, C] (applied in order) or a pifs_operators.Chain; got "
                     f"{type(step_fns).__name__}.")
  return tuple(as_partial(f) for f in step_fns), len(step_fns)


def _apply_chain(chain, x):
  if isinstance(chain, Chain):
    return chain(x)
  for f in chain:
    x = f(x)
  return x


def _check(step_fns, x, num_vectors):
  shape = tuple(np.shape(x))
  if len(shape) != 3:
    raise checks.InputError(f"x has shape {shape}; expected one image [H, W, C].")
  chain, t = _as_chain(step_fns)
  spec = jax.ShapeDtypeStruct(shape, jnp.result_type(x))
  if isinstance(chain, Chain):
    out = jax.eval_shape(chain, spec)
    if out.shape != shape:
      raise checks.InputError(f"the Chain maps [H, W, C] = {shape} to {out.shape}; the steps "
                       "must keep the shape.")
  else:
    for i, f in enumerate(chain):
      out = jax.eval_shape(f, spec)
      if getattr(out, "shape", None) != shape:
        raise checks.InputError(f"step_fns[{i}] maps x of shape {shape} to shape "
                         f"{getattr(out, 'shape', None)}; every step must keep [H, W, C].")
  n = int(np.prod(shape))
  if int(num_vectors) != num_vectors or not 1 <= num_vectors <= n:
    raise checks.InputError(f"num_vectors = {num_vectors}; expected an integer in [1, n] with "
                     f"n = H * W * C = {n} for x of shape {shape}.")
  return chain, t


def _orthonormal_rows(v):
  """`[k, ...]` -> rows orthonormalised by QR (same shape)."""
  k = v.shape[0]
  q, _ = jnp.linalg.qr(v.reshape(k, -1).T)
  return q.T.reshape(v.shape)


class LyapunovSpectrum(NamedTuple):
  exponents: jax.Array  # [k] l_i = log(s_i) / T, descending (Eq. 43)
  singular_values: jax.Array  # [k] s_i(J), descending
  vectors: jax.Array  # [k, H, W, C] right singular vectors
  num_iters: jax.Array  # [] iterations run


@functools.partial(jax.jit, static_argnames=("num_iters", "num_steps"))
def _subspace_core(chain, x, q0, tol, num_iters, num_steps):
  jvp, vjp = jacobian_norms.linearized(lambda z: _apply_chain(chain, z), x)
  bjvp, bvjp = jax.vmap(jvp), jax.vmap(vjp)
  k = q0.shape[0]

  def ritz(q):
    return jnp.linalg.svd(bjvp(q).reshape(k, -1), compute_uv=False)

  def body(c):
    i, q, _, s = c
    # Two half-steps (J, then J^T), each re-orthonormalised, so the conditioning
    # is s_1 / s_k rather than its square.
    p = _orthonormal_rows(bjvp(q))
    q = _orthonormal_rows(bvjp(p))
    return i + 1, q, s, ritz(q)

  def cond(c):
    i, _, s_old, s = c
    return (i < num_iters) & jnp.any(jnp.abs(s - s_old) > tol * jnp.abs(s))

  q = _orthonormal_rows(q0)
  s0 = ritz(q)
  i, q, _, _ = jax.lax.while_loop(cond, body, (0, q, jnp.full_like(s0, -1.0), s0))
  y = bjvp(q).reshape(k, -1)
  # Y^T = J Q^T = A S B^T  =>  right singular vectors Q^T B.
  _, s, bt = jnp.linalg.svd(y.T, full_matrices=False)
  vecs = (bt @ q.reshape(k, -1)).reshape(q.shape)
  return LyapunovSpectrum(jnp.log(s) / num_steps, s, vecs, i)


def lyapunov_spectrum(step_fns, x, *, key, num_vectors: int, num_iters: int = 50,
                      tol: float = 1e-7) -> LyapunovSpectrum:
  """Top Lyapunov exponents l_i = (1/T) log s_i(J) of a chain at x (PIFS Eq. 43).

  J is the Jacobian of `step_fns[-1] o ... o step_fns[0]` at x (the chain-rule
  product along the trajectory from x). Block subspace iteration: k orthonormal
  vectors are pushed through the whole chain with vmapped JVPs, pulled back with
  vmapped VJPs, re-orthonormalised by QR after each pass, until the Ritz values
  `svd(J Q)` change by at most `tol` (relative) or `num_iters` iterations ran.

  Args:
    step_fns: sequence of maps `[H, W, C] -> [H, W, C]` or a `Chain`.
    x: `[H, W, C]`, the start of the chain (at the fixed point x* for Eq. 43).
    key: PRNG key for the start subspace.
    num_vectors: k, at most n = H W C.
    num_iters, tol: iteration budget and relative tolerance.

  Returns:
    `LyapunovSpectrum(exponents [k], singular_values [k], vectors [k, H, W, C],
    num_iters)`.
  """
  chain, t = _check(step_fns, x, num_vectors)
  checks.check_positive_int(num_iters, "num_iters")
  x = jnp.asarray(x)
  q0 = jax.random.normal(key, (int(num_vectors),) + x.shape, x.dtype)
  return _subspace_core(chain, x, q0, jnp.asarray(tol, x.dtype), int(num_iters), t)


class LyapunovQR(NamedTuple):
  exponents: jax.Array  # [k] (1/T) sum_t log |R_t,ii|
  running: jax.Array  # [T, k] the estimate after each step (mean over steps so far)
  final: jax.Array  # [H, W, C] the end of the trajectory


def _qr_step(fn, x, q):
  """One Benettin step: push x and the tangents q [k, H, W, C] through fn, then QR."""
  k = q.shape[0]
  x_next, z = jax.vmap(lambda v: jax.jvp(fn, (x,), (v,)), out_axes=(None, 0))(q)
  qq, r = jnp.linalg.qr(z.reshape(k, -1).T)
  d = jnp.diagonal(r)
  sign = jnp.where(d < 0, -1.0, 1.0).astype(q.dtype)
  return x_next, (qq * sign).T.reshape(q.shape), jnp.log(jnp.abs(d))


@jax.jit
def _qr_core(chain, x, q0):
  q = _orthonormal_rows(q0)
  if isinstance(chain, Chain):
    def body(c, p):
      x, q = c
      fn = functools.partial(chain.step, chain.consts, p)
      x, q, logs = _qr_step(fn, x, q)
      return (x, q), logs
    (x, _), logs = jax.lax.scan(body, (x, q), chain.params)
  else:
    rows = []
    for fn in chain:  # distinct maps: unrolled at trace time, one compiled program
      x, q, logs = _qr_step(fn, x, q)
      rows.append(logs)
    logs = jnp.stack(rows)
  cums = jnp.cumsum(logs, axis=0)
  running = cums / jnp.arange(1, logs.shape[0] + 1, dtype=logs.dtype)[:, None]
  return LyapunovQR(running[-1], running, x)


def lyapunov_qr(step_fns, x, *, key, num_vectors: int) -> LyapunovQR:
  """QR (Benettin) Lyapunov estimate along the trajectory from x (PIFS Sec. 5.1).

  k tangent vectors (random, orthonormalised) are pushed through each step with
  vmapped JVPs at the current trajectory point; after every step `Z = Q R` and the
  exponents accumulate `log |R_ii|`. `sum_{i <= j} l_i` is exactly (1/T) log of the
  growth of the j-volume spanned by the start vectors; for long chains the l_i
  approach the top Lyapunov exponents.

  Args:
    step_fns: sequence of maps or a `Chain`; x: `[H, W, C]`.
    key: PRNG key for the start vectors.
    num_vectors: k <= H W C.

  Returns:
    `LyapunovQR(exponents [k], running [T, k], final [H, W, C])`.
  """
  chain, _ = _check(step_fns, x, num_vectors)
  x = jnp.asarray(x)
  q0 = jax.random.normal(key, (int(num_vectors),) + x.shape, x.dtype)
  return _qr_core(chain, x, q0)
