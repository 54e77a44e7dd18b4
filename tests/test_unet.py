"""The per-pixel FiLM UNet: shapes, per-image == constant map, paper parameter counts, bf16."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.models import UNet, init_params

TINY = UNet(out_channels=3, base_channels=16, channel_mult=(1, 2), num_res_blocks=(1, 1),
            num_middle_blocks=1, attention_resolutions=(4,), head_dim=8, time_embed_dim=32,
            num_classes=5, num_groups=8)


@pytest.fixture(scope="module")
def tiny_params():
  params = {"params": init_params(TINY, jax.random.key(0), (8, 8, 3))}
  # Zero-initialised FiLM and output layers make a fresh UNet trivially constant;
  # randomise every parameter so the checks below see a generic network.
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda x: jnp.asarray(
      0.2 * rng.normal(size=x.shape) + (np.asarray(x) if x.ndim == 1 else 0), jnp.float32), params)


def _inputs(b=4):
  k1, k2 = jax.random.split(jax.random.key(2))
  z = jax.random.normal(k1, (b, 8, 8, 3))
  t = jax.random.uniform(k2, (b,))
  y = jnp.array([0, 1, 5, 3])[:b]
  return z, t, y


def test_constant_time_map_equals_per_image_time(tiny_params):
  z, t, y = _inputs()
  apply = jax.jit(TINY.apply)
  per_image = apply(tiny_params, z, t, y)
  per_pixel = apply(tiny_params, z, jnp.broadcast_to(t[:, None, None], (4, 8, 8)), y)
  assert per_image.shape == (4, 8, 8, 3) and per_image.dtype == jnp.float32
  assert float(jnp.abs(per_image).max()) > 1e-2        # the check is not vacuous
  np.testing.assert_allclose(per_pixel, per_image, atol=1e-5)


def test_time_map_is_local(tiny_params):
  """Changing the time of one corner pixel changes the output there but the
  per-pixel FiLM is used: the output differs from the per-image result."""
  z, t, y = _inputs()
  t_map = jnp.broadcast_to(t[:, None, None], (4, 8, 8))
  t2 = t_map.at[:, :4, :4].set(0.9)
  apply = jax.jit(TINY.apply)
  a, b = apply(tiny_params, z, t_map, y), apply(tiny_params, z, t2, y)
  assert float(jnp.abs(a - b).max()) > 1e-3


def test_film_modulation_is_zero_initialised_and_pooling_matches_numpy():
  from asyncpatch_jax.models import embeddings
  params = init_params(TINY, jax.random.key(0), (8, 8, 3))
  films = [v["film"]["kernel"] for k, v in params.items() if "_res_" in k]
  assert films and all(float(jnp.abs(f).max()) == 0.0 for f in films)
  t = np.random.default_rng(0).uniform(size=(2, 8, 8)).astype(np.float32)
  ref = t.reshape(2, 4, 2, 4, 2).mean(axis=(2, 4))
  np.testing.assert_allclose(embeddings.pool_time(jnp.asarray(t), 2), ref, rtol=1e-6)


def test_bfloat16_compute_is_close_to_float32(tiny_params):
  z, t, y = _inputs()
  t_map = jax.random.uniform(jax.random.key(3), (4, 8, 8))
  f32 = jax.jit(TINY.apply)(tiny_params, z, t_map, y)
  bf16 = jax.jit(TINY.clone(dtype=jnp.bfloat16).apply)(tiny_params, z, t_map, y)
  assert bf16.dtype == jnp.float32
  rel = float(jnp.linalg.norm(bf16 - f32) / jnp.linalg.norm(f32))
  assert rel < 0.03, rel


def _count(model, hw=64):
  shapes = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, hw, hw, 3)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def _expected_count(m: UNet, hw=64) -> int:
  """Independent count of the architecture from its description (no flax)."""
  conv = lambda cin, cout, k=3: k * k * cin * cout + cout
  dense = lambda cin, cout: cin * cout + cout
  gn = lambda c: 2 * c
  e = m.time_embed_dim
  res = lambda cin, cout: (gn(cin) + conv(cin, cout) + dense(e, 2 * cout) + gn(cout)
                           + conv(cout, cout) + (0 if cin == cout else conv(cin, cout, 1)))
  attn = lambda c: gn(c) + dense(c, 3 * c) + dense(c, c)
  n = dense(m.base_channels, e) + dense(e, e) + (m.num_classes + 1) * e
  n += conv(3, m.base_channels)
  chans, ch, res_hw = [m.base_channels], m.base_channels, hw
  for level, mult in enumerate(m.channel_mult):
    for _ in range(m.num_res_blocks[level]):
      n += res(ch, m.base_channels * mult); ch = m.base_channels * mult
      n += attn(ch) if res_hw in m.attention_resolutions else 0
      chans.append(ch)
    if level != len(m.channel_mult) - 1:
      n += conv(ch, ch); chans.append(ch); res_hw //= 2
  n += res(ch, ch) + m.num_middle_blocks * (attn(ch) + res(ch, ch))
  for level in reversed(range(len(m.channel_mult))):
    for _ in range(m.num_res_blocks[level] + 1):
      out = m.base_channels * m.channel_mult[level]
      n += res(ch + chans.pop(), out); ch = out
      n += attn(ch) if res_hw in m.attention_resolutions else 0
    if level != 0:
      n += conv(ch, ch); res_hw *= 2
  return n + gn(ch) + conv(ch, 3)


def test_paper_backbones_parameter_counts():
  from configs import imagenet64_60m, imagenet64_620m
  from asyncpatch_jax.models import build_unet
  counts = {}
  for name, mod in (("60m", imagenet64_60m), ("620m", imagenet64_620m)):
    model = build_unet(mod.get_config().model)
    counts[name] = _count(model)
    assert counts[name] == _expected_count(model)
  assert counts == {"60m": 65_412_355, "620m": 622_184_707}   # stated in README.md


def test_bad_inputs_raise(tiny_params):
  z, t, y = _inputs()
  with pytest.raises(ValueError, match="not divisible by 2"):
    TINY.apply(tiny_params, jnp.zeros((4, 9, 8, 3)), t, y)
  with pytest.raises(ValueError, match=r"per-pixel time map \[4, 8, 8\]"):
    TINY.apply(tiny_params, z, jnp.zeros((4, 4, 4)), y)
  with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
    TINY.apply(tiny_params, z, t + 2.0, y)
  with pytest.raises(ValueError, match="labels"):
    TINY.apply(tiny_params, z, t, None)
  with pytest.raises(ValueError, match="channels"):
    TINY.apply(tiny_params, jnp.zeros((4, 8, 8, 1)), t, y)
