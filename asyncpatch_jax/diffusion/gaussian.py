"""Closed-form velocity field of Gaussian data under per-pixel rectified flow.

For data x ~ N(mu, Sigma) (flattened over [H, W, C]) and a per-pixel time map t,
z = A x + S eps with A = diag(1 - t), S = diag(t) (each pixel's time repeated over
its channels). (v, z) is jointly Gaussian with v = eps - x, so the optimal
(minimum-MSE) velocity is linear in z:

    v*(z, t) = E[v | z] = -mu + (S - Sigma A) (A Sigma A + S^2)^{-1} (z - A mu).

It is the exact model against which the sampler, the loss and the Jacobian tools
are tested: sampling with it maps noise to N(mu, Sigma), and with clean pixels
(t = 0) it conditions on them (AsyncPatch Lemma 1, Eq. 5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks


class GaussianVelocity:
  """The exact velocity field `v*(z, t_map)` of data N(mu, Sigma) on images [H, W, C].

  Attributes:
    mean: [H, W, C].
    cov: [D, D] with D = H * W * C, positive definite.
  """

  def __init__(self, mean, cov):
    mean = np.asarray(mean)
    if mean.ndim != 3:
      raise checks.InputError(f"mean has shape {mean.shape}; expected an image [H, W, C].")
    d = mean.size
    cov = np.asarray(cov)
    if cov.shape != (d, d):
      raise checks.InputError(f"cov has shape {cov.shape}; expected [{d}, {d}] for a mean of "
                       f"shape {mean.shape}.")
    if not np.allclose(cov, cov.T, atol=1e-6 * np.abs(cov).max()):
      raise checks.InputError("cov is not symmetric.")
    if np.linalg.eigvalsh(cov).min() <= 0:
      raise checks.InputError("cov is not positive definite.")
    self.shape = mean.shape
    self.mean = jnp.asarray(mean)
    self.cov = jnp.asarray(cov)

  def _single(self, z, t_map):
    """z: [H, W, C]; t_map: [H, W] -> v: [H, W, C]."""
    c = self.shape[-1]
    t = jnp.repeat(t_map.reshape(-1), c).astype(self.cov.dtype)  # [D], pixel-major like z
    a = 1.0 - t
    mu = self.mean.reshape(-1)
    cov_z = a[:, None] * self.cov * a[None, :] + jnp.diag(t * t)
    cross = jnp.diag(t) - self.cov * a[None, :]                   # Cov(v, z)
    v = -mu + cross @ jnp.linalg.solve(cov_z, z.reshape(-1) - a * mu)
    return v.reshape(self.shape)

  def __call__(self, z: jax.Array, t: jax.Array, **unused_cond) -> jax.Array:
    """z: [B, H, W, C]; t: [B] or [B, H, W] -> v*: [B, H, W, C]."""
    b, h, w = z.shape[:3]
    t_map = jnp.broadcast_to(t.reshape(t.shape + (1,) * (3 - t.ndim)), (b, h, w))
    return jax.vmap(self._single)(z, t_map).astype(z.dtype)
