"""The DiT on every path of the library: token-aligned training times, every schedule and
policy through the Generator, IPR, the mesh, and the bad inputs refused before compiling.

The model is a tiny DiT (2 blocks, width 32, 2 x 2 tokens on 16 x 16 digits) with random
parameters, all perturbed so that adaLN-Zero's zero-initialised layers do not hide a wrong
modulation. The references are the rules themselves, checked pixel by pixel: a token has one
time at every step (diffusion/tokens.py), times never increase, a token is known only when
all of its pixels are, and every known pixel comes back bit-identical.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax import models
from asyncpatch_jax.config import base_config
from asyncpatch_jax.diffusion import policies
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.diffusion import timesteps
from asyncpatch_jax.diffusion import tokens
from asyncpatch_jax.generation import generate
from asyncpatch_jax.models import uncertainty_head
from asyncpatch_jax.runtime import checks

P = 2
SHAPE = (16, 16, 1)
STEPS = 8


def _dit_config(**overrides):
  cfg = base_config.get_base_config().model
  cfg.update({**dict(name="dit", patch_size=P, hidden_size=32, depth=2, num_heads=2,
                     out_channels=1, num_classes=10, modulation="adaln_zero"), **overrides})
  return cfg


@pytest.fixture(scope="module")
def dit():
  model = models.build_model(_dit_config())
  params = models.init_params(model, jax.random.key(0), SHAPE)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.05 * jax.random.normal(k, l.shape)
                                     for l, k in zip(leaves, keys)])
  head = uncertainty_head.build_head(base_config.get_base_config().uncertainty)
  head_params = head.init(jax.random.key(2), *uncertainty_head.example_inputs(SHAPE))["params"]
  head_params = jax.tree.map(lambda a: a + 0.05, head_params)   # a non-constant uncertainty
  return model, params, head, head_params


def _images(n=2):
  return np.random.default_rng(0).uniform(-1, 1, (n, *SHAPE)).astype(np.float32)


def _cutting_mask():
  """Known: a block whose edges cut through tokens (rows 3..10, columns 5..12)."""
  mask = np.zeros(SHAPE[:2], np.float32)
  mask[3:11, 5:13] = 1
  return mask


def _assert_token_times(tau):
  """One time per token at every step, and times never increase."""
  tau = np.asarray(tau)
  assert tokens.is_token_aligned(tau, P)
  assert np.all(np.diff(tau, axis=0) <= 0)


# ---------------------------------------------------------------- training time maps

@pytest.mark.parametrize("name", timesteps.SAMPLER_NAMES)
def test_training_maps_are_the_pixel_sampler_on_the_token_grid(name):
  """With token_size 2, every sampler's map is its own map at the token resolution (patch
  sizes and Perlin cells halved) repeated over each token: one time per token, and the
  statistics the sampler controls are those of the tokens."""
  key = jax.random.key(3)
  kw = dict(t_min=0.1, t_max=0.9, perlin_cells=(4, 8), perlin_octaves=2)
  on_tokens = timesteps.NoiseLevelSampler(name, patch_sizes=(2, 4, 8), token_size=P, **kw)
  coarse = timesteps.NoiseLevelSampler(name, patch_sizes=(1, 2, 4), **{**kw, "perlin_cells": (2, 4)})
  got = np.asarray(on_tokens(key, 4, 16, 16))
  want = np.repeat(np.repeat(np.asarray(coarse(key, 4, 8, 8)), P, axis=1), P, axis=2)
  np.testing.assert_array_equal(got, want)
  assert tokens.is_token_aligned(got, P)
  assert got.min() >= 0.1 - 1e-6 and got.max() <= 0.9 + 1e-6
  if name in ("independent", "patchwise", "asyncpatch"):
    # The maps vary from token to token (a per-image pooling would fail this).
    assert len(np.unique(got[0])) > 8


def test_training_patch_sizes_must_be_multiples_of_the_token():
  sampler = timesteps.NoiseLevelSampler("asyncpatch", patch_sizes=(2, 6), token_size=4)
  with pytest.raises(checks.InputError, match=r"patch size 2 .* not a multiple of the model's "
                                              r"token size 4"):
    sampler.patch_sizes_for(24, 24)
  # The default sizes keep the multiples of the token: 16x16 with p = 4 draws 4 and 8.
  assert timesteps.NoiseLevelSampler("asyncpatch", token_size=4).patch_sizes_for(16, 16) == (4, 8)


# ---------------------------------------------------------------- schedules

def _schedules():
  mask = _cutting_mask()
  half = np.zeros(SHAPE[:2], np.float32)
  half[:, :7] = 1                                              # cuts the tokens of column 3
  tau_out, box = schedules.outpainting(16, 16, (5, 3, 8, 9), STEPS, num_bands=2)
  return {
      "synchronous": (schedules.synchronous(STEPS, 16, 16), None),
      "inpaint": (schedules.inpainting(mask, STEPS), mask),
      "outpaint": (tau_out, box),
      "autoregressive": (schedules.autoregressive(16, 16, (2, 2), STEPS // 4), None),
      "progressive": (schedules.progressive(half, 3, 3), half),
      "interleaved": (schedules.interleaved(half, 2, 2, 2), half),
  }


@pytest.mark.parametrize("kind", list(_schedules()))
def test_every_schedule_on_a_dit_keeps_token_times_and_known_pixels(dit, kind):
  model, params, _, _ = dit
  gen = generate.Generator(model, mesh=None)
  tau, mask = _schedules()[kind]
  x = _images() if mask is not None else None
  task = gen.task(tau, x, mask, image_shape=SHAPE)
  _assert_token_times(task.tau)
  if mask is not None:
    # A token is known (time 0 throughout) exactly when all of its pixels are.
    whole = tokens.align(1 - mask, P) == 0
    assert np.array_equal(np.all(task.tau == 0, axis=0), whole)
    assert whole.sum() < mask.sum()                    # the mask does cut through tokens
  out = gen.generate(params, task, key=jax.random.key(4), num=2, labels=np.array([3, 7]),
                     guidance_weight=1.5, eta=0.25)
  assert out.shape == (2, *SHAPE) and np.isfinite(out).all()
  if mask is not None:
    known = np.broadcast_to(mask[None, :, :, None] > 0, out.shape)
    np.testing.assert_array_equal(out[known], np.broadcast_to(x, out.shape)[known])
    # The unknown pixels of partly known tokens were generated, not copied.
    partly = (mask == 0) & ~(tokens.align(mask, P) == 0)
    assert partly.any() and np.all(out[:, partly] != x[:, partly])


def test_a_schedule_varying_inside_a_token_is_refused(dit):
  model, params, _, _ = dit
  gen = generate.Generator(model, mesh=None)
  tau = schedules.inpainting(_cutting_mask(), STEPS)          # per pixel, not per token
  with pytest.raises(checks.InputError, match=r"varies inside the DiT's 2x2 tokens.*"
                                              r"Generator.task"):
    gen(params, tau, key=jax.random.key(0), x=_images(), labels=np.array([1, 2]))


# ---------------------------------------------------------------- policies and IPR

POLICIES = {
    "uncertainty_accelerated": lambda: policies.uncertainty_accelerated(2.0),
    "look_ahead": lambda: policies.look_ahead(1.4, 0.4),
    "dual_loop": lambda: policies.dual_loop(2, 0.4),
    "uncertainty_ordered": lambda: policies.uncertainty_ordered((2, 2), 0.5),
}


@pytest.mark.parametrize("name", list(POLICIES))
def test_every_policy_on_a_dit_moves_whole_tokens(dit, name):
  """With an uncertainty head, each adaptive policy's times are one per token at every step
  and never increase; the known pixels (a mask cutting tokens) come back bit-identical."""
  model, params, head, head_params = dit
  gen = generate.Generator(model, mesh=None, head=head)
  mask = _cutting_mask()
  x = _images()
  result = gen(params, POLICIES[name](), key=jax.random.key(5), x=x, budget=12,
               known=np.broadcast_to(mask, (2, 16, 16)), head_params=head_params,
               labels=np.array([0, 9]), eta=0.0, return_history=True, debug=True)
  times = np.asarray(result.history["times"])[: int(result.history["num_steps"]) + 1]
  _assert_token_times(times)
  assert np.all(times[-1] == 0)
  # Tokens with every pixel known are held at 0; the others start at 1.
  whole = tokens.align(1 - mask, P) == 0
  assert np.all(times[:, :, whole] == 0) and np.all(times[0][:, ~whole] == 1)
  out = np.asarray(result.samples)
  known = np.broadcast_to(mask[None, :, :, None] > 0, out.shape)
  np.testing.assert_array_equal(out[known], x[known])


def test_policy_regions_cutting_tokens_are_refused(dit):
  model, params, head, head_params = dit
  gen = generate.Generator(model, mesh=None, head=head)
  with pytest.raises(checks.InputError, match=r"regions cut through the DiT's 2x2 tokens"):
    gen(params, policies.uncertainty_accelerated(2.0, grid=(16, 1)), key=jax.random.key(0),
        shape=(2, *SHAPE), budget=8, head_params=head_params, labels=np.array([0, 1]))


def test_ipr_on_a_dit_regenerates_whole_tokens(dit):
  model, params, _, _ = dit
  gen = generate.Generator(model, mesh=None)
  x = _images()
  mask = np.zeros((16, 16), np.float32)
  mask[:, :8] = 1                                       # the left regions are the condition
  regions, condition = gen.ipr_regions((4, 4), mask, SHAPE)
  assert tokens.is_token_aligned(regions, P) and condition.sum() == 8
  out, history, _ = gen.refine(params, x, key=jax.random.key(6), regions=regions,
                               num_rounds=3, alpha=0.5, num_steps=4, condition=condition,
                               labels=np.array([1, 2]), return_history=True)
  out = np.asarray(out)
  np.testing.assert_array_equal(out[:, :, :8], x[:, :, :8])
  assert np.any(out[:, :, 8:] != x[:, :, 8:])
  with pytest.raises(checks.InputError, match=r"IPR regions cut through the DiT's 2x2 tokens"):
    gen.refine(params, x, key=jax.random.key(6), regions=schedules.grid_regions(16, 16, (16, 16)),
               num_rounds=1, num_steps=4, labels=np.array([1, 2]))


# ---------------------------------------------------------------- the mesh

def test_dit_samples_on_8_devices_equal_one(dit):
  model, params, _, _ = dit
  assert jax.device_count() == 8
  one = generate.Generator(model, mesh=None)
  many = generate.Generator(model)                        # all 8 devices
  mask = _cutting_mask()
  x = np.concatenate([_images(4), _images(4)[::-1]])
  task = one.task(schedules.inpainting(mask, STEPS), x, mask)
  kw = dict(key=jax.random.key(7), labels=np.arange(8), guidance_weight=1.0, eta=0.25)
  a = one.generate(params, task, **kw)
  b = many.generate(params, task, **kw)
  np.testing.assert_allclose(a, b, atol=2e-5)
  assert np.abs(a - b).max() < 1e-3 * np.abs(a).max()


# ---------------------------------------------------------------- the model's bad inputs

def test_dit_shapes_are_checked_before_compiling():
  bad_heads = models.build_model(_dit_config(num_heads=5))
  with pytest.raises(checks.InputError, match=r"num_heads=5 does not divide the DiT width 32"):
    jax.eval_shape(bad_heads.init, jax.random.key(0), jnp.zeros((1, *SHAPE)),
                   jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))
  bad_patch = models.build_model(_dit_config(patch_size=3))
  with pytest.raises(checks.InputError, match=r"patch size 3 does not divide the image \(16 x 16\)"):
    jax.eval_shape(bad_patch.init, jax.random.key(0), jnp.zeros((1, *SHAPE)),
                   jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))


# ---------------------------------------------------------------- Jacobians by token

def test_block_jacobians_by_token_of_a_dit_ddim_step(dit):
  """PIFS's block norms with the DiT's tokens as the partition (patch_size = p): the power
  iteration and the exact method equal the float64 spectral norms of the blocks of the
  dense Jacobian (jax.jacfwd) of one DDIM step, taken token by token."""
  from jax.tree_util import Partial  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.analysis import ddim_maps  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.analysis import jacobian_norms  # pylint: disable=g-import-not-at-top
  model, params, _, _ = dit
  eps_fn = ddim_maps.velocity_to_eps(Partial(models.NullLabelVelocity(model), params))
  step = ddim_maps.ddim_step(eps_fn, 0.3, 0.5)
  x = jnp.asarray(np.random.default_rng(8).normal(size=(8, 8, 1)), jnp.float32)
  dense = np.asarray(jax.jacfwd(step)(x), np.float64).reshape(64, 64)
  token = np.arange(64).reshape(8, 8)
  token = (token // 8 // P) * (8 // P) + (token % 8) // P         # pixel -> token id
  want = np.array([[np.linalg.norm(dense[np.ix_(token.ravel() == k, token.ravel() == j)], 2)
                    for j in range(16)] for k in range(16)])
  exact = np.asarray(jacobian_norms.block_norms(step, x, patch_size=models.patch_size(model),
                                                method="exact"))
  power = np.asarray(jacobian_norms.block_norms(step, x, patch_size=P, key=jax.random.key(9),
                                                method="power", num_iters=200, tol=1e-7))
  np.testing.assert_allclose(exact, want, rtol=1e-4, atol=1e-6)
  # Power iteration converges on the blocks that carry the map (the diagonal ones and those
  # within a tenth of the largest); it never overshoots the top singular value.
  big = want > 0.1 * want.max()
  assert big.sum() >= 16
  np.testing.assert_allclose(power[big], want[big], rtol=2e-3)
  assert (power <= want * (1 + 1e-4) + 1e-7).all()
  # Attention couples every token: the off-diagonal blocks are not zero.
  assert (want[~np.eye(16, dtype=bool)] > 1e-6).all()
