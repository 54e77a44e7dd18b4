"""The block Blume-Capel chain: parameters, energy (Eq. 2) and response mu_Delta (Eq. 12).

Growing Images, Section 3. A configuration holds spins `s[l, i]` in {-1, 0, +1}
for blocks `l = 0..L-1` (block `l` here is block `l + 1` of the paper) and sites
`i = 0..N-1`. Every pair of spins in one block is coupled by `J_intra / N`, every
pair in neighbouring blocks by `J_inter / N`; `Delta` is the crystal field and
`h` the field. Observed blocks are clamped (inpainting, Section 3).

`BlockChain` is the validated, host-side description (NumPy float64 arrays);
`BlockChain.params()` turns it into the `ChainParams` pytree of `jnp` arrays that
the jitted dynamics consume, so changing a parameter never recompiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks

SPIN_VALUES = (-1, 0, 1)


class ChainParams(NamedTuple):
  """Traced parameters of a block chain (all `jnp` arrays).

  coupling: [L, L] block couplings J_ll' (J_intra on the diagonal).
  delta: [L] crystal field per block.
  fields: [L, K] site fields, K = 1 (block field h_l) or K = N (one per site).
  clamp_mask: [L] bool, True on observed (clamped) blocks.
  clamp_values: [L] clamped magnetisation (0 on hidden blocks).
  block_size: [] N, as a float (enters the rate pi_l / N of Eq. 13).
  """
  coupling: jax.Array
  delta: jax.Array
  fields: jax.Array
  clamp_mask: jax.Array
  clamp_values: jax.Array
  block_size: jax.Array


def as_int(value, name: str, minimum: int) -> int:
  """`value` as an int >= `minimum`, or a ValueError naming `name` (API-boundary check)."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
    raise checks.InputError(f"{name} must be an integer >= {minimum}; got {value!r}.")
  if value < minimum:
    raise checks.InputError(f"{name} must be an integer >= {minimum}; got {value}.")
  return int(value)


def _as_float(value, name: str) -> float:
  try:
    out = float(value)
  except (TypeError, ValueError):
    raise checks.InputError(f"{name} must be a real number; got {value!r}.") from None
  if not np.isfinite(out):
    raise checks.InputError(f"{name} must be finite; got {value!r}.")
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class BlockChain:
  """A chain of L Curie-Weiss Blume-Capel blocks of N spins (Growing Images Eq. 1-2).

  Attributes:
    num_blocks: L >= 1.
    block_size: N >= 1 spins per block (also the N of the rate pi_l / N, Eq. 13).
    j_intra: coupling J_intra inside a block (pairs scaled by 1/N).
    j_inter: coupling J_inter between neighbouring blocks (pairs scaled by 1/N).
    delta: crystal field Delta, a scalar or one per block [L] (the tilted
      posterior of Prop. 3.1 has a block-dependent Delta_l(t), Eq. 4).
    fields: field h, a scalar, one per block [L], or one per site [L, N] (the
      tilted posterior has site fields h_l,i(t), Eq. 5). Stored as [L, K].
    clamped: {block index (0-based): clamped magnetisation in [-1, 1]}; the
      observed set O of Section 3. The finite-N heat-bath chain needs values in
      {-1, 0, +1}.
  """
  num_blocks: int
  block_size: int = 1
  j_intra: float = 1.0
  j_inter: float = 0.6
  delta: float | np.ndarray = 0.5
  fields: float | np.ndarray = 0.0
  clamped: Mapping[int, float] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    num_blocks = as_int(self.num_blocks, "num_blocks", 1)
    block_size = as_int(self.block_size, "block_size (N)", 1)
    set_ = lambda k, v: object.__setattr__(self, k, v)  # frozen dataclass
    set_("num_blocks", num_blocks)
    set_("block_size", block_size)
    set_("j_intra", _as_float(self.j_intra, "j_intra"))
    set_("j_inter", _as_float(self.j_inter, "j_inter"))

    delta = np.asarray(self.delta, dtype=np.float64)
    if delta.ndim == 0:
      delta = np.full((num_blocks,), float(delta))
    if delta.shape != (num_blocks,) or not np.all(np.isfinite(delta)):
      raise checks.InputError(f"delta has shape {delta.shape}; expected a finite scalar or one "
                       f"value per block [{num_blocks}].")
    set_("delta", delta)

    fields = np.asarray(self.fields, dtype=np.float64)
    if fields.ndim == 0:
      fields = np.full((num_blocks, 1), float(fields))
    elif fields.ndim == 1:
      fields = fields[:, None]
    if (fields.ndim != 2 or fields.shape[0] != num_blocks
        or fields.shape[1] not in (1, block_size) or not np.all(np.isfinite(fields))):
      raise checks.InputError(f"fields has shape {np.shape(self.fields)}; expected a finite scalar, "
                       f"one field per block [{num_blocks}] or one per site "
                       f"[{num_blocks}, {block_size}].")
    set_("fields", fields)

    if not isinstance(self.clamped, Mapping):
      raise checks.InputError(f"clamped must be a mapping {{block index: value}}; got {self.clamped!r}.")
    clamped = {}
    for index, value in self.clamped.items():
      if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise checks.InputError(f"clamped block index {index!r} is not an integer.")
      if not 0 <= index < num_blocks:
        raise checks.InputError(f"clamped block index {index} is out of range; expected 0 <= index < "
                         f"num_blocks = {num_blocks} (indices are 0-based).")
      value = _as_float(value, f"clamped[{index}]")
      if not -1.0 <= value <= 1.0:
        raise checks.InputError(f"clamped[{index}] = {value}; a block magnetisation lies in [-1, 1].")
      clamped[int(index)] = value
    if len(clamped) == num_blocks:
      raise checks.InputError(f"all {num_blocks} blocks are clamped; at least one hidden block is needed.")
    set_("clamped", dict(sorted(clamped.items())))

  @property
  def hidden(self) -> tuple[int, ...]:
    """Indices of the hidden (unclamped) blocks H, left to right."""
    return tuple(l for l in range(self.num_blocks) if l not in self.clamped)

  @property
  def clamp_mask(self) -> np.ndarray:
    """[L] bool, True on observed blocks."""
    return np.array([l in self.clamped for l in range(self.num_blocks)])

  @property
  def clamp_values(self) -> np.ndarray:
    """[L] clamped magnetisations (0 on hidden blocks)."""
    return np.array([self.clamped.get(l, 0.0) for l in range(self.num_blocks)])

  def coupling_matrix(self) -> np.ndarray:
    """[L, L] block couplings: J_ll = J_intra, J_l,l+-1 = J_inter, else 0 (Eq. 2)."""
    return coupling_matrix(self.num_blocks, self.j_intra, self.j_inter)

  def replace(self, **changes) -> "BlockChain":
    """A copy with some attributes changed (validated again)."""
    return dataclasses.replace(self, **changes)

  def params(self, dtype=None) -> ChainParams:
    """The traced `ChainParams` (default float dtype of JAX unless `dtype` is given)."""
    dtype = dtype or jnp.asarray(0.0).dtype
    return ChainParams(
        coupling=jnp.asarray(self.coupling_matrix(), dtype),
        delta=jnp.asarray(self.delta, dtype),
        fields=jnp.asarray(self.fields, dtype),
        clamp_mask=jnp.asarray(self.clamp_mask),
        clamp_values=jnp.asarray(self.clamp_values, dtype),
        block_size=jnp.asarray(self.block_size, dtype))


def coupling_matrix(num_blocks: int, j_intra: float, j_inter: float) -> np.ndarray:
  """[L, L] tridiagonal block coupling matrix of Eq. 2 (float64)."""
  num_blocks = as_int(num_blocks, "num_blocks", 1)
  coupling = np.diag(np.full(num_blocks, float(j_intra)))
  off = np.full(num_blocks - 1, float(j_inter))
  return coupling + np.diag(off, 1) + np.diag(off, -1)


def log_partition_and_mean(u, delta):
  """Single-spin log-partition and mean for weights exp(u s - Delta s^2), s in {-1, 0, 1}.

  Returns `(log(1 + 2 e^-Delta cosh u), mu_Delta(u))`, computed without overflow.
  Shapes broadcast.
  """
  u = jnp.asarray(u)
  top = jnp.maximum(jnp.abs(u) - delta, 0.0)
  zero = jnp.exp(-top)
  plus = jnp.exp(u - delta - top)
  minus = jnp.exp(-u - delta - top)
  total = zero + plus + minus
  return top + jnp.log(total), (plus - minus) / total


def blume_capel_response(u, delta):
  """Blume-Capel response mu_Delta(u) = 2 sinh(u) / (e^Delta + 2 cosh(u)) (Eq. 12).

  The conditional mean of one spin with weights exp(u s - Delta s^2), s in
  {-1, 0, +1}, evaluated stably for large |u| and |Delta|. `u`, `delta`
  broadcast; returns their broadcast shape.
  """
  return log_partition_and_mean(u, delta)[1]


def energy(spins, chain: BlockChain | ChainParams):
  """Energy E(s) of Eq. 2 (per-block Delta and per-site fields allowed).

  E(s) = -(1/N) sum_<(l,i),(l',j)> J_ll' s_li s_l'j + sum_l Delta_l sum_i s_li^2
         - sum_l,i h_l,i s_li,
  the pair sum over unordered pairs of distinct spins in the same or adjacent
  blocks. Clamped blocks enter with whatever values `spins` holds there.

  Args:
    spins: [..., L, N] spins in {-1, 0, +1} (any real values are accepted).
    chain: the chain (or its `ChainParams`).
  Returns:
    [...] energies.
  """
  params = chain.params() if isinstance(chain, BlockChain) else chain
  spins = jnp.asarray(spins, params.coupling.dtype)
  if isinstance(chain, BlockChain) and spins.ndim >= 1 and spins.shape[-1] != chain.block_size:
    raise checks.InputError(f"spins has shape {spins.shape}; expected [..., L, N={chain.block_size}].")
  num_blocks = params.coupling.shape[0]
  if spins.ndim < 2 or spins.shape[-2] != num_blocks:
    raise checks.InputError(f"spins has shape {spins.shape}; expected [..., L={num_blocks}, N].")
  if params.fields.shape[1] not in (1, spins.shape[-1]):
    raise checks.InputError(f"spins has N = {spins.shape[-1]} sites per block but the chain has "
                     f"{params.fields.shape[1]} site fields per block.")
  n = spins.shape[-1]
  sums = spins.sum(-1)                                    # [..., L]
  squares = (spins ** 2).sum(-1)                          # [..., L]
  diag = jnp.diag(params.coupling)
  intra = 0.5 * diag * (sums ** 2 - squares)              # pairs i < j in a block
  inter = jnp.einsum("...l,lk,...k->...", sums, jnp.triu(params.coupling, 1), sums)
  pair = (intra.sum(-1) + inter) / n
  return -pair + (params.delta * squares).sum(-1) - (params.fields * spins).sum((-2, -1))
