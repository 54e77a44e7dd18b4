"""models/dit.py and diffusion/tokens.py: DiT with per-token adaLN, against independent
references (the DiT paper's parameter count, a float64 NumPy forward pass, NumPy
modulations of PixArt-alpha's adaLN-single)."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.diffusion import tokens
from asyncpatch_jax.models import dit
from asyncpatch_jax.runtime import checks

SMALL = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, out_channels=3, num_classes=5)
SHAPE = (8, 12, 3)              # not square: catches swapped axes; 4 x 6 tokens


def _params(model, key=0, scale=0.1):
  """The model's parameters with every leaf perturbed (adaLN-Zero starts at zero)."""
  x = jnp.zeros((1, *SHAPE))
  params = model.init(jax.random.key(key), x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  leaves, tree = jax.tree.flatten(params["params"])
  keys = jax.random.split(jax.random.key(key + 1), len(leaves))
  return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape)
                                   for l, k in zip(leaves, keys)])


# ------------------------------------------------------------------ float64 NumPy reference

def _np_pos_embed(dim, gh, gw):
  """MAE's get_2d_sincos_pos_embed, for a gh x gw grid (grid[0] holds the column)."""
  def one_d(d, pos):
    omega = 1.0 / 10000 ** (np.arange(d // 2) / (d / 2.0))
    out = np.outer(pos.reshape(-1), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)
  grid = np.meshgrid(np.arange(gw, dtype=np.float64), np.arange(gh, dtype=np.float64))
  return np.concatenate([one_d(dim // 2, grid[0]), one_d(dim // 2, grid[1])], axis=1)


def _ln(x):
  return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def _silu(x):
  return x / (1 + np.exp(-x))


def _dense(p, x):
  return x @ p["kernel"] + p["bias"]


def _t_embed(p, t):
  half = 128
  freqs = np.exp(-math.log(10000) * np.arange(half) / half)
  args = 1000.0 * np.asarray(t, np.float64)[..., None] * freqs
  h = np.concatenate([np.cos(args), np.sin(args)], -1)
  return _dense(p["dense_1"], _silu(_dense(p["dense_0"], h)))


def _np_dit(params, x, t, y, cfg, modulation="adaln_zero"):
  """DiT's forward pass in float64 from the DiT paper's description (Sec. 3 and its code's
  layout: timm attention, tanh GELU, LayerNorm without affine, eps 1e-6)."""
  P = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
  x = np.asarray(x, np.float64)
  b, hh, ww, c = x.shape
  p, d, heads = cfg["patch_size"], cfg["hidden_size"], cfg["num_heads"]
  gh, gw, n = hh // p, ww // p, (hh // p) * (ww // p)
  patches = x.reshape(b, gh, p, gw, p, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, n, p * p * c)
  h = patches @ P["x_embedder"]["kernel"].reshape(p * p * c, d) + P["x_embedder"]["bias"]
  h = h + _np_pos_embed(d, gh, gw)[None]
  t = np.asarray(t, np.float64)
  tok_t = t[:, None] * np.ones((1, n)) if t.ndim == 1 else \
      t.reshape(b, gh, p, gw, p).mean(axis=(2, 4)).reshape(b, n)
  cond = _t_embed(P["t_embedder"], tok_t) + P["y_embedder"]["embedding"][np.asarray(y)][:, None]
  if modulation == "adaln_single":
    shared = _dense(P["t_block"], _silu(cond)).reshape(b, n, 6, d)
  layer = lambda tree, i: jax.tree.map(lambda a: a[i], tree)   # block i of the stack
  for i in range(cfg["depth"]):
    if modulation == "adaln_zero":
      mod = _dense(layer(P["blocks"]["adaln"], i), _silu(cond)).reshape(b, n, 6, d)
    else:
      mod = shared + P["blocks"]["scale_shift_table"][i]
    blk = layer(P["blocks"]["block"], i)
    s1, c1, g1, s2, c2, g2 = (mod[:, :, k] for k in range(6))
    a = _ln(h) * (1 + c1) + s1
    qkv = _dense(blk["qkv"], a).reshape(b, n, 3, heads, d // heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    logits = np.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(d // heads)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    att = np.einsum("bhqk,bkhe->bqhe", w, v).reshape(b, n, d)
    h = h + g1 * _dense(blk["proj"], att)
    m = _ln(h) * (1 + c2) + s2
    h = h + g2 * _dense(blk["fc2"], _gelu_tanh(_dense(blk["fc1"], m)))
  if modulation == "adaln_zero":
    fin = _dense(P["final_adaln"], _silu(cond)).reshape(b, n, 2, d)
  else:
    fin = cond[:, :, None] + P["final_scale_shift_table"]
  h = _ln(h) * (1 + fin[:, :, 1]) + fin[:, :, 0]
  h = _dense(P["final_linear"], h)
  out = h.reshape(b, gh, gw, p, p, -1).transpose(0, 1, 3, 2, 4, 5)
  return out.reshape(b, hh, ww, -1), mod


@pytest.mark.parametrize("modulation", dit.MODULATIONS)
@pytest.mark.parametrize("per_pixel", [False, True])
def test_forward_pass_equals_the_float64_numpy_dit(modulation, per_pixel):
  model = dit.DiT(**SMALL, modulation=modulation)
  params = _params(model)
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, *SHAPE)).astype(np.float32)
  if per_pixel:   # token-aligned maps: each 2 x 2 patch its own time
    t = tokens.align(rng.uniform(size=(2, *SHAPE[:2])), 2).astype(np.float32)
  else:
    t = np.array([0.3, 0.8], np.float32)
  y = np.array([1, 5])          # 5 = the null label
  got = model.apply({"params": params}, x, t, y)
  want, _ = _np_dit(params, x, t, y, SMALL, modulation)
  assert got.shape == (2, *SHAPE)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-4)


def test_per_image_time_is_the_constant_map():
  model = dit.DiT(**SMALL)
  params = _params(model)
  x = np.random.default_rng(1).normal(size=(2, *SHAPE)).astype(np.float32)
  t = np.array([0.25, 0.75], np.float32)
  a = model.apply({"params": params}, x, t, np.array([0, 1]))
  b = model.apply({"params": params}, x, np.broadcast_to(t[:, None, None], (2, 8, 12)),
                  np.array([0, 1]))
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


def _modulations(inter) -> np.ndarray:
  """Every block's sown modulation, [depth, B, N or 1, 6, D] (the blocks are a scan)."""
  (mods,) = inter["intermediates"]["blocks"]["modulation"]
  return np.asarray(mods)


@pytest.mark.parametrize("modulation", dit.MODULATIONS)
def test_changing_one_tokens_time_changes_that_tokens_modulation_alone(modulation):
  """Token 7 (row 1, column 1 of the 4 x 6 grid) gets another time: its modulation changes
  in every block, every other token's stays bitwise; its output moves more than a far
  token's (row 3, column 5)."""
  model = dit.DiT(**SMALL, modulation=modulation)
  params = _params(model)
  x = np.random.default_rng(2).normal(size=(1, *SHAPE)).astype(np.float32)
  t0 = np.full((1, 8, 12), 0.5, np.float32)
  t1 = t0.copy()
  t1[0, 2:4, 2:4] = 0.9
  runs = [model.apply({"params": params}, x, t, np.array([2]), mutable=["intermediates"])
          for t in (t0, t1)]
  (out0, inter0), (out1, inter1) = runs
  for m0, m1 in zip(_modulations(inter0), _modulations(inter1)):
    changed = np.any(np.asarray(m0) != np.asarray(m1), axis=(2, 3))[0]     # [N]
    assert changed.tolist() == [i == 7 for i in range(24)]
  delta = np.abs(np.asarray(out1) - np.asarray(out0))[0].sum(-1)
  near, far = delta[2:4, 2:4].mean(), delta[6:8, 10:12].mean()
  assert near > 3 * far > 0, (near, far)


def test_adaln_single_modulations_equal_numpy():
  model = dit.DiT(**SMALL, modulation="adaln_single")
  params = _params(model)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, *SHAPE)).astype(np.float32)
  t = tokens.align(rng.uniform(size=(2, 8, 12)), 2).astype(np.float32)
  _, inter = model.apply({"params": params}, x, t, np.array([4, 0]), mutable=["intermediates"])
  _, last_mod = _np_dit(params, x, t, np.array([4, 0]), SMALL, "adaln_single")
  np.testing.assert_allclose(_modulations(inter)[-1], last_mod,
                             rtol=1e-5, atol=1e-5)


def _count_from_the_paper(depth, d, p, c_in, c_out, classes, freq=256):
  """Parameters of DiT from its description: patch embedding, t and y embedders, `depth`
  blocks (qkv, proj, 4x MLP, adaLN 6D), the final layer (adaLN 2D, linear to p^2 c_out)."""
  embed = p * p * c_in * d + d
  t_emb = freq * d + d + d * d + d
  y_emb = (classes + 1) * d
  block = (3 * d * d + 3 * d) + (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d) \
      + (6 * d * d + 6 * d)
  final = (2 * d * d + 2 * d) + (d * p * p * c_out + p * p * c_out)
  return embed + t_emb + y_emb + depth * block + final


def test_dit_xl2_has_the_published_parameter_count():
  """DiT-XL/2, 32 x 32 x 4 latents, 1000 classes, learned sigma (8 output channels): DiT's
  train.py prints 675,129,632 parameters, which counts its fixed position embedding
  (an nn.Parameter without gradient, 256 tokens x 1152) -- a constant here."""
  depth, d, heads = dit.SIZES["XL"]
  model = dit.DiT(patch_size=2, hidden_size=d, depth=depth, num_heads=heads, out_channels=8,
                  num_classes=1000)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 4)),
                                             jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))
  count = sum(math.prod(l.shape) for l in jax.tree.leaves(shapes["params"]))
  assert count == _count_from_the_paper(depth, d, 2, 4, 8, 1000)
  assert count + 256 * d == 675_129_632


def test_position_embedding_is_maes():
  np.testing.assert_allclose(dit.pos_embed_2d(16, 3, 5), _np_pos_embed(16, 3, 5), atol=1e-12)


def test_token_times_are_patch_means_and_align_takes_each_patchs_largest_time():
  t = np.arange(2 * 4 * 6, dtype=np.float32).reshape(2, 4, 6) / 48
  got = np.asarray(tokens.token_times(t, 2))
  want = t.reshape(2, 2, 2, 3, 2).mean(axis=(2, 4)).reshape(2, 6)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  aligned = tokens.align(t, 2)
  assert tokens.is_token_aligned(aligned, 2) and not tokens.is_token_aligned(t, 2)
  np.testing.assert_array_equal(aligned[0, :2, :2], np.full((2, 2), t[0, :2, :2].max()))
  known = np.zeros((4, 6))
  known[:, :3] = 1                 # a mask that cuts through the middle patches
  assert (tokens.align(1 - known, 2) == 0).sum() == 8     # only whole known patches stay 0


@pytest.mark.parametrize("kwargs, shape, match", [
    (dict(patch_size=3), (8, 12, 3), "patch size 3 does not divide"),
    (dict(num_heads=5), (8, 12, 3), "num_heads=5 does not divide"),
    (dict(hidden_size=30, num_heads=3), (8, 12, 3), "multiple of 4"),
    (dict(modulation="adaln"), (8, 12, 3), "model.modulation"),
])
def test_bad_shapes_stop_in_one_line(kwargs, shape, match):
  model = dit.DiT(**{**SMALL, **kwargs})
  with pytest.raises(checks.InputError, match=match):
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *shape)),
                                      jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))


@pytest.mark.parametrize("size, paper_gmacs", [("B", 23.01), ("XL", 118.64)])
def test_flops_match_the_paper_and_per_token_time_adds_its_closed_form(size, paper_gmacs):
  """Per-image DiT-B/2 and XL/2 at 256 x 256 (32 x 32 x 4 latents): XLA's FLOPs are twice
  the DiT paper's Gflops (multiply-adds, its Table 4) within 1%; per-token time adds
  `per_token_extra_flops` within 1% for both modulations."""
  depth, d, heads = dit.SIZES[size]
  for modulation in dit.MODULATIONS:
    model = dit.DiT(patch_size=2, hidden_size=d, depth=depth, num_heads=heads, out_channels=8,
                    num_classes=1000, modulation=modulation)
    image = dit.forward_flops(model, (32, 32, 4), per_token=False)
    token = dit.forward_flops(model, (32, 32, 4), per_token=True)
    if modulation == "adaln_zero":
      assert image / 2e9 == pytest.approx(paper_gmacs, rel=0.01)
    extra = dit.per_token_extra_flops(model, 256)
    assert token - image == pytest.approx(extra, rel=0.01), modulation


@pytest.mark.parametrize("size", ["S", "B", "L", "XL"])
def test_the_dit_configs_build_the_papers_models(size):
  """configs/dit.py:imagenet256,<size>/<p> builds the DiT paper's depth, width and heads
  (its table is a copy of dit.SIZES, kept so that reading a config loads no jax), for every
  patch; on DiT's 32x32x4 latents with 1000 classes and learned sigma the parameters are the
  paper's architecture's count, through eval_shape."""
  from asyncpatch_jax import models  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.config import base_config  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "dit.py")
  for p in (2, 4, 8):
    config = base_config.load_config_file(path, f"imagenet256,{size}/{p}")
    assert (config.model.depth, config.model.hidden_size, config.model.num_heads) == dit.SIZES[size]
    config.model.update(out_channels=8, num_classes=1000)
    model = models.build_model(config.model)
    assert isinstance(model, dit.DiT) and model.patch_size == p
    shapes = jax.eval_shape(lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 4)),
                                                   jnp.zeros((1,)), jnp.zeros((1,), jnp.int32)))
    count = sum(math.prod(l.shape) for l in jax.tree.leaves(shapes["params"]))
    depth, d, _ = dit.SIZES[size]
    assert count == _count_from_the_paper(depth, d, p, 4, 8, 1000)
