"""The PIFS contraction regimes of a DDIM step: (PC) and (EC) constants and verdicts, and the
directional suppression field (PIFS Thm. 6, 9; Eq. 13, 16-19, 30-32; Sec. 7.5-7.7).

* `pc_quantities` / `ec_quantities`: the (PC) and (EC) constants and verdicts.
* `diagonal_rayleigh` / `suppression_field`: <v_k, [J]_kk v_k> and S_k,t.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.analysis import pifs
from asyncpatch_jax.analysis.ddim_maps import as_partial, check_image_map
from asyncpatch_jax.analysis.jacobian_norms import linearized, spectral_norm, unit
from asyncpatch_jax.analysis.patch_stats import patch_grid, patchify, unpatchify

# -----------------------------------------------------------------------------
# (PC) and (EC).
# -----------------------------------------------------------------------------


class PCQuantities(NamedTuple):
  """Block-max contraction constants at one point (PIFS Thm. 9, Def. 10, Sec. 7.5)."""
  kappa: jax.Array  # [M] ||[J Phi]_kk||_op (kappa_k,t)
  coupling: jax.Array  # [M] C_k,t = sum_{j != k} ||[J Phi]_kj||_op (Eq. 16)
  kappa_diag: jax.Array  # [] max_k kappa_k (Eq. 18, at this x)
  delta_cross: jax.Array  # [] max_k C_k (Eq. 18, at this x)
  kappa_pc: jax.Array  # [] kappa_diag + delta_cross (Eq. 19)
  slack: jax.Array  # [M] (1 - kappa_k) - C_k; > 0 iff patch k satisfies (17)
  pc_holds: jax.Array  # [] bool, kappa_pc < 1


def pc_quantities(norms) -> PCQuantities:
  """(PC) constants from the block norms `[M, M]` of J Phi_t (Eq. 16-19).

  The sup over x of Eq. 18 is replaced by the value at the point the norms were
  taken at; `pc_holds` is the verdict of Def. 10 there.
  """
  norms = jnp.asarray(norms)
  if norms.ndim != 2 or norms.shape[0] != norms.shape[1]:
    raise checks.InputError(f"norms has shape {norms.shape}; expected square block norms [M, M].")
  kappa = jnp.diagonal(norms)
  coupling = norms.sum(axis=1) - kappa
  kd, dc = kappa.max(), coupling.max()
  return PCQuantities(kappa, coupling, kd, dc, kd + dc, 1.0 - kappa - coupling,
                      kd + dc < 1.0)


class ECQuantities(NamedTuple):
  """Euclidean-contraction certificate at one point (PIFS Thm. 6, Def. 7)."""
  nu: jax.Array  # [] isotropic score gain: tr(J eps) / n (Hutchinson)
  delta: jax.Array  # [] ||J eps - nu I||_op
  l_star: float  # L*_t (Eq. 10)
  kappa_bound: jax.Array  # [] 1 - |b_t| (nu - L*_t - delta) (Eq. 13)
  c1: jax.Array  # [] bool, nu > L*_t + delta (Eq. 11)
  c2: jax.Array  # [] bool, |b_t| nu <= sqrt(abar_prev / abar_t) (Eq. 12)
  ec_holds: jax.Array  # [] bool, c1 and c2


def _residual(f, nu, z):
  return f(z) - nu * z


@functools.partial(jax.jit, static_argnames=("num_probes",))
def _hutchinson_trace(fn, x, key, num_probes):
  jvp, _ = linearized(fn, x)
  z = jax.random.rademacher(key, (num_probes,) + x.shape, x.dtype)
  return jnp.mean(jax.vmap(lambda p: jnp.vdot(p, jvp(p)))(z))


def ec_quantities(eps_fn: Callable, x, abar_t: float, abar_prev: float, *, key,
                  num_probes: int = 64, num_iters: int = 100,
                  tol: float = 1e-6) -> ECQuantities:
  """(EC) at x for the step abar_t -> abar_prev (PIFS Thm. 6, Eq. 9-13).

  Uses the decomposition `J eps = nu I + R` with `nu = tr(J eps) / n` (estimated with
  `num_probes` vmapped Rademacher JVPs) and `delta = ||R||_op` (power iteration).
  The verdict is a certificate at this x: (C1) and (C2) holding shows Phi_t
  contracts in l2 near x with factor `kappa_bound`; failing is inconclusive (another
  nu might work).

  Args:
    eps_fn: `[H, W, C] -> [H, W, C]`, the epsilon-predictor at abar_t.
    x: `[H, W, C]`.
    abar_t, abar_prev: the step.
    key: PRNG key (probes and power iteration).
  """
  check_image_map(eps_fn, x, "eps_fn")
  checks.check_positive_int(num_probes, "num_probes")
  x = jnp.asarray(x)
  k1, k2 = jax.random.split(key)
  fn = as_partial(eps_fn)
  nu = _hutchinson_trace(fn, x, k1, int(num_probes)) / x.size
  delta = spectral_norm(jax.tree_util.Partial(_residual, fn, nu), x, key=k2,
                        num_iters=num_iters, tol=tol)
  l_star = float(pifs.contraction_threshold(abar_t, abar_prev))
  b = abs(float(pifs.score_coefficient(abar_t, abar_prev)))
  c1 = nu > l_star + delta
  c2 = b * nu <= np.sqrt(abar_prev / abar_t)
  return ECQuantities(nu, delta, l_star, 1.0 - b * (nu - l_star - delta), c1, c2, c1 & c2)


# -----------------------------------------------------------------------------
# Directional Rayleigh quotients and the suppression field.
# -----------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("patch_size",))
def _rayleigh_core(fn, x, vecs, patch_size):
  jvp, _ = linearized(fn, x)
  m = vecs.shape[0]
  eye = jnp.eye(m, dtype=vecs.dtype)
  tangents = unpatchify(eye[:, :, None] * vecs[:, None, :], x.shape, patch_size)  # [M,H,W,C]
  outs = patchify(jax.vmap(jvp)(tangents), patch_size)  # [M, M(patch), n_k]
  return jnp.einsum("kmn,km,kn->k", outs, eye, vecs)


def diagonal_rayleigh(fn: Callable, x, vectors, *, patch_size: int) -> jax.Array:
  """Rayleigh quotients <v_k, [J]_kk v_k> of the diagonal blocks (PIFS Eq. 32).

  One JVP per patch, vmapped.

  Args:
    fn: `[H, W, C] -> [H, W, C]`; x: `[H, W, C]`.
    vectors: `[M, n_k]`, one direction per patch (normalised here).
    patch_size: p.

  Returns:
    `[M]`.
  """
  check_image_map(fn, x)
  mh, mw, nk = patch_grid(np.shape(x), patch_size)
  x = jnp.asarray(x)
  vecs = jnp.asarray(vectors, x.dtype)
  if vecs.shape != (mh * mw, nk):
    raise checks.InputError(f"vectors has shape {vecs.shape}; expected [M, n_k] = "
                     f"[{mh * mw}, {nk}] for patch_size {patch_size}.")
  return _rayleigh_core(as_partial(fn), x, unit(vecs, -1), int(patch_size))


class Suppression(NamedTuple):
  """Directional suppression at one point (PIFS Def. 18, Eq. 30-32)."""
  suppression: jax.Array  # [M] S_k,t = f_t(lambda_k) - kappa_k,t^diag
  rayleigh: jax.Array  # [M] kappa_k,t^diag = <v_k, [J Phi_t]_kk v_k> (Eq. 32)
  gaussian: np.ndarray  # [M] f_t(lambda_k) (Eq. 26)
  margin: jax.Array  # [M] gamma_k,t = S_k,t - (f_t(lambda_k) - 1) (Eq. 31)


def suppression_field(phi_fn: Callable, x, top_vectors, lambdas, abar_t: float,
                      abar_prev: float, *, patch_size: int) -> Suppression:
  """Directional suppression field S_k,t(x) along each patch's top eigenvector (Eq. 30).

  With the block-diagonal Gaussian surrogate N(0, diag(Sigma_k)),
  `S_k,t = |b_t| <v_k, [grad Delta_t]_kk v_k> = f_t(lambda_k) - <v_k, [J Phi_t]_kk v_k>`
  (Eq. 29-32), so it needs only M directional JVPs of the DDIM step.

  Args:
    phi_fn: the DDIM step Phi_t, `[H, W, C] -> [H, W, C]` (e.g. `ddim_step`).
    x: `[H, W, C]`, a point on the trajectory.
    top_vectors: `[M, n_k]` top eigenvectors v_k^(1) of the patch covariances.
    lambdas: `[M]` their eigenvalues lambda_k.
    abar_t, abar_prev: the step Phi_t takes.
    patch_size: p.
  """
  lam = np.asarray(lambdas, dtype=np.float64)
  if lam.shape != (np.shape(top_vectors)[0],):
    raise checks.InputError(f"lambdas has shape {lam.shape}; expected [M] = "
                     f"[{np.shape(top_vectors)[0]}] to match top_vectors.")
  rq = diagonal_rayleigh(phi_fn, x, top_vectors, patch_size=patch_size)
  f = pifs.expansion_function(lam, abar_t, abar_prev)
  s = jnp.asarray(f, rq.dtype) - rq
  return Suppression(s, rq, f, s - jnp.asarray(f - 1.0, rq.dtype))
