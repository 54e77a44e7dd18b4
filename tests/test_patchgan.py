"""PatchGAN discriminator (models/patchgan.py): shape, receptive field, min size, forward, size.

References: the conv-arithmetic closed forms of its documented stack (4x4 kernels,
padding 1, strides 2 x num_layers then 1, 1), an enumeration of image sizes, a float64
NumPy forward pass, and a hand count of the parameters of taming's NLayerDiscriminator
layout.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.models import patchgan


def _out_side(n: int, num_layers: int) -> int:
  """Conv arithmetic, floor((n + 2p - k) / s) + 1 with k = 4, p = 1, per documented layer."""
  for stride in [2] * num_layers + [1, 1]:
    n = (n + 2 - 4) // stride + 1
  return n


def _window(u: int, num_layers: int) -> tuple[int, int]:
  """Input rows [first, last] (unclipped) seen by output row u: r_{l-1} = s_l r_l + k_l - 1,
  start_{l-1} = s_l start_l - p_l, composed from the output back to the input."""
  first, last = u, u
  for stride in reversed([2] * num_layers + [1, 1]):
    first, last = stride * first - 1, stride * last - 1 + 3
  return first, last


def _shape(n: int, num_layers: int, channels: int = 8, c_in: int = 3):
  model = patchgan.PatchDiscriminator(channels=channels, num_layers=num_layers)
  x = jax.ShapeDtypeStruct((1, n, n, c_in), jnp.float32)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  return jax.eval_shape(model.apply, params, x).shape


@pytest.mark.parametrize("num_layers", [1, 2, 3])
def test_output_shape_and_min_image_size_against_conv_arithmetic_and_enumeration(num_layers):
  for n in (3 * 2 ** num_layers, 40, 64, 70):
    assert _shape(n, num_layers) == (1, _out_side(n, num_layers), _out_side(n, num_layers), 1)
  smallest = next(n for n in range(1, 200) if _out_side(n, num_layers) >= 1)
  assert patchgan.min_image_size(num_layers) == smallest == 3 * 2 ** num_layers
  assert _shape(smallest, num_layers)[1:3] == (1, 1)
  assert _shape(smallest - 1, num_layers)[1] == 0            # one pixel less: no logit


def test_receptive_field_of_taming_default_is_70():
  first, last = _window(0, 3)
  assert last - first + 1 == 70 and first == -23             # the classic 70 x 70 PatchGAN


def _norm_bypassed(next_fun, args, kwargs, context):
  if isinstance(context.module, nn.GroupNorm) and context.method_name == "__call__":
    return args[0]
  return next_fun(*args, **kwargs)


@pytest.mark.parametrize("num_layers,n,u,v", [(1, 24, 4, 6), (2, 48, 5, 3)])
def test_receptive_field_by_vjp_equals_the_closed_form_window(num_layers, n, u, v):
  """Support of d logit[u, v] / d x = the window of the conv stack.

  GroupNorm normalises with statistics over the whole image, so every logit depends on
  every pixel through them (checked below); the patch window is that of the convolutions,
  which the gradient shows once the norms are bypassed (flax method interception).
  """
  model = patchgan.PatchDiscriminator(channels=8, num_layers=num_layers)
  rng = np.random.default_rng(1)
  x = rng.standard_normal((1, n, n, 2)).astype(np.float32)
  params = jax.tree_util.tree_map(        # generic weights: no accidental zero gradient
      lambda l: rng.standard_normal(l.shape).astype(np.float32) / np.sqrt(np.prod(l.shape[:-1])),
      jax.eval_shape(model.init, jax.random.key(2), x))

  def logit(x, bypass):
    if bypass:
      with nn.intercept_methods(_norm_bypassed):
        return model.apply(params, x)[0, u, v, 0]
    return model.apply(params, x)[0, u, v, 0]

  grad_fn = jax.jit(jax.grad(logit), static_argnums=1)
  grad = np.abs(np.asarray(grad_fn(x, True))[0]).sum(-1)
  (r0, r1), (c0, c1) = _window(u, num_layers), _window(v, num_layers)
  assert r0 > 0 and c0 > 0 and r1 < n - 1 and c1 < n - 1    # the window is inside the image
  expected = np.zeros((n, n), bool)
  expected[r0:r1 + 1, c0:c1 + 1] = True
  np.testing.assert_array_equal(grad > 0, expected)
  assert r1 - r0 + 1 == 9 * 2 ** num_layers - 2              # 1 + sum (k - 1) * jump
  full = np.abs(np.asarray(grad_fn(x, False))[0]).sum(-1)
  assert (full[~expected] > 0).all()                          # GroupNorm: global dependence


def _np_conv(x, kernel, bias, stride):
  """float64 cross-correlation, 4x4 kernel, padding 1: out[i, j] = sum_ab xp[s i + a, s j + b] K[a, b]."""
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (xp.shape[1] - 4) // stride + 1, (xp.shape[2] - 4) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, kernel.shape[-1]))
  for a in range(4):
    for b in range(4):
      patch = xp[:, a:a + stride * (ho - 1) + 1:stride, b:b + stride * (wo - 1) + 1:stride]
      out += patch @ kernel[a, b]
  return out if bias is None else out + bias


def _np_group_norm(x, groups, scale, bias, eps=1e-6):
  b, h, w, c = x.shape
  g = x.reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = ((g - mean) ** 2).mean(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(x.shape) * scale + bias


def test_forward_pass_matches_a_float64_numpy_reference():
  """The documented stack in NumPy: convs, GroupNorm(gcd(c, 32) groups), LeakyReLU(0.2)."""
  num_layers, channels = 2, 4
  model = patchgan.PatchDiscriminator(channels=channels, num_layers=num_layers)
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 16, 16, 3)).astype(np.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(4), x)
  params = jax.tree_util.tree_map(                   # random scales and biases too
      lambda l: (0.3 * rng.standard_normal(l.shape)).astype(np.float32), shapes)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params["params"])
  leaky = lambda z: np.where(z >= 0, z, 0.2 * z)
  h = leaky(_np_conv(x, p["conv_0"]["kernel"], p["conv_0"]["bias"], 2))
  for n in range(1, num_layers + 1):
    c = channels * min(2 ** n, 8)
    h = _np_conv(h, p[f"conv_{n}"]["kernel"], None, 2 if n < num_layers else 1)
    h = leaky(_np_group_norm(h, np.gcd(c, 32), p[f"norm_{n}"]["scale"], p[f"norm_{n}"]["bias"]))
  ref = _np_conv(h, p["conv_out"]["kernel"], p["conv_out"]["bias"], 1)
  out = np.asarray(jax.jit(model.apply)(params, x))
  assert out.shape == ref.shape == (2, 2, 2, 1) and out.dtype == np.float32
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4)


def _hand_count(channels: int, num_layers: int, c_in: int) -> int:
  widths = [channels] + [channels * min(2 ** n, 8) for n in range(1, num_layers + 1)]
  count = 16 * c_in * widths[0] + widths[0]                  # conv_0 with bias
  for prev, c in zip(widths[:-1], widths[1:]):
    count += 16 * prev * c + 2 * c                           # bias-free conv + GroupNorm scale, bias
  return count + 16 * widths[-1] + 1                         # conv_out with bias


@pytest.mark.parametrize("channels,num_layers,c_in,expected", [
    (64, 3, 3, 2_765_633),         # taming's NLayerDiscriminator (BatchNorm has as many params)
    (64, 4, 3, None),              # widths capped at 8 x 64
    (16, 2, 1, None)])
def test_parameter_count_by_hand(channels, num_layers, c_in, expected):
  model = patchgan.PatchDiscriminator(channels=channels, num_layers=num_layers)
  n = patchgan.min_image_size(num_layers)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, n, n, c_in)))
  count = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  assert count == _hand_count(channels, num_layers, c_in)
  if expected is not None:
    assert count == expected
  top = params["params"][f"conv_{num_layers}"]["kernel"].shape
  assert top == (4, 4, channels * min(2 ** (num_layers - 1), 8), channels * min(2 ** num_layers, 8))
