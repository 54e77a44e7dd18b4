"""Compute that follows the schedule (models/dit_cache.py): the cached sampler of a
clean-context DiT equals the full masked model on every schedule, and its cost follows
the number of noisy tokens.

References: the full clean-context model run on every token at every step (the same
parameters through `model.apply`, the cache not involved), enumeration of every token
count for the capacity buckets, XLA's cost analysis of the compiled pass against the
closed form of its matrix multiplies, and a float64 NumPy attention for the mask.

The model is a tiny DiT (2 blocks, width 32, 4 x 4 tokens of 4 x 4 pixels on 16 x 16
images: 16 tokens) whose parameters are all perturbed, so that adaLN-Zero's
zero-initialised layers do not hide a token that reads the wrong keys.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax import models
from asyncpatch_jax.config import base_config
from asyncpatch_jax.data import masks as masks_lib
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.diffusion import timesteps
from asyncpatch_jax.diffusion import tokens
from asyncpatch_jax.generation import generate
from asyncpatch_jax.models import dit as dit_lib
from asyncpatch_jax.models import dit_cache
from asyncpatch_jax.models import uncertainty_head
from asyncpatch_jax.runtime import checks
from tests.test_dit_pipeline import POLICIES

P = 4
SHAPE = (16, 16, 1)
N = 16
STEPS = 6
LABELS = np.array([3, 7])


def _dit_config(**overrides):
  cfg = base_config.get_base_config().model
  cfg.update({**dict(name="dit", patch_size=P, hidden_size=32, depth=2, num_heads=2,
                     out_channels=1, num_classes=10, modulation="adaln_zero",
                     clean_context=True), **overrides})
  return cfg


def _perturbed(params, seed=1, scale=0.2):
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape)
                                   for l, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def dit():
  model = models.build_model(_dit_config())
  params = _perturbed(models.init_params(model, jax.random.key(0), SHAPE))
  head = uncertainty_head.build_head(base_config.get_base_config().uncertainty)
  head_params = head.init(jax.random.key(2), *uncertainty_head.example_inputs(SHAPE))["params"]
  head_params = _perturbed(head_params, seed=3, scale=0.3)     # a non-constant uncertainty
  full = generate.Generator(model, mesh=None, head=head)
  cached = generate.Generator(model, mesh=None, head=head, clean_cache=True)
  return model, params, head_params, full, cached


def _images(n=2):
  return np.random.default_rng(0).uniform(-1, 1, (n, *SHAPE)).astype(np.float32)


def _assert_same(cached, full, known=None, x=None):
  """Within float32 rounding of the sample's scale; known pixels bit-identical."""
  cached, full = np.asarray(cached), np.asarray(full)
  scale = max(1.0, float(np.abs(full).max()))
  np.testing.assert_allclose(cached, full, rtol=0, atol=2e-5 * scale)
  if known is not None:
    m = np.asarray(known) > 0
    m = np.broadcast_to(m.reshape((1,) * (3 - m.ndim) + m.shape)[..., None], cached.shape)
    np.testing.assert_array_equal(cached[m], np.broadcast_to(x, cached.shape)[m])
    np.testing.assert_array_equal(full[m], np.broadcast_to(x, full.shape)[m])


# ---------------------------------------------------------------- the buckets

@pytest.mark.parametrize("growth", [1.1, 1.25, 2.0])
def test_every_count_gets_a_bucket_that_holds_it(growth):
  """Enumeration over every image size up to 300 tokens and every count: the chosen
  capacity is the smallest that holds the count (no token dropped, none wasted beyond the
  rule) and at most `growth` times the count."""
  for n in range(1, 301):
    caps = dit_cache.buckets(n, growth)
    assert caps[-1] == n and all(a < b for a, b in zip(caps, caps[1:]))
    counts = np.arange(1, n + 1)
    chosen = np.asarray(caps)[dit_cache.bucket_index(counts, caps)]
    assert np.all(chosen >= counts)
    smaller = np.asarray([max([c for c in caps if c < k], default=0) for k in counts])
    assert np.all(smaller < counts)                      # no smaller capacity holds it
    assert np.all(chosen <= growth * counts + 1e-9)
    if n in (16, 64, 300):                # the traced rule (inside the sampler) is the same
      traced = jax.jit(lambda k, caps=caps: dit_cache.bucket_index(k, caps))(jnp.asarray(counts))
      np.testing.assert_array_equal(np.asarray(traced), dit_cache.bucket_index(counts, caps))


def test_gathered_slots_hold_exactly_the_selected_tokens():
  rng = np.random.default_rng(0)
  caps = dit_cache.buckets(N)
  for _ in range(50):
    selected = rng.random((3, N)) < rng.random()
    count = int(selected.sum(axis=1).max())
    if count == 0:
      continue
    cap = caps[dit_cache.bucket_index(count, caps)]
    index = np.asarray(dit_cache.gather_index(jnp.asarray(selected), cap))
    for row, sel in zip(index, selected):
      assert sorted(row[row < N].tolist()) == np.flatnonzero(sel).tolist()
      assert np.all(row[len(np.flatnonzero(sel)):] == N)     # padding past the last token


def test_bad_bucket_growth_is_refused():
  with pytest.raises(checks.InputError, match=r"bucket growth 1.0; expected a factor > 1"):
    dit_cache.buckets(16, 1.0)


# ---------------------------------------------------------------- the mask

def test_clean_context_attention_against_numpy(dit):
  """The full model's mask: a clean query attends only to clean keys, a noisy one to all;
  checked against a float64 NumPy softmax with that mask on the first block's q, k, v."""
  clean = np.array([[1, 0, 1, 1, 0, 0], [0, 0, 0, 0, 0, 0]], bool)
  mask = np.asarray(dit_lib.clean_context_mask(jnp.asarray(clean)))
  want = clean[:, None, None, :] | ~clean[:, None, :, None]
  np.testing.assert_array_equal(mask, want)
  rng = np.random.default_rng(1)
  q, k, v = (rng.normal(size=(2, 6, 2, 8)).astype(np.float32) for _ in range(3))
  got = np.asarray(jax.nn.dot_product_attention(q, k, v, mask=jnp.asarray(mask)))
  logits = np.einsum("bqhe,bkhe->bhqk", q.astype(np.float64), k) / np.sqrt(8)
  logits = np.where(want, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  np.testing.assert_allclose(got, np.einsum("bhqk,bkhe->bqhe", w, v), atol=1e-5)


def test_clean_tokens_do_not_see_noisy_ones(dit):
  """In the full clean-context model, changing the noisy tokens' inputs leaves the clean
  tokens' outputs unchanged, and changes the noisy tokens' (they see everything)."""
  model, params, *_ = dit
  x = jnp.asarray(_images())
  t = np.full((2, 16, 16), 0.5, np.float32)
  t[:, :8] = 0.0                                         # the top two token rows are clean
  y = jnp.asarray(LABELS)
  out = model.apply({"params": params}, x, jnp.asarray(t), y)
  x2 = x.at[:, 8:].add(1.0)
  out2 = model.apply({"params": params}, x2, jnp.asarray(t), y)
  np.testing.assert_array_equal(np.asarray(out)[:, :8], np.asarray(out2)[:, :8])
  assert np.abs(np.asarray(out)[:, 8:] - np.asarray(out2)[:, 8:]).min() > 0
  # ... and a clean token does react to another clean token.
  x3 = x.at[:, :4].add(1.0)
  out3 = model.apply({"params": params}, x3, jnp.asarray(t), y)
  assert np.abs(np.asarray(out)[:, 4:8] - np.asarray(out3)[:, 4:8]).max() > 1e-3


# ---------------------------------------------------------------- exactness, every schedule

def _schedule_cases():
  half = np.zeros(SHAPE[:2], np.float32)
  half[:, :7] = 1                                        # cuts the tokens of column 1
  tau_out, box = schedules.outpainting(16, 16, (4, 2, 8, 9), STEPS, num_bands=2)
  cases = {f"inpaint_{f}": (schedules.inpainting(m, STEPS), m) for f, m in
           ((f, masks_lib.make_masks(f, 1, 16, 16, seed=3)[0]) for f in masks_lib.FAMILIES)}
  cases.update({
      "synchronous": (schedules.synchronous(STEPS, 16, 16), None),
      "outpaint": (tau_out, box),
      "autoregressive": (schedules.autoregressive(16, 16, (2, 2), 2), None),
      "progressive": (schedules.progressive(half, 3, 2), half),
      "interleaved": (schedules.interleaved(half, 2, 2, 1), half),
  })
  return cases


@pytest.mark.parametrize("kind", list(_schedule_cases()))
def test_cache_equals_the_full_model_on_every_schedule(dit, kind):
  """With CFG (the batch of 2B shares one cache), every LaMa family, outpainting and the
  staged schedules: the cached samples equal the full model's; known pixels bit-identical."""
  model, params, _, full, cached = dit
  tau, mask = _schedule_cases()[kind]
  x = _images() if mask is not None else None
  kw = dict(key=jax.random.key(4), num=2, labels=LABELS, guidance_weight=1.5, eta=0.25)
  task = full.task(tau, x, mask, image_shape=SHAPE)
  a = full.generate(params, task, **kw)
  b = cached.generate(params, cached.task(tau, x, mask, image_shape=SHAPE), **kw)
  _assert_same(b, a, mask, x)


def test_cache_equals_the_full_model_with_input_guidance(dit):
  """Input guidance runs the model at a second, re-noised input: its own cache."""
  model, params, _, full, cached = dit
  mask = masks_lib.make_masks("wide", 1, 16, 16, seed=1)[0]
  x = _images()
  kw = dict(key=jax.random.key(7), num=2, labels=LABELS, eta=0.0, input_guidance=1.0)
  a = full.generate(params, full.task(schedules.inpainting(mask, STEPS), x, mask), **kw)
  b = cached.generate(params, cached.task(schedules.inpainting(mask, STEPS), x, mask), **kw)
  _assert_same(b, a, mask, x)


@pytest.mark.parametrize("name", list(POLICIES))
def test_cache_equals_the_full_model_under_every_policy(dit, name):
  """The four adaptive policies with an uncertainty head: tokens finish at different steps,
  so the cache is refreshed whenever one does; same times, samples and step counts."""
  model, params, head_params, full, cached = dit
  mask = masks_lib.make_masks("thin", 1, 16, 16, seed=2)[0]
  x = _images()
  kw = dict(key=jax.random.key(5), x=x, budget=12, known=np.broadcast_to(mask, (2, 16, 16)),
            head_params=head_params, labels=LABELS, eta=0.25, return_history=True)
  a = full(params, POLICIES[name](), **kw)
  b = cached(params, POLICIES[name](), **kw)
  times_a, times_b = np.asarray(a.history["times"]), np.asarray(b.history["times"])
  # The policies read the uncertainty (float rounding apart) and finish the same tokens.
  np.testing.assert_allclose(times_b, times_a, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(times_b == 0, times_a == 0)
  clean_sizes = (times_a[: int(a.history["num_steps"]) + 1, 0] == 0).sum(axis=(1, 2))
  assert len(np.unique(clean_sizes)) >= 3    # the clean set grew twice or more along the run
  np.testing.assert_array_equal(np.asarray(b.steps), np.asarray(a.steps))
  _assert_same(b.samples, a.samples, mask, x)


def test_cache_equals_the_full_model_under_ipr(dit):
  """IPR: every round re-noises regions (the clean set shrinks between rounds), so every
  round starts from an empty cache."""
  model, params, _, full, cached = dit
  x = _images()
  mask = np.zeros((16, 16), np.float32)
  mask[:, :8] = 1
  regions, condition = full.ipr_regions((2, 4), mask, SHAPE)
  kw = dict(key=jax.random.key(6), regions=regions, num_rounds=3, alpha=0.5, num_steps=4,
            condition=condition, labels=LABELS, eta=0.25)
  a = full.refine(params, x, **kw)
  b = cached.refine(params, x, **kw)
  _assert_same(b, a, mask, x)


# ---------------------------------------------------------------- cost

def test_pass_flops_follow_the_tokens_in_closed_form(dit):
  """XLA's cost analysis of a pass is exactly affine in its capacity, its slope is the
  closed form's per-token matrix multiplies plus elementwise work (under 8% at width 32),
  and a pass over all N tokens costs what the full model's forward pass costs."""
  model, *_ = dit
  caps = (2, 5, 9, 16)
  hlo = np.array([dit_cache.pass_flops(model, SHAPE, "active", c) for c in caps])
  closed = np.array([dit_cache.pass_matmul_flops(model, N, c, "active", 1) for c in caps])
  slope = np.diff(hlo) / np.diff(caps)
  np.testing.assert_allclose(slope, slope[0], rtol=1e-9)       # exactly affine in C
  closed_slope = np.diff(closed) / np.diff(caps)
  assert 1.0 <= slope[0] / closed_slope[0] <= 1.08
  full = dit_lib.forward_flops(model, SHAPE, per_token=True)
  assert abs(hlo[-1] / full - 1) < 0.03
  # A clean pass over C tokens attends among C keys, not N.
  clean = dit_cache.pass_flops(model, SHAPE, "clean", 5)
  assert clean < hlo[1]
  np.testing.assert_allclose(
      hlo[1] - clean, 2 * 2 * model.depth * (N - 5) * 5 * model.hidden_size, rtol=0.2)


def test_plan_refreshes_once_per_stage():
  """The host's replay of the rule: inpainting refreshes once, a 2x2 autoregressive
  schedule once per stage after the first, and each step's pass holds the noisy tokens."""
  caps = dit_cache.buckets(N)
  mask = np.zeros((16, 16), np.float32)
  mask[:, :8] = 1
  tau = schedules.inpainting(mask, STEPS)
  plan = dit_cache.plan(tokens.token_times(tau[:-1], P)[:, None], caps)
  assert plan["refresh"] == [[8]] + [[0]] * (STEPS - 1) and plan["active"] == [[8]] * STEPS
  tau = schedules.autoregressive(16, 16, (2, 2), 2)
  plan = dit_cache.plan(tokens.token_times(tau[:-1], P)[:, None], caps)
  # 12 tokens take the 13-token bucket (buckets(16, 1.1) = 1..11, 13, 15, 16).
  assert plan["active"] == [[16], [16], [13], [13], [8], [8], [4], [4]]
  assert plan["refresh"] == [[0], [0], [4], [0], [8], [0], [13], [0]]


def test_plan_sorts_images_into_groups_by_noisy_count():
  """Images with 1..8 noisy tokens, shuffled, in groups of 4: the sorted groups hold 1-4 and
  5-8 noisy tokens, so the passes take capacities 4 and 8, not 8 for every image; only the
  group whose clean set changed refreshes."""
  caps = dit_cache.buckets(N)
  noisy = np.random.default_rng(0).permutation(np.arange(1, 9))
  tt = np.zeros((2, 8, N), np.float32)
  for i, k in enumerate(noisy):
    tt[:, i, :k] = 0.5
  tt[1, noisy.argmax(), 0] = 0.0                         # the 8-token image finishes one
  plan = dit_cache.plan(tt, caps, group_size=4)
  assert plan["group_size"] == 4
  assert plan["active"] == [[4, 8], [4, 7]]              # then 5, 6, 7, 7 noisy in group 2
  assert plan["refresh"] == [[15, 11], [0, 11]]          # 12..15 clean: bucket 15; 8..11: 11


# ---------------------------------------------------------------- training and bad input

def test_clean_sets_in_training_keep_the_sampler_elsewhere():
  """clean_fraction: the clean tokens are exact zeros on whole tokens, about the asked
  share of images has any, and every other token keeps the base sampler's time."""
  sampler = timesteps.NoiseLevelSampler("asyncpatch", token_size=P, clean_fraction=0.5)
  key = jax.random.key(0)
  t = np.asarray(sampler(key, 512, 16, 16))
  k_t, _, _ = jax.random.split(key, 3)
  base = np.asarray(dataclasses.replace(sampler, clean_fraction=0.0)(k_t, 512, 16, 16))
  clean = t == 0
  np.testing.assert_array_equal(t[~clean], base[~clean])
  assert tokens.is_token_aligned(t, P)
  has = clean.any(axis=(1, 2))
  assert abs(has.mean() - 0.5) < 3 * np.sqrt(0.25 / 512)
  assert not clean.all(axis=(1, 2)).any()                     # a noisy token is left


@pytest.mark.parametrize("family", timesteps.CLEAN_FAMILIES)
def test_each_clean_family_draws_its_pattern(family):
  clean = np.asarray(timesteps.clean_sets(jax.random.key(1), 256, 8, 8, (family,)))
  assert clean.any(axis=(1, 2)).mean() > 0.9 and not clean.all(axis=(1, 2)).any()
  if family == "autoregressive":
    # A raster prefix of a grid's patches: rows of the 2x2 / 4x4 grids fill left to right.
    for c in clean:
      rows = c.reshape(-1)
      order = {g: (np.arange(8)[:, None] // (8 // g[0]) * g[1]
                   + np.arange(8)[None, :] // (8 // g[1])).reshape(-1)
               for g in ((1, 2), (2, 1), (2, 2), (4, 4))}
      assert any(np.array_equal(rows, o < k) for o in order.values() for k in range(1, 16))
  if family == "inpaint":
    # The hole (not clean) is a union of at most three boxes: each row's hole is a union
    # of intervals, and the clean share is above 1 - 3/4.
    assert (1 - clean.mean(axis=(1, 2))).max() <= 0.75 + 1e-9


def test_bad_clean_context_inputs_are_refused(dit):
  model, params, _, _, cached = dit
  with pytest.raises(checks.InputError, match=r"model.clean_context is a DiT option"):
    models.build_model(_unet_with_clean_context())
  plain = models.build_model(_dit_config(clean_context=False))
  with pytest.raises(checks.InputError, match=r"sample.clean_cache needs a DiT trained with "
                                              r"model.clean_context=True"):
    generate.Generator(plain, mesh=None, clean_cache=True)
  # A schedule whose clean set shrinks: a token's time rises from 0.
  tau = np.stack([np.ones((16, 16)), np.zeros((16, 16)), np.full((16, 16), 0.5),
                  np.zeros((16, 16))]).astype(np.float32)
  with pytest.raises(checks.InputError, match=r"increases in time at step 1 -> 2"):
    cached(params, tau, key=jax.random.key(0), shape=(2, *SHAPE), labels=LABELS)


def _unet_with_clean_context():
  cfg = base_config.get_base_config().model
  cfg.clean_context = True
  return cfg


def test_groups_of_a_mixed_batch_equal_the_full_model(dit, monkeypatch):
  """16 images with their own masks (their noisy counts differ) in sorted groups of 8: the
  cached samples equal the full model's, each image in its own group's pass."""
  model, params, _, full, _ = dit
  monkeypatch.setattr(dit_cache, "DEFAULT_GROUP", 8)
  grouped = generate.Generator(model, mesh=None, clean_cache=True)
  mask = masks_lib.make_masks("thick", 16, 16, 16, seed=5)
  x = np.random.default_rng(4).uniform(-1, 1, (16, *SHAPE)).astype(np.float32)
  assert len(np.unique(np.asarray(full.task(schedules.inpainting(mask, STEPS), x, mask).tau[0])
                       .reshape(16, -1).sum(1))) > 2
  kw = dict(key=jax.random.key(9), labels=np.arange(16) % 10, eta=0.25)
  a = full.generate(params, full.task(schedules.inpainting(mask, STEPS), x, mask), **kw)
  b = grouped.generate(params, grouped.task(schedules.inpainting(mask, STEPS), x, mask), **kw)
  _assert_same(b, a, mask, x)


def test_cached_samples_on_8_devices_equal_one(dit):
  """The batch sharded over 8 devices (the counts that pick a capacity are reduced over it)
  gives the one-device samples."""
  model, params, _, _, cached = dit
  if jax.device_count() < 8:
    pytest.skip("needs 8 (host) devices")
  sharded = generate.Generator(model, mesh="auto", clean_cache=True)
  mask = masks_lib.make_masks("medium", 8, 16, 16, seed=4)
  x = np.random.default_rng(3).uniform(-1, 1, (8, *SHAPE)).astype(np.float32)
  kw = dict(key=jax.random.key(8), labels=np.arange(8), eta=0.25)
  one = cached.generate(params, cached.task(schedules.inpainting(mask, STEPS), x, mask), **kw)
  eight = sharded.generate(params, sharded.task(schedules.inpainting(mask, STEPS), x, mask),
                           **kw)
  _assert_same(eight, one, mask, x)
