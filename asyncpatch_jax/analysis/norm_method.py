"""Which way to get all Jacobian block norms: power iteration or materialising J, by counted cost.

`block_norm_costs` counts (with XLA's cost analysis) the flops of one forward pass,
one JVP and one VJP of the linearised map, and compares M^2 vmapped power
iterations with n basis JVPs plus M^2 small eigensolves (PIFS Sec. 7.3 needs all
M^2 block norms at every step). `jacobian_norms.block_norms(method="auto")` uses it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.analysis.ddim_maps import as_partial, check_image_map
from asyncpatch_jax.analysis.patch_stats import patch_grid


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
def linearized_partials(fn, x):
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
  jvp_lin, vjp_lin = linearized_partials(fn, x)
  jvp = _flops(lambda lin, t: lin(t), jvp_lin, x)
  vjp = _flops(lambda lin, u: lin(u), vjp_lin, x)
  power = float(num_iters) * m * m * (jvp + vjp)
  svd = SVD_SLOWDOWN * SVD_FLOPS_PER_M3 * float(nk) ** 3
  exact = n * jvp + m * m * svd
  nbytes = n * n * x.dtype.itemsize
  choice = "exact" if (exact < power and nbytes <= max_exact_bytes) else "power"
  return BlockNormCosts(fwd, jvp, vjp, power, exact, nbytes, choice)
