"""LPIPS (Zhang et al. 2018) with the AlexNet or VGG-16 trunk in flax, weights from a user's file.

As the `lpips` package (v0.1): inputs in [-1, 1] are shifted by [-.030, -.088, -.188] and
scaled by [.458, .448, .450]; the trunk's activations (AlexNet relu1-5; VGG relu1_2,
relu2_2, relu3_3, relu4_3, relu5_3) are unit-normalised over channels
(x / (||x|| + 1e-10)); the squared differences go through the learned non-negative
1x1 weights `lin0..lin4` (no bias), are averaged over space and summed over layers.
Submodule names spell the package's state-dict names (`net.slice1.0.weight`,
`lin0.model.1.weight`), so a file converted by `tools/convert_weights.py --lpips_lin=...
--lpips_trunk=...` loads as is.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.evaluation import weights_file

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
# torchvision `features` index of each conv, per LPIPS slice (5 slices = 5 compared layers).
SLICES = {
    "alex": ((0,), (3,), (6,), (8,), (10,)),
    "vgg": ((0, 2), (5, 7), (10, 12, 14), (17, 19, 21), (24, 26, 28)),
}
ALEX_CONVS = {0: (64, 11, 4, 2), 3: (192, 5, 1, 2), 6: (384, 3, 1, 1), 8: (256, 3, 1, 1),
              10: (256, 3, 1, 1)}                       # features, kernel, stride, padding
VGG_WIDTHS = (64, 128, 256, 512, 512)


class LPIPS(nn.Module):
  """distance [B] = LPIPS()(x [B, H, W, 3], y [B, H, W, 3]), both in [-1, 1]."""
  net: str = "alex"

  def _trunk(self, x):
    feats = []
    for s, convs in enumerate(SLICES[self.net]):
      if self.net == "alex" and s in (1, 2):   # torchvision features[2], features[5]
        x = nn.max_pool(x, (3, 3), (2, 2))
      elif self.net == "vgg" and s > 0:         # features[4], [9], [16], [23]
        x = nn.max_pool(x, (2, 2), (2, 2))
      for i in convs:
        if self.net == "alex":
          f, k, st, p = ALEX_CONVS[i]
        else:
          f, k, st, p = VGG_WIDTHS[s], 3, 1, 1
        x = nn.relu(nn.Conv(f, (k, k), strides=st, padding=((p, p), (p, p)),
                            name=f"net__slice{s + 1}__{i}")(x))
      feats.append(x)
    return feats

  @nn.compact
  def __call__(self, x, y):
    shift, scale = jnp.asarray(SHIFT), jnp.asarray(SCALE)
    feats = self._trunk((jnp.concatenate([x, y]) - shift) / scale)   # one trunk pass for both
    total = 0.0
    for k, f in enumerate(feats):
      a, b = jnp.split(f, 2)
      a = a / (jnp.sqrt(jnp.sum(a * a, -1, keepdims=True)) + 1e-10)
      b = b / (jnp.sqrt(jnp.sum(b * b, -1, keepdims=True)) + 1e-10)
      d = nn.Conv(1, (1, 1), use_bias=False, name=f"lin{k}__model__1")((a - b) ** 2)
      total = total + jnp.mean(d, axis=(1, 2, 3))
    return total


@functools.lru_cache(maxsize=2)
def variable_shapes(net: str):
  """The variables of LPIPS(net) as ShapeDtypeStructs (no allocation)."""
  checks.check_choice(net, tuple(SLICES), "LPIPS net")
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(LPIPS(net).init, jax.random.key(0), x, x)


def expected_tensors(net: str) -> dict[str, tuple[int, ...]]:
  """{lpips state-dict name: shape} of LPIPS(net)."""
  return weights_file.expected_tensors(variable_shapes(net))


def _detect_net(tensors) -> str:
  # AlexNet's first conv is 11x11; VGG's is 3x3.
  w = tensors.get("net.slice1.0.weight")
  return "alex" if w is not None and np.shape(w)[-1] == 11 else "vgg"


class LPIPSDistance:
  """lpips = LPIPSDistance(variables, net); lpips(x, y) -> [B] for images in [-1, 1].

  Jittable and differentiable (it can sit inside a training loss); grayscale images
  are repeated to RGB.
  """

  def __init__(self, variables, net: str):
    self.variables, self.net = variables, net
    self._apply = jax.jit(LPIPS(net).apply)

  def __call__(self, x, y) -> jax.Array:
    if np.shape(x) != np.shape(y) or len(np.shape(x)) != 4 or np.shape(x)[-1] not in (1, 3):
      raise checks.InputError(f"LPIPS compares two image batches of one shape [B, H, W, 1 or 3]; "
                              f"got {tuple(np.shape(x))} and {tuple(np.shape(y))}.")
    x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
    if x.shape[-1] == 1:
      x, y = jnp.repeat(x, 3, axis=-1), jnp.repeat(y, 3, axis=-1)
    return self._apply(self.variables, x, y)


def load(path: str, net: str | None = None) -> LPIPSDistance:
  """LPIPS with the weights of an .npz/.safetensors file; `net` ('alex'/'vgg') or from the file."""
  tensors = weights_file.read_tensors(path)
  net = net or _detect_net(tensors)
  return LPIPSDistance(weights_file.load_variables(tensors, variable_shapes(net), f"LPIPS-{net}"),
                       net)
