"""The FID Inception-v3 (pool3, 2048-d) in flax, with weights read from a user's file.

The network FID is defined with (Heusel et al. 2017; TensorFlow's 2015-12-05
Inception graph as ported by pytorch-fid's `fid_inception_v3`): torchvision's
Inception-v3 layout with the FID patches: the average pools of the A, C and E blocks
exclude the padding (`count_include_pad=False`) and the last E block max-pools. The
input is resized to 299 x 299 bilinearly without antialiasing (`F.interpolate(...,
mode='bilinear', align_corners=False)`), in [-1, 1]; the features are the global
average of Mixed_7c. Submodule names are pytorch-fid's state-dict names, so a file
converted by `tools/convert_weights.py --inception=<pt_inception-*.pth>` loads
as is (BatchNorm eps 1e-3, no conv biases).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.evaluation import weights_file

FEATURE_DIM = 2048
INPUT_SIZE = 299


class BasicConv2d(nn.Module):
  """Conv (no bias) + BatchNorm(eps 1e-3, running statistics) + ReLU."""
  features: int
  kernel: tuple[int, int]
  strides: int = 1
  padding: tuple[int, int] = (0, 0)

  @nn.compact
  def __call__(self, x):
    p = self.padding
    x = nn.Conv(self.features, self.kernel, strides=self.strides,
                padding=((p[0], p[0]), (p[1], p[1])), use_bias=False, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=1e-3, name="bn")(x)
    return nn.relu(x)


def _avg3(x):       # 3x3 stride-1 average that ignores the zero padding (TF semantics)
  return nn.avg_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max3s2(x):
  return nn.max_pool(x, (3, 3), (2, 2), padding="VALID")


class InceptionA(nn.Module):
  pool_features: int

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(64, (1, 1), name="branch1x1")(x)
    b5 = BasicConv2d(48, (1, 1), name="branch5x5_1")(x)
    b5 = BasicConv2d(64, (5, 5), padding=(2, 2), name="branch5x5_2")(b5)
    b3 = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(b3)
    b3 = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_3")(b3)
    bp = BasicConv2d(self.pool_features, (1, 1), name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b5, b3, bp], -1)


class InceptionB(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(384, (3, 3), strides=2, name="branch3x3")(x)
    bd = BasicConv2d(64, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(96, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = BasicConv2d(96, (3, 3), strides=2, name="branch3x3dbl_3")(bd)
    return jnp.concatenate([b3, bd, _max3s2(x)], -1)


class InceptionC(nn.Module):
  channels_7x7: int

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = BasicConv2d(192, (1, 1), name="branch1x1")(x)
    b7 = BasicConv2d(c7, (1, 1), name="branch7x7_1")(x)
    b7 = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = BasicConv2d(c7, (1, 1), name="branch7x7dbl_1")(x)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = BasicConv2d(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = BasicConv2d(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(_avg3(x))
    return jnp.concatenate([b1, b7, bd, bp], -1)


class InceptionD(nn.Module):

  @nn.compact
  def __call__(self, x):
    b3 = BasicConv2d(192, (1, 1), name="branch3x3_1")(x)
    b3 = BasicConv2d(320, (3, 3), strides=2, name="branch3x3_2")(b3)
    b7 = BasicConv2d(192, (1, 1), name="branch7x7x3_1")(x)
    b7 = BasicConv2d(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = BasicConv2d(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = BasicConv2d(192, (3, 3), strides=2, name="branch7x7x3_4")(b7)
    return jnp.concatenate([b3, b7, _max3s2(x)], -1)


class InceptionE(nn.Module):
  """pytorch-fid's FIDInceptionE_1 (pool='avg', padding excluded) and _2 (pool='max')."""
  pool: str

  @nn.compact
  def __call__(self, x):
    b1 = BasicConv2d(320, (1, 1), name="branch1x1")(x)
    b3 = BasicConv2d(384, (1, 1), name="branch3x3_1")(x)
    b3 = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], -1)
    bd = BasicConv2d(448, (1, 1), name="branch3x3dbl_1")(x)
    bd = BasicConv2d(384, (3, 3), padding=(1, 1), name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([BasicConv2d(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          BasicConv2d(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], -1)
    pooled = (_avg3(x) if self.pool == "avg" else
              nn.max_pool(x, (3, 3), (1, 1), padding=((1, 1), (1, 1))))
    bp = BasicConv2d(192, (1, 1), name="branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], -1)


def resize_299(images: jax.Array) -> jax.Array:
  """Bilinear resize to 299 x 299 as torch's F.interpolate(align_corners=False, no antialias)."""
  b, _, _, c = images.shape
  return jax.image.resize(images, (b, INPUT_SIZE, INPUT_SIZE, c), "bilinear", antialias=False)


class FIDInceptionV3(nn.Module):
  """pool3 features [B, 2048] of images [B, H, W, 3] in [-1, 1] (resized to 299 x 299)."""

  @nn.compact
  def __call__(self, x):
    x = resize_299(x)
    x = BasicConv2d(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = BasicConv2d(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = BasicConv2d(64, (3, 3), padding=(1, 1), name="Conv2d_2b_3x3")(x)
    x = _max3s2(x)
    x = BasicConv2d(80, (1, 1), name="Conv2d_3b_1x1")(x)
    x = BasicConv2d(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max3s2(x)
    x = InceptionA(32, name="Mixed_5b")(x)
    x = InceptionA(64, name="Mixed_5c")(x)
    x = InceptionA(64, name="Mixed_5d")(x)
    x = InceptionB(name="Mixed_6a")(x)
    x = InceptionC(128, name="Mixed_6b")(x)
    x = InceptionC(160, name="Mixed_6c")(x)
    x = InceptionC(160, name="Mixed_6d")(x)
    x = InceptionC(192, name="Mixed_6e")(x)
    x = InceptionD(name="Mixed_7a")(x)
    x = InceptionE("avg", name="Mixed_7b")(x)
    x = InceptionE("max", name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))


@functools.lru_cache(maxsize=1)
def variable_shapes():
  """The network's variables as ShapeDtypeStructs (no allocation)."""
  return jax.eval_shape(FIDInceptionV3().init, jax.random.key(0),
                        jax.ShapeDtypeStruct((1, 75, 75, 3), jnp.float32))


def expected_tensors() -> dict[str, tuple[int, ...]]:
  """{pytorch-fid state-dict name: shape} of every tensor the network needs (conv, BN)."""
  return weights_file.expected_tensors(variable_shapes())


def load(path: str) -> "InceptionFeatures":
  """The FID feature extractor with weights from an .npz/.safetensors file (convert_weights.py)."""
  return InceptionFeatures(weights_file.load_variables(
      weights_file.read_tensors(path), variable_shapes(), "FID Inception-v3"))


@jax.jit
def _features(variables, images):
  return FIDInceptionV3().apply(variables, images)


class InceptionFeatures:
  """features = InceptionFeatures(variables)(images [B, H, W, C in {1, 3}] in [-1, 1]) -> [B, 2048].

  Grayscale images are repeated to RGB. The Frechet distance of these features is FID.
  """
  name = "inception"
  dim = FEATURE_DIM

  def __init__(self, variables):
    self.variables = variables

  def __call__(self, images) -> jax.Array:
    checks.check_image(images, "images")
    if np.shape(images)[-1] not in (1, 3):
      raise checks.InputError(f"images have {np.shape(images)[-1]} channels; Inception takes RGB "
                              "(3) or grayscale (1, repeated to RGB).")
    images = jnp.asarray(images, jnp.float32)
    if images.shape[-1] == 1:
      images = jnp.repeat(images, 3, axis=-1)
    return _features(self.variables, images)
