"""PatchGAN discriminator (Isola et al. 2017) of the VQ autoencoder's adversarial loss.

taming-transformers' `NLayerDiscriminator` (3 layers, 64 filters in latent diffusion's
VQ models): 4x4 convolutions, stride 2 for the first `num_layers`, then two stride-1
ones, channels 64 * min(2^n, 8), LeakyReLU(0.2), one logit per patch. taming
normalises with BatchNorm; here GroupNorm (per example, no running statistics to
carry in the train state, and the same result however the batch is sharded).
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp


class PatchDiscriminator(nn.Module):
  """x [B, H, W, C] -> patch logits [B, h, w, 1]."""
  channels: int = 64
  num_layers: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    pad = ((1, 1), (1, 1))
    h = nn.Conv(self.channels, (4, 4), strides=(2, 2), padding=pad, name="conv_0")(x)
    h = nn.leaky_relu(h, 0.2)
    for n in range(1, self.num_layers + 1):
      c = self.channels * min(2 ** n, 8)
      stride = 2 if n < self.num_layers else 1
      h = nn.Conv(c, (4, 4), strides=(stride, stride), padding=pad, use_bias=False,
                  name=f"conv_{n}")(h)
      h = nn.GroupNorm(num_groups=math.gcd(c, 32), name=f"norm_{n}")(h)
      h = nn.leaky_relu(h, 0.2)
    return nn.Conv(1, (4, 4), padding=pad, name="conv_out")(h).astype(jnp.float32)


def min_image_size(num_layers: int) -> int:
  """Smallest square side that leaves one logit: stride-2 layers halve (floor), the two
  stride-1 4x4 layers (padding 1) remove one pixel each, so side / 2^L - 2 >= 1."""
  return 3 * 2 ** num_layers
