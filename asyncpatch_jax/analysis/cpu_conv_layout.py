"""XLA:CPU only: rewrite the transposed convolutions of a linearised map to the canonical layout.

The power and subspace iterations of the Jacobian tools evaluate linearised maps
(`jacobian_norms.linearized`) many times inside `lax.while_loop`. On XLA:CPU, and
only there, `canonical_convs` makes them fast; GPU and TPU compilers choose kernel
layouts themselves, so `jacobian_norms.linearized` applies it on the CPU backend only.

Why the rewrite: transposing a convolution gives a convolution whose kernel is
labelled output-feature-major (`HWOI`). Outside loops XLA:CPU re-lays such a kernel
out and runs the fast convolution; inside a while loop it does not, and the
convolution falls back to a naive kernel, 5-20x slower (measured in
`experiments/benchmarks/bench_jacobian.py`). `canonical_convs(fn)` evaluates `fn`'s jaxpr with
every `conv_general_dilated` rebound on an explicitly transposed, `HWIO`-ordered
kernel (the same numbers, a canonical layout), recursing into nested jaxprs
(`pjit`, calls, `scan`, `while`, `cond`). Only public `jax.extend.core` types are
used.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.extend import core as jex

_CALL_PARAMS = ("jaxpr", "call_jaxpr", "fun_jaxpr")


def _canonical_conv(eqn, invals):
  lhs, rhs = invals
  dn = eqn.params["dimension_numbers"]
  out_dim, in_dim, *spatial = dn.rhs_spec
  perm = tuple(spatial) + (in_dim, out_dim)
  nsp = len(spatial)
  canon = (nsp + 1, nsp) + tuple(range(nsp))
  if tuple(dn.rhs_spec) == canon:
    return eqn.primitive.bind(lhs, rhs, **eqn.params)
  params = dict(eqn.params, dimension_numbers=jax.lax.ConvDimensionNumbers(
      dn.lhs_spec, canon, dn.out_spec))
  return eqn.primitive.bind(lhs, jnp.transpose(rhs, perm), **params)


def _rewrite_closed(closed: jex.ClosedJaxpr) -> jex.ClosedJaxpr:
  """A ClosedJaxpr with the same signature whose convolutions are canonical."""
  fun = lambda *args: _eval(closed.jaxpr, closed.consts, *args)
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in closed.in_avals]
  return jax.make_jaxpr(fun)(*avals)


def _eval_eqn(eqn, invals):
  name = eqn.primitive.name
  params = eqn.params
  if name == "conv_general_dilated":
    return _canonical_conv(eqn, invals)
  if name in ("pjit", "jit", "closed_call", "core_call", "custom_jvp_call",
              "custom_vjp_call", "remat", "checkpoint"):
    for key in _CALL_PARAMS:
      sub = params.get(key)
      if isinstance(sub, jex.ClosedJaxpr):
        return _eval(sub.jaxpr, sub.consts, *invals)
      if isinstance(sub, jex.Jaxpr):
        return _eval(sub, (), *invals)
  if name == "scan":
    return eqn.primitive.bind(*invals, **dict(params, jaxpr=_rewrite_closed(params["jaxpr"])))
  if name == "while":
    return eqn.primitive.bind(*invals, **dict(
        params, body_jaxpr=_rewrite_closed(params["body_jaxpr"])))
  if name == "cond":
    return eqn.primitive.bind(*invals, **dict(
        params, branches=tuple(_rewrite_closed(b) for b in params["branches"])))
  return eqn.primitive.bind(*invals, **params)


def _eval(jaxpr: jex.Jaxpr, consts, *args):
  env = {}

  def read(v):
    return v.val if isinstance(v, jex.Literal) else env[v]

  for v, c in zip(jaxpr.constvars, consts):
    env[v] = c
  for v, a in zip(jaxpr.invars, args):
    env[v] = a
  for eqn in jaxpr.eqns:
    outs = _eval_eqn(eqn, [read(v) for v in eqn.invars])
    if not eqn.primitive.multiple_results:
      outs = [outs]
    for v, o in zip(eqn.outvars, outs):
      if not isinstance(v, jex.DropVar):
        env[v] = o
  return [read(v) for v in jaxpr.outvars]


def canonical_convs(fn: Callable) -> Callable:
  """`fn` (single array in, single array out) with canonical-layout convolutions.

  Same values as `fn`; meant for linear maps evaluated inside loops.
  """
  def wrapped(x):
    closed = jax.make_jaxpr(fn)(x)
    (out,) = _eval(closed.jaxpr, closed.consts, x)
    return out
  return wrapped
