"""Jacobian norms of image maps by JVP/VJP power iteration (PIFS Sec. 3, 4.1, 7.2-7.5).

Every tool takes a map `fn: [H, W, C] -> [H, W, C]` (typically a DDIM step
`pifs_operators.ddim_step`) and a point `x: [H, W, C]`, and never materialises the
Jacobian J = d fn / dx unless asked to (`method="exact"`):

* `spectral_norm`: ||J||_op by power iteration on J^T J (one JVP + one VJP a step,
  through `jax.linearize` so the forward pass runs once).
* `differentiable_spectral_norm`: the same, differentiable in model parameters
  (u^T J(params) v with the converged singular vectors held fixed).
* `block_norms`: all M x M block norms ||[J]_kj||_op for a patch partition at once
  (the M^2 power iterations are one vmapped batch), or exactly by materialising J
  with vmapped JVPs; `method="auto"` picks the cheaper by counted cost
  (`block_norm_costs`).
* `pc_quantities` / `ec_quantities`: the (PC) and (EC) constants and verdicts
  (Thm. 6, 9; Eq. 13, 16-19).
* `diagonal_rayleigh` / `suppression_field`: <v_k, [J]_kk v_k> and the directional
  suppression field S_k,t (Eq. 30, 32).

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

from asyncpatch_jax import linear_maps
from asyncpatch_jax import pifs
from asyncpatch_jax.patch_stats import patch_grid, patch_permutation, patchify, unpatchify
from asyncpatch_jax.pifs_operators import as_partial

_TINY = 1e-30


# -----------------------------------------------------------------------------
# Boundary checks.
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
    raise ValueError(f"x has shape {shape}; expected one image [H, W, C] (no batch axis).")
  if not callable(fn):
    raise ValueError(f"{name} must be callable, got {type(fn).__name__}.")
  out_shape = _output_shape(fn, shape, jnp.result_type(x))
  if out_shape != shape:
    raise ValueError(f"{name} maps x of shape {shape} to an output of shape {out_shape}; "
                     "the Jacobian tools need a map from [H, W, C] to the same shape.")


def _check_iters(num_iters, tol):
  if int(num_iters) != num_iters or num_iters < 1:
    raise ValueError(f"num_iters = {num_iters}; expected a positive integer.")
  if not tol >= 0:
    raise ValueError(f"tol = {tol}; expected >= 0.")


def _unit(v, axis=None):
  n = jnp.linalg.norm(v, axis=axis, keepdims=axis is not None)
  return v / jnp.maximum(n, _TINY)


def _linearized(fn, x):
  """(jvp, vjp) of fn at x: the forward pass runs once, both maps are linear."""
  return linear_maps.linearized(fn, x)


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
  jvp, vjp = _linearized(fn, x)

  def body(c):
    i, v, _, s = c
    w = jvp(v)
    g = vjp(_unit(w))
    return i + 1, _unit(g), s, jnp.linalg.norm(g)  # ||J^T u||, u = Jv / ||Jv||

  def cond(c):
    i, _, s_old, s = c
    return (i < num_iters) & (jnp.abs(s - s_old) > tol * s)

  zero = jnp.zeros((), x.dtype)
  i, v, _, _ = jax.lax.while_loop(cond, body, (0, _unit(v0), zero - 1.0, zero))
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
  _check_iters(num_iters, tol)
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
  jvp, _ = _linearized(fn, x)
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
  jvp, vjp = _linearized(fn, x)
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
    g = _extract(bvjp(_embed(_unit(w, -1), shape, patch_size, False)), patch_size, False)
    return i + 1, _unit(g, -1), s, jnp.linalg.norm(g, axis=-1)

  def cond(c):
    i, _, s_old, s = c
    return (i < num_iters) & jnp.any(jnp.abs(s - s_old) > tol * s)

  s0 = jnp.zeros((m, m), x.dtype)
  i, v, _, _ = jax.lax.while_loop(cond, body, (0, _unit(v0, -1), s0 - 1.0, s0))
  return jnp.linalg.norm(apply_block(v), axis=-1), i


class BlockNormCosts(NamedTuple):
  """Counted cost (flops) of the two ways to get all block norms (see `block_norm_costs`)."""
  forward: float  # one forward pass
  jvp: float  # one linearised JVP
  vjp: float  # one linearised VJP
  power: float  # num_iters * M^2 * (jvp + vjp)
  exact: float  # n * jvp + M^2 * svd(n_k) (top singular value of each block)
  exact_bytes: int  # memory of the materialised Jacobian
  choice: str  # "power" or "exact"


@jax.jit
def _linearized_partials(fn, x):
  """The linearised JVP and its transpose as `Partial`s (residuals are leaves)."""
  _, jvp = jax.linearize(fn, x)
  return jvp, jax.linear_transpose(jvp, x)


def _flops(f, *args) -> float:
  """XLA's flop count of `f(*args)` (lowered, before optimisation)."""
  analysis = jax.jit(f).lower(*args).cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0)) if analysis else 0.0


# Flops of the top singular value of an m x m block, per m^3: the Gram matrix
# (2 m^3) and the symmetric eigensolver (4/3 m^3 tridiagonalisation, Golub & Van
# Loan Sec. 8.3); the eigensolver is memory-bound LAPACK and runs several times
# slower per flop than the convolutions of a forward pass, which the weight
# folds in (bench_jacobian.py measures it).
SVD_FLOPS_PER_M3 = 10.0 / 3.0
SVD_SLOWDOWN = 4.0


def block_norm_costs(fn: Callable, x, *, patch_size: int, num_iters: int = 30,
                     max_exact_bytes: int = 2**30) -> BlockNormCosts:
  """Counted cost of `block_norms` by power iteration and by materialising J.

  Flops of one forward pass, one JVP and one VJP of the linearised map come from
  XLA's cost analysis; then

    power = num_iters * M^2 * (JVP + VJP)          (vmapped power iterations)
    exact = n * JVP + M^2 * svd(n_k)               (n basis JVPs + M^2 block eigensolves)

  with svd(m) = SVD_SLOWDOWN * SVD_FLOPS_PER_M3 * m^3. Exact is chosen when it is
  cheaper and J (n^2 entries) fits in `max_exact_bytes`.
  """
  check_image_map(fn, x)
  _, _, nk = patch_grid(np.shape(x), patch_size)
  x = jnp.asarray(x)
  fn = as_partial(fn)
  n = x.size
  m = n // nk
  fwd = _flops(lambda f, z: f(z), fn, x)
  jvp_lin, vjp_lin = _linearized_partials(fn, x)
  jvp = _flops(lambda lin, t: lin(t), jvp_lin, x)
  vjp = _flops(lambda lin, u: lin(u), vjp_lin, x)
  power = float(num_iters) * m * m * (jvp + vjp)
  svd = SVD_SLOWDOWN * SVD_FLOPS_PER_M3 * float(nk) ** 3
  exact = n * jvp + m * m * svd
  nbytes = n * n * x.dtype.itemsize
  choice = "exact" if (exact < power and nbytes <= max_exact_bytes) else "power"
  return BlockNormCosts(fwd, jvp, vjp, power, exact, nbytes, choice)


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
  _check_iters(num_iters, tol)
  if method not in ("auto", "power", "exact"):
    raise ValueError(f"method = {method!r}; expected 'auto', 'power' or 'exact'.")
  x = jnp.asarray(x)
  fn = as_partial(fn)
  info = {}
  if method == "auto":
    costs = block_norm_costs(fn, x, patch_size=patch_size, num_iters=num_iters)
    method = costs.choice
    info["costs"] = costs._asdict()
  info["method"] = method
  m = x.size // nk
  if method == "exact":
    bs = int(batch_size or auto_batch_size(x.size, x.size))
    norms = _block_exact(fn, x, int(patch_size), bs)
  else:
    if key is None:
      raise ValueError("block_norms with the power method needs a PRNG key.")
    bs = int(batch_size or auto_batch_size(x.size, m * m))
    v0 = jax.random.normal(key, (m, m, nk), x.dtype)
    norms, iters = _block_power_core(fn, x, v0, jnp.asarray(tol, x.dtype),
                                     int(patch_size), int(num_iters), bs)
    info["num_iters"] = iters
  info["batch_size"] = bs
  return (norms, info) if return_info else norms


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
    raise ValueError(f"norms has shape {norms.shape}; expected square block norms [M, M].")
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
  jvp, _ = _linearized(fn, x)
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
  if int(num_probes) != num_probes or num_probes < 1:
    raise ValueError(f"num_probes = {num_probes}; expected a positive integer.")
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
  jvp, _ = _linearized(fn, x)
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
    raise ValueError(f"vectors has shape {vecs.shape}; expected [M, n_k] = "
                     f"[{mh * mw}, {nk}] for patch_size {patch_size}.")
  return _rayleigh_core(as_partial(fn), x, _unit(vecs, -1), int(patch_size))


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
    raise ValueError(f"lambdas has shape {lam.shape}; expected [M] = "
                     f"[{np.shape(top_vectors)[0]}] to match top_vectors.")
  rq = diagonal_rayleigh(phi_fn, x, top_vectors, patch_size=patch_size)
  f = pifs.expansion_function(lam, abar_t, abar_prev)
  s = jnp.asarray(f, rq.dtype) - rq
  return Suppression(s, rq, f, s - jnp.asarray(f - 1.0, rq.dtype))
