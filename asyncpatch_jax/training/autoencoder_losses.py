"""The localized VQ autoencoder's losses (AsyncPatch App. F; latent diffusion's VQ loss):
masked L1, the VQ terms, the PatchGAN hinge loss, the adaptive GAN weight, codebook usage.

autoencoder_train.losses combines them (its module docstring gives the total).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from asyncpatch_jax.runtime import checks

BETA_CONVENTIONS = ("codebook", "commitment")


def masked_l1(x: jax.Array, x_rec: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean |x - x_rec| over the known pixels (mask [B, H, W] = 1) and channels."""
  w = mask[..., None].astype(jnp.float32)
  return jnp.sum(w * jnp.abs(x - x_rec)) / (jnp.maximum(jnp.sum(w), 1.0) * x.shape[-1])


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 (mean relu(1 - D(x)) + mean relu(1 + D(x_rec))) (taming's hinge_d_loss)."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def adaptive_weight(nll_fn, g_fn, last_layer: jax.Array, *, scale: float = 1.0,
                    max_weight: float = 1e4, eps: float = 1e-4) -> jax.Array:
  """Latent diffusion's adaptive GAN weight (taming `calculate_adaptive_weight`).

  scale * clip(||grad nll(W)|| / (||grad g(W)|| + eps), 0, max_weight) at the last layer
  W, with no gradient through it. nll_fn, g_fn: W -> scalar.
  """
  g_nll = jax.grad(nll_fn)(last_layer)
  g_g = jax.grad(g_fn)(last_layer)
  w = jnp.linalg.norm(g_nll) / (jnp.linalg.norm(g_g) + eps)
  return jax.lax.stop_gradient(scale * jnp.clip(w, 0.0, max_weight))


def vq_loss(h: jax.Array, z_q: jax.Array, beta: float = 0.25,
            beta_on: str = "codebook") -> tuple[jax.Array, dict[str, jax.Array]]:
  """The VQ terms (van den Oord et al. 2017, Eq. 3) as means over elements.

  commitment = mean ||h - sg(z_q)||^2 (trains the encoder), codebook = mean
  ||sg(h) - z_q||^2 (trains the codebook). beta_on='codebook' (default) is
  taming-transformers' legacy form used by latent diffusion's VQ models:
  loss = commitment + beta * codebook; beta_on='commitment' is the paper's
  loss = codebook + beta * commitment.
  """
  checks.check_choice(beta_on, BETA_CONVENTIONS, "autoencoder.beta_on")
  commitment = jnp.mean((h - jax.lax.stop_gradient(z_q)) ** 2)
  codebook = jnp.mean((jax.lax.stop_gradient(h) - z_q) ** 2)
  if beta_on == "codebook":
    loss = commitment + beta * codebook
  else:
    loss = codebook + beta * commitment
  return loss, {"commitment_loss": commitment, "codebook_loss": codebook}


def codebook_usage(indices: jax.Array, codebook_size: int) -> tuple[jax.Array, jax.Array]:
  """(counts [K] int32, perplexity) of a batch of code indices.

  perplexity = exp(-sum_k p_k log p_k), p = counts / N: K when all codes are used
  equally, 1 when one code takes everything.
  """
  counts = jnp.bincount(indices.reshape(-1), length=codebook_size).astype(jnp.int32)
  p = counts / jnp.maximum(counts.sum(), 1)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return counts, jnp.exp(entropy)
