"""Jacobian norms of image maps by JVP/VJP power iteration (PIFS Sec. 3, 4.1, 7.2-7.4).

Every tool takes a map `fn: [H, W, C] -> [H, W, C]` (typically a DDIM step
`ddim_maps.ddim_step`) and a point `x: [H, W, C]`, and never materialises the
Jacobian J = d fn / dx unless asked to (`method="exact"`):

* `spectral_norm`: ||J||_op by power iteration on J^T J (one JVP + one VJP a step,
  through `jax.linearize` so the forward pass runs once).
* `differentiable_spectral_norm`: the same, differentiable in model parameters
  (u^T J(params) v with the converged singular vectors held fixed).
* `block_norms`: all M x M block norms ||[J]_kj||_op for a patch partition at once
  (the M^2 power iterations are one vmapped batch), or exactly by materialising J
  with vmapped JVPs; `method="auto"` picks the cheaper by counted cost
  (`norm_method.block_norm_costs`).

Maps may be plain callables or `jax.tree_util.Partial`s; a Partial's arrays are
traced arguments, so evaluating many steps or parameter values reuses one
compilation. Shapes are checked with `jax.eval_shape` before anything compiles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.analysis import cpu_conv_layout
from asyncpatch_jax.analysis import norm_method
from asyncpatch_jax.analysis.ddim_maps import as_partial, check_image_map
from asyncpatch_jax.analysis.patch_stats import patch_grid, patch_permutation, patchify, unpatchify

_TINY = 1e-30


def check_iters(num_iters, tol):
  checks.check_positive_int(num_iters, "num_iters")
  if not tol >= 0:
    raise checks.InputError(f"tol = {tol}; expected >= 0.")


def unit(v, axis=None):
  n = jnp.linalg.norm(v, axis=axis, keepdims=axis is not None)
  return v / jnp.maximum(n, _TINY)


def linearized(fn: Callable, x) -> tuple[Callable, Callable]:
  """`(jvp, vjp)`: `t -> J t` and `u -> J^T u` for J = d fn / dx at x (one forward pass).

  Both are linear, shape-preserving for maps `[H, W, C] -> [H, W, C]` and vmappable.
  On the CPU backend their convolutions are rewritten to the canonical kernel layout
  (`cpu_conv_layout`: XLA:CPU runs transposed convolutions 5-20x slower inside loops);
  elsewhere they are returned as `jax.linearize` gives them.
  """
  _, jvp = jax.linearize(fn, x)
  transpose = jax.linear_transpose(jvp, x)

  def vjp(u):
    return transpose(u)[0]

  if jax.default_backend() != "cpu":
    return jvp, vjp
  return cpu_conv_layout.canonical_convs(jvp), cpu_conv_layout.canonical_convs(vjp)


# -----------------------------------------------------------------------------
# Global spectral norm.
# -----------------------------------------------------------------------------


class SpectralNorm(NamedTuple):
  sigma: jax.Array  # [] largest singular value ||J v||
  u: jax.Array  # [H, W, C] left singular vector J v / sigma
  v: jax.Array  # [H, W, C] right singular vector
  num_iters: jax.Array  # [] iterations run


@functools.partial(jax.jit, static_argnames=("num_iters",))
def _power_core(fn, x, v0, tol, num_iters):
  jvp, vjp = linearized(fn, x)

  def body(c):
    i, v, _, s = c
    w = jvp(v)
    g = vjp(unit(w))
    return i + 1, unit(g), s, jnp.linalg.norm(g)  # ||J^T u||, u = Jv / ||Jv||

  def cond(c):
    i, _, s_old, s = c
    return (i < num_iters) & (jnp.abs(s - s_old) > tol * s)

  zero = jnp.zeros((), x.dtype)
  i, v, _, _ = jax.lax.while_loop(cond, body, (0, unit(v0), zero - 1.0, zero))
  w = jvp(v)
  sigma = jnp.linalg.norm(w)
  return SpectralNorm(sigma, w / jnp.maximum(sigma, _TINY), v, i)


def spectral_norm(fn: Callable, x, *, key, num_iters: int = 100, tol: float = 1e-6,
                  return_vectors: bool = False):
  """Largest singular value of J = d fn / dx at x (PIFS Sec. 3.1, Eq. 8; Sec. 7.4).

  Power iteration on J^T J: `v <- J^T J v / ||J^T J v||`, each step one JVP and one
  VJP of `jax.linearize(fn, x)`, in a `lax.while_loop` that stops after `num_iters`
  steps or when the estimate changes by at most `tol` (relative).

  Args:
    fn: `[H, W, C] -> [H, W, C]`.
    x: `[H, W, C]`, the point.
    key: PRNG key for the start vector.
    num_iters: maximum number of steps.
    tol: relative convergence tolerance on the singular value.
    return_vectors: also return u, v and the iteration count.

  Returns:
    sigma `[]`, or a `SpectralNorm(sigma, u, v, num_iters)`.
  """
  check_image_map(fn, x)
  check_iters(num_iters, tol)
  x = jnp.asarray(x)
  v0 = jax.random.normal(key, x.shape, x.dtype)
  out = _power_core(as_partial(fn), x, v0, jnp.asarray(tol, x.dtype), num_iters)
  return out if return_vectors else out.sigma


def differentiable_spectral_norm(apply_fn: Callable, params, x, *, key,
                                 num_iters: int = 100, tol: float = 1e-6):
  """Spectral norm of J_x apply_fn(params, x), differentiable w.r.t. params (and x).

  The singular vectors (u, v) come from `spectral_norm` on stop-gradient inputs and
  are held fixed; the value returned is `u^T J(params, x) v` (one JVP), whose
  gradient `u^T (dJ) v` is the derivative of a simple top singular value. Use it
  inside `jax.grad`.

  Args:
    apply_fn: `apply_fn(params, x) -> [H, W, C]` for x `[H, W, C]`.
    params: pytree.
    x: `[H, W, C]`.
    key, num_iters, tol: as in `spectral_norm`.

  Returns:
    sigma `[]`.
  """
  params_sg = jax.lax.stop_gradient(params)
  x_sg = jax.lax.stop_gradient(jnp.asarray(x))
  inner = jax.tree_util.Partial(as_partial(apply_fn), params_sg)
  res = spectral_norm(inner, x_sg, key=key, num_iters=num_iters, tol=tol,
                      return_vectors=True)
  u, v = jax.lax.stop_gradient(res.u), jax.lax.stop_gradient(res.v)
  _, jv = jax.jvp(lambda z: apply_fn(params, z), (jnp.asarray(x),), (v,))
  return jnp.vdot(u, jv)


# -----------------------------------------------------------------------------
# Block norms.
# -----------------------------------------------------------------------------


def materialize_jacobian(fn: Callable, x, *, batch_size: int | None = None) -> jax.Array:
  """The full Jacobian `[n, n]` (n = H W C, flattened row-major) by vmapped JVPs.

  Column i is `J e_i`; the basis vectors are built on the fly and pushed through
  `jax.linearize(fn, x)` in vmapped chunks of `batch_size` (`lax.map`; default
  `auto_batch_size`).
  """
  check_image_map(fn, x)
  x = jnp.asarray(x)
  return _materialize_core(as_partial(fn), x,
                           int(batch_size or auto_batch_size(x.size, x.size)))


@functools.partial(jax.jit, static_argnames=("batch_size",))
def _materialize_core(fn, x, batch_size):
  jvp, _ = linearized(fn, x)
  n = x.size
  col = lambda i: jvp(jax.nn.one_hot(i, n, dtype=x.dtype).reshape(x.shape)).reshape(n)
  cols = jax.lax.map(col, jnp.arange(n), batch_size=min(batch_size, n))  # [n(in), n(out)]
  return cols.T


def _blocks_of(jac, image_shape, patch_size):
  """`[n, n]` (row-major pixel order) -> blocks [J]_kj as `[M, M, n_k, n_k]`."""
  perm = patch_permutation(image_shape, patch_size)  # pixel order -> patch order
  _, _, nk = patch_grid(image_shape, patch_size)
  m = perm.size // nk
  jp = jac[perm][:, perm]
  return jp.reshape(m, nk, m, nk).transpose(0, 2, 1, 3)


@functools.partial(jax.jit, static_argnames=("patch_size", "batch_size"))
def _block_gram_core(fn, x, patch_size, batch_size):
  """Gram matrices [J]_kj^T [J]_kj `[M, M, n_k, n_k]` of the materialised Jacobian."""
  blocks = _blocks_of(_materialize_core(fn, x, batch_size), x.shape, patch_size)
  return jnp.einsum("kjab,kjac->kjbc", blocks, blocks)


def _block_exact(fn, x, patch_size, batch_size):
  """||[J]_kj|| = sqrt(lambda_max([J]_kj^T [J]_kj)) from a symmetric eigensolver.

  XLA:CPU's batched SVD/eigh of 100+ sized matrices is ~30x slower than LAPACK,
  so concrete Gram matrices go to NumPy's `eigvalsh` (float64); traced ones stay
  in jnp.
  """
  gram = _block_gram_core(fn, x, patch_size, batch_size)
  if isinstance(gram, jax.core.Tracer):
    return jnp.sqrt(jnp.maximum(jnp.linalg.eigvalsh(gram)[..., -1], 0.0))
  top = np.linalg.eigvalsh(np.asarray(gram, dtype=np.float64))[..., -1]
  return jnp.asarray(np.sqrt(np.maximum(top, 0.0)), x.dtype)


def _embed(v, image_shape, patch_size, at_input):
  """v `[M, M, n_k]` (k, j) -> images `[M, M, H, W, C]` holding v[k, j] in patch j
  (at_input) or in patch k (otherwise), zero elsewhere."""
  m = v.shape[0]
  eye = jnp.eye(m, dtype=v.dtype)
  sel = eye[None, :, :, None] if at_input else eye[:, None, :, None]
  return unpatchify(sel * v[:, :, None, :], image_shape, patch_size)


def _extract(imgs, patch_size, at_output):
  """images `[M, M, H, W, C]` -> `[M, M, n_k]`: patch k (at_output) or patch j."""
  p = patchify(imgs, patch_size)  # [M, M, M(patch), n_k]
  eye = jnp.eye(p.shape[0], dtype=p.dtype)
  return jnp.einsum("kjmn,km->kjn" if at_output else "kjmn,jm->kjn", p, eye)


def auto_batch_size(n: int, total: int) -> int:
  """Vectors per vmapped chunk for maps on n-entry images.

  On CPU the batch of activations should stay cache-sized: about 2^17 / n
  vectors (a power of two), measured best in `bench_jacobian.py`; elsewhere all
  `total` at once.
  """
  if jax.default_backend() != "cpu":
    return total
  return int(min(total, max(1, 2 ** round(np.log2(2**17 / n)))))


def _batched(f, xs, batch_size):
  """vmap f over the leading axis of xs, in vmapped chunks of batch_size (lax.map)."""
  if batch_size is None or batch_size >= xs.shape[0]:
    return jax.vmap(f)(xs)
  return jax.lax.map(f, xs, batch_size=batch_size)


@functools.partial(jax.jit, static_argnames=("patch_size", "num_iters", "batch_size"))
def _block_power_core(fn, x, v0, tol, patch_size, num_iters, batch_size=None):
  jvp, vjp = linearized(fn, x)
  shape = x.shape
  m = v0.shape[0]
  flat = lambda imgs: imgs.reshape((m * m,) + shape)
  unflat = lambda imgs: imgs.reshape((m, m) + shape)
  bjvp = lambda imgs: unflat(_batched(jvp, flat(imgs), batch_size))
  bvjp = lambda imgs: unflat(_batched(vjp, flat(imgs), batch_size))

  def apply_block(v):  # [J]_kj v_kj for every (k, j)
    return _extract(bjvp(_embed(v, shape, patch_size, True)), patch_size, True)

  def body(c):
    i, v, _, s = c
    w = apply_block(v)
    g = _extract(bvjp(_embed(unit(w, -1), shape, patch_size, False)), patch_size, False)
    return i + 1, unit(g, -1), s, jnp.linalg.norm(g, axis=-1)

  def cond(c):
    i, _, s_old, s = c
    return (i < num_iters) & jnp.any(jnp.abs(s - s_old) > tol * s)

  s0 = jnp.zeros((m, m), x.dtype)
  i, v, _, _ = jax.lax.while_loop(cond, body, (0, unit(v0, -1), s0 - 1.0, s0))
  return jnp.linalg.norm(apply_block(v), axis=-1), i


def block_norms(fn: Callable, x, *, patch_size: int, key=None, num_iters: int = 30,
                tol: float = 1e-6, method: Literal["auto", "power", "exact"] = "auto",
                batch_size: int | None = None, return_info: bool = False):
  """Operator norms of all Jacobian blocks ||[J]_kj||_op (PIFS Thm. 9, Eq. 15-18).

  k indexes the output patch, j the input patch (`patch_stats`, raster order).
  `method="power"` runs the M^2 power iterations on [J]_kj^T [J]_kj as one vmapped
  batch: each step is M^2 JVPs (tangent supported on patch j, output restricted to
  patch k) and M^2 VJPs, stopping after `num_iters` steps or when every block's
  estimate changed by at most `tol`. `method="exact"` materialises J with vmapped
  JVPs and takes the top singular value of every block (the top eigenvalue of its
  Gram matrix). `method="auto"` picks the cheaper by `block_norm_costs`.

  Args:
    fn: `[H, W, C] -> [H, W, C]`.
    x: `[H, W, C]`.
    patch_size: p, dividing H and W.
    key: PRNG key for the start vectors (needed by the power method).
    num_iters, tol: power-iteration budget and relative tolerance.
    method: "auto", "power" or "exact".
    batch_size: vectors per vmapped chunk (the M^2 block vectors of the power
      method, the n basis vectors of the exact one); default `auto_batch_size`.
    return_info: also return a dict with the method used, iterations and costs.

  Returns:
    norms `[M, M]` (and the info dict).
  """
  check_image_map(fn, x)
  _, _, nk = patch_grid(np.shape(x), patch_size)
  check_iters(num_iters, tol)
  if method not in ("auto", "power", "exact"):
    raise checks.InputError(f"method = {method!r}; expected 'auto', 'power' or 'exact'.")
  x = jnp.asarray(x)
  fn = as_partial(fn)
  info = {}
  if method == "auto":
    costs = norm_method.block_norm_costs(fn, x, patch_size=patch_size, num_iters=num_iters)
    method = costs.choice
    info["costs"] = costs._asdict()
  info["method"] = method
  m = x.size // nk
  if method == "exact":
    bs = int(batch_size or auto_batch_size(x.size, x.size))
    norms = _block_exact(fn, x, int(patch_size), bs)
  else:
    if key is None:
      raise checks.InputError("block_norms with the power method needs a PRNG key.")
    bs = int(batch_size or auto_batch_size(x.size, m * m))
    v0 = jax.random.normal(key, (m, m, nk), x.dtype)
    norms, iters = _block_power_core(fn, x, v0, jnp.asarray(tol, x.dtype),
                                     int(patch_size), int(num_iters), bs)
    info["num_iters"] = iters
  info["batch_size"] = bs
  return (norms, info) if return_info else norms
