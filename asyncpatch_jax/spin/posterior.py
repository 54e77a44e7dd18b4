"""The diffusion-induced (tilted) posterior of the block chain (Growing Images Prop. 3.1).

Each block is corrupted at its own pace, y_l,i(t) = alpha_l(t) s0_l,i + sigma_l(t) xi_l,i
(Eq. 3), with per-block signal-to-noise ratio gamma_l(t) = alpha_l(t) / sigma_l(t).
Bayes' rule turns the prior of Eq. 1-2 into a Blume-Capel model with the same
couplings, an effective crystal field and effective site fields (Eq. 4-6).
"""

from __future__ import annotations

import jax
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.spin.model import BlockChain


def effective_fields(gamma, clean, noise, delta, fields):
  """Effective crystal field and site fields of the tilted posterior (Eq. 4-5).

    Delta_l(t) = Delta_l + gamma_l(t)^2 / 2,
    h_l,i(t)   = h_l,i + gamma_l(t) xi_l,i + gamma_l(t)^2 s0_l,i.

  Pure arithmetic: works on NumPy arrays (float64, host) and on `jnp` arrays
  inside `jit`/`vmap` alike.

  Args:
    gamma: [L] per-block signal-to-noise ratio gamma_l(t) >= 0.
    clean: [L, N] planted clean configuration s0 in {-1, 0, +1}.
    noise: [L, N] standard normal noise xi of the interpolant (Eq. 3).
    delta: [] or [L] prior crystal field.
    fields: [], [L], [L, 1] or [L, N] prior field.
  Returns:
    (delta_eff [L], fields_eff [L, N]).
  """
  arrays = (gamma, clean, noise, delta, fields)
  xp = jax.numpy if any(isinstance(a, jax.Array) for a in arrays) else np
  gamma = xp.asarray(gamma)
  clean = xp.asarray(clean)
  fields = xp.asarray(fields)
  if fields.ndim == 1:
    fields = fields[:, None]
  g = gamma[:, None]
  delta_eff = xp.asarray(delta) + 0.5 * gamma ** 2
  fields_eff = fields + g * xp.asarray(noise) + g ** 2 * clean
  return delta_eff * xp.ones_like(gamma), fields_eff


def tilted_posterior(chain: BlockChain, gamma, clean, noise) -> BlockChain:
  """The posterior P(s | y(t)) of Prop. 3.1 as a new `BlockChain` (Eq. 6).

  Same couplings J_ll' and clamps as `chain`; crystal field Delta_l(t) and site
  fields h_l,i(t) from `effective_fields` (Eq. 4-5), computed in float64. The
  result can be fed to the energy, the mean-field recursion and the heat-bath
  chain like any other chain: exp(-energy(s, tilted)) is proportional to the
  posterior.

  Args:
    chain: the prior chain (Eq. 1-2).
    gamma: [L] per-block signal-to-noise ratios, finite and >= 0.
    clean: [L, N] planted clean configuration, values in {-1, 0, +1}.
    noise: [L, N] noise xi of Eq. 3.
  Returns:
    BlockChain with delta [L] and per-site fields [L, N].
  """
  shape = (chain.num_blocks, chain.block_size)
  gamma = np.asarray(gamma, dtype=np.float64)
  clean = np.asarray(clean, dtype=np.float64)
  noise = np.asarray(noise, dtype=np.float64)
  if gamma.shape != (chain.num_blocks,):
    raise checks.InputError(f"gamma has shape {gamma.shape}; expected one signal-to-noise ratio per "
                     f"block [{chain.num_blocks}].")
  if not np.all(np.isfinite(gamma)) or np.any(gamma < 0):
    raise checks.InputError(f"gamma = {gamma.tolist()}; signal-to-noise ratios must be finite and >= 0.")
  if clean.shape != shape or not np.all(np.isin(clean, (-1.0, 0.0, 1.0))):
    raise checks.InputError(f"clean has shape {clean.shape}; expected a configuration [L, N] = "
                     f"{list(shape)} with values in {{-1, 0, +1}}.")
  if noise.shape != shape or not np.all(np.isfinite(noise)):
    raise checks.InputError(f"noise has shape {noise.shape}; expected finite values of shape "
                     f"{list(shape)}.")
  delta_eff, fields_eff = effective_fields(gamma, clean, noise, chain.delta, chain.fields)
  return chain.replace(delta=delta_eff, fields=fields_eff)
