"""Compute that follows the schedule: a clean-context DiT's sampler runs only the noisy tokens.

A DiT with `model.clean_context` (models/dit.py) lets a clean token (time exactly 0: known,
or finished) attend only to the other clean tokens, and a noisy token to every token. A
clean token's hidden states at every layer, and its output, then depend only on the clean
set and its values. `cached_velocity_fn(model)` is the sampler's velocity function that
uses this (a samplers.CachedVelocity, carried through the sampling loop):

  1. clean = (token time == 0). When the clean set differs from the one the cache holds
     (for any image of the batch), the cache is refreshed: one 'clean' pass over the clean
     tokens computes every layer's keys and values and their outputs, which are scattered
     to their positions. The clean set only grows along a schedule (times never rise), so
     this happens once for inpainting and outpainting (at the first step), once per stage
     for autoregressive, progressive and interleaved schedules, and whenever a token
     finishes under an adaptive policy.
  2. One 'active' pass over every noisy token, against the cached keys and values of the
     clean ones. Every noisy token is active, including one still at t = 1 waiting for its
     stage: a noisy token attends to it in the full model.
  3. v = the active outputs scattered over the cached clean outputs: the full clean-context
     model's velocity at every token, within float32 rounding.
The images of a batch are sorted by their number of noisy tokens and run in groups of
`group_size` (16), one group after another (`lax.map`): each group refreshes only when its
own clean set changed and takes its own capacity, so images with small holes do not pay for
the batch's largest one.

Capacity buckets. A pass gathers its tokens into a buffer of fixed capacity, the smallest
bucket of `buckets(n, growth)` that holds the batch's largest count (`bucket_index`):
1, 2, 3, ..., then each capacity ceil(growth x) the last, and finally n. Overflow is
impossible by construction: the last capacity is n >= any count, and searchsorted returns
the first capacity >= the count, so every token gets a slot. Padding slots point past the
last token (index n): they are computed, but their keys, values and outputs are dropped
by the scatters. Every bucket is one branch of a `lax.switch` inside the sampler's jit, so
one compilation serves every mask and schedule; a pass costs at most `growth` times the
ideal once its count exceeds 1 / (growth - 1).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import einops
import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.diffusion import samplers
from asyncpatch_jax.diffusion import tokens
from asyncpatch_jax.models import dit as dit_lib
from asyncpatch_jax.runtime import checks

DEFAULT_GROWTH = 1.1
DEFAULT_GROUP = 16


def buckets(n: int, growth: float = DEFAULT_GROWTH) -> tuple[int, ...]:
  """The capacities for passes over up to n tokens: 1, 2, ..., each ceil(growth x) the
  last (at least one more), and n."""
  n = checks.check_positive_int(n, "number of tokens")
  if not growth > 1.0:
    raise checks.InputError(f"bucket growth {growth}; expected a factor > 1 (e.g. 1.1: "
                            "passes at most 10% larger than their token count).")
  caps, c = [], 1
  while c < n:
    caps.append(c)
    c = max(c + 1, math.ceil(c * growth))
  return tuple(caps) + (n,)


def bucket_index(count, capacities):
  """The index of the smallest capacity >= count (NumPy or traced count)."""
  xp = jnp if isinstance(count, jax.Array) else np
  return xp.searchsorted(xp.asarray(capacities), count, side="left")


def gather_index(selected: jax.Array, capacity: int) -> jax.Array:
  """[B, capacity] int32 positions of the selected tokens ([B, N] bool), in raster order,
  padded with N (an empty slot)."""
  n = selected.shape[1]
  return jax.vmap(lambda m: jnp.nonzero(m, size=capacity, fill_value=n)[0])(
      selected).astype(jnp.int32)


class TokenCache(NamedTuple):
  """What the sampler carries: the clean set the cache was computed for ([B, N] bool),
  every layer's keys and values of its tokens ([L, B, N, heads, head_dim], 0 elsewhere)
  and their outputs ([B, N, p * p * out_channels])."""
  clean: jax.Array
  keys: jax.Array
  values: jax.Array
  out: jax.Array


def empty_cache(model: dit_lib.DiT, batch: int, num_tokens: int) -> TokenCache:
  """A cache that holds no token (its first step refreshes it when any token is clean)."""
  kv = jnp.zeros((model.depth, batch, num_tokens, model.num_heads, model.head_dim),
                 model.dtype)
  p = model.patch_size
  return TokenCache(jnp.zeros((batch, num_tokens), bool), kv, kv,
                    jnp.zeros((batch, num_tokens, p * p * model.out_channels), jnp.float32))


def token_pass(model: dit_lib.DiT, params, z, t, y, kind: str, index, cache=None):
  """The model's outputs [B, C, P] (and a clean pass's keys and values) on the tokens
  `index` [B, C] names; `cache`: the active pass's TokenCache."""
  keys = values = None
  if cache is not None:
    keys, values = cache.keys, cache.values
  return model.apply({"params": params}, z, t, y, False,
                     dit_lib.TokenPass(kind, index, keys, values), method=model.forward)


def refresh(model: dit_lib.DiT, capacities, params, z, t, y, clean) -> TokenCache:
  """The cache of the clean set `clean` [B, N]: one clean pass, in the smallest bucket that
  holds the batch's largest clean count."""
  b, n = clean.shape
  rows = jnp.arange(b)[:, None]
  empty = empty_cache(model, b, n)._replace(clean=clean)

  def run(capacity):
    def branch():
      index = gather_index(clean, capacity)
      out, (k, v) = token_pass(model, params, z, t, y, "clean", index)
      return empty._replace(
          keys=empty.keys.at[:, rows, index].set(k.astype(empty.keys.dtype), mode="drop"),
          values=empty.values.at[:, rows, index].set(v.astype(empty.values.dtype),
                                                     mode="drop"),
          out=empty.out.at[rows, index].set(out, mode="drop"))
    return branch

  count = jnp.max(jnp.sum(clean, axis=1))
  which = jnp.where(count == 0, 0, 1 + bucket_index(count, capacities))
  return jax.lax.switch(which, [lambda: empty] + [run(c) for c in capacities])


def _group_velocity(model: dit_lib.DiT, capacities, params, cache: TokenCache, z, t, y,
                    clean) -> tuple[jax.Array, TokenCache]:
  """One group's token outputs [g, N, P] and cache: refresh when its clean set changed, then
  one active pass over its noisy tokens, at the group's largest count."""
  b = z.shape[0]
  stale = jnp.any(clean != cache.clean)
  cache = jax.lax.cond(stale, lambda: refresh(model, capacities, params, z, t, y, clean),
                       lambda: cache)
  active = ~clean
  rows = jnp.arange(b)[:, None]

  def run(capacity):
    def branch():
      index = gather_index(active, capacity)
      out, _ = token_pass(model, params, z, t, y, "active", index, cache)
      return cache.out.at[rows, index].set(out, mode="drop")
    return branch

  count = jnp.max(jnp.sum(active, axis=1))
  which = jnp.where(count == 0, 0, 1 + bucket_index(count, capacities))
  return jax.lax.switch(which, [lambda: cache.out] + [run(c) for c in capacities]), cache


def _grouped(a, order, groups: int, axis: int = 0):
  """a with its batch axis `axis` permuted by `order` and split into [groups, B / groups]
  (the groups leading)."""
  a = jnp.take(a, order, axis=axis)
  a = a.reshape(a.shape[:axis] + (groups, -1) + a.shape[axis + 1:])
  return jnp.moveaxis(a, axis, 0)


def _ungrouped(a, inverse, axis: int = 0):
  a = jnp.moveaxis(a, 0, axis)
  a = a.reshape(a.shape[:axis] + (-1,) + a.shape[axis + 2:])
  return jnp.take(a, inverse, axis=axis)


def velocity(model: dit_lib.DiT, capacities, cache: TokenCache, params, z, t, y,
             group_size: int = DEFAULT_GROUP) -> tuple[jax.Array, TokenCache]:
  """(v [B, H, W, C], cache) at (z, t).

  The images are sorted by their number of noisy tokens and run in groups of `group_size`
  (the gcd with B), one after another: each group refreshes its cache only when its clean
  set changed, and runs its noisy tokens at its own largest count, so a batch of masks of
  different known shares does not pay for its largest hole in every image.
  """
  if t.ndim != 3:
    raise checks.InputError("the cached DiT velocity needs a per-pixel time map t [B, H, W].")
  b, height = z.shape[:2]
  p = model.patch_size
  clean = tokens.token_times(t, p) == 0.0                  # [B, N]
  groups = b // math.gcd(b, group_size)
  if groups == 1:                                          # nothing to sort
    out, cache = _group_velocity(model, capacities, params, cache, z, t, y, clean)
    return _unpatchify(out, height, p), cache
  order = jnp.argsort(jnp.sum(~clean, axis=1), stable=True)
  inverse = jnp.argsort(order)
  group = lambda a, axis=0: _grouped(a, order, groups, axis)
  xs = (TokenCache(group(cache.clean), group(cache.keys, 1), group(cache.values, 1),
                   group(cache.out)), group(z), group(t), group(clean),
        None if y is None else group(y))

  def one(args):
    c, zg, tg, cleang, yg = args
    return _group_velocity(model, capacities, params, c, zg, tg, yg, cleang)

  out, new = jax.lax.map(one, xs)
  out = _ungrouped(out, inverse)
  cache = TokenCache(_ungrouped(new.clean, inverse), _ungrouped(new.keys, inverse, 1),
                     _ungrouped(new.values, inverse, 1), _ungrouped(new.out, inverse))
  return _unpatchify(out, height, p), cache


def _unpatchify(out, height: int, p: int):
  return einops.rearrange(out, "b (h w) (p q c) -> b (h p) (w q) c", h=height // p, p=p, q=p)


def cached_velocity_fn(model: dit_lib.DiT, growth: float = DEFAULT_GROWTH,
                       group_size: int | None = None) -> samplers.CachedVelocity:
  """The cached velocity of a clean-context DiT (module docstring), with the signature of
  guidance.model_velocity_fn: apply(cache, z, t, params, y=None). group_size: None is
  DEFAULT_GROUP (16: smaller groups follow each image's noisy count more closely, larger
  ones pay less overhead per call; a batch that shares one mask runs fastest as one
  group)."""
  group_size = checks.check_positive_int(
      DEFAULT_GROUP if group_size is None else group_size, "group size")
  if not getattr(model, "clean_context", False):
    raise checks.InputError(
        "the cached sampler needs a DiT trained with model.clean_context=True (its clean "
        "tokens must never have attended to noisy ones); sample this model without the cache.")
  buckets(1, growth)                                       # checks growth

  def init(z, t, params, y=None):
    del params, y
    n = (z.shape[1] // model.patch_size) * (z.shape[2] // model.patch_size)
    return empty_cache(model, z.shape[0], n)

  def apply(cache, z, t, params, y=None):
    n = cache.clean.shape[1]
    return velocity(model, buckets(n, growth), cache, params, z, t, y, group_size)

  return samplers.CachedVelocity(init, apply)


# ------------------------------------------------------------------------------ the cost
def plan(token_times: np.ndarray, capacities, group_size: int = DEFAULT_GROUP) -> dict:
  """What the cached sampler computes for a run whose steps see the token times
  `token_times` [K, B, N] (host NumPy, the same rule as `velocity`): per step and group (the
  images sorted by noisy count, in groups of gcd(B, group_size)) the active pass's capacity
  (0: none) and the refresh's capacity (0: no refresh, -1: a refresh of an empty clean set,
  which computes nothing)."""
  token_times = np.asarray(token_times)
  b = token_times.shape[1]
  g = math.gcd(b, group_size)
  held = np.zeros(token_times.shape[1:], bool)
  caps = np.asarray(capacities)
  active_caps, refresh_caps = [], []

  def cap(count):
    return int(caps[bucket_index(count, caps)]) if count else 0

  for tt in token_times:
    clean = tt == 0.0
    order = np.argsort((~clean).sum(axis=1), kind="stable")
    step_active, step_refresh = [], []
    for members in order.reshape(-1, g):
      refresh_cap = 0
      if (clean[members] != held[members]).any():
        refresh_cap = cap(int(clean[members].sum(axis=1).max())) or -1
        held[members] = clean[members]
      step_refresh.append(refresh_cap)
      step_active.append(cap(int((~clean[members]).sum(axis=1).max())))
    active_caps.append(step_active)
    refresh_caps.append(step_refresh)
  return {"group_size": g, "active": active_caps, "refresh": refresh_caps}


def pass_flops(model: dit_lib.DiT, image_shape, kind: str, capacity: int) -> float:
  """XLA cost-analysis FLOPs of one pass (batch 1) over `capacity` tokens of an image
  [H, W, C] (the blocks unrolled: cost analysis counts a loop body once)."""
  h, w, c = image_shape
  n = (h // model.patch_size) * (w // model.patch_size)
  model = model.clone(unroll_blocks=True)
  x = jax.ShapeDtypeStruct((1, h, w, c), jnp.float32)
  t = jax.ShapeDtypeStruct((1, h, w), jnp.float32)
  y = jax.ShapeDtypeStruct((1,), jnp.int32)
  params = jax.eval_shape(model.init, jax.random.key(0), x, t, y)["params"]
  index = jax.ShapeDtypeStruct((1, capacity), jnp.int32)
  kv = jax.ShapeDtypeStruct((model.depth, 1, n, model.num_heads, model.head_dim), model.dtype)

  def fn(params, x, t, y, index, keys, values):
    cache = None
    if kind == "active":
      cache = TokenCache(None, keys, values, None)
    return token_pass(model, params, x, t, y, kind, index, cache)

  lowered = jax.jit(fn).lower(params, x, t, y, index, kv, kv)
  return float(lowered.cost_analysis()["flops"])


def pass_matmul_flops(model: dit_lib.DiT, num_tokens: int, capacity: int, kind: str,
                      in_channels: int) -> float:
  """The closed form of a pass's matrix-multiply FLOPs (2 per multiply-add, batch 1) over
  `capacity` tokens of an image of `num_tokens`: per token the time embedder (256 D + D^2),
  the modulation (adaln_single: 6 D^2 once; adaln_zero: 6 D^2 a block and 2 D^2 at the
  end), per block qkv 3 D^2, proj D^2, MLP 2 r D^2 and attention 2 K D against K keys
  (active: all N tokens; clean: the capacity), and the output layer D p^2 C_out; plus the
  patch embedding of all N tokens (p^2 C_in D each), which does not follow the schedule."""
  d, depth, p = model.hidden_size, model.depth, model.patch_size
  keys = num_tokens if kind == "active" else capacity
  per_token = model.freq_dim * d + d * d + p * p * model.out_channels * d
  per_token += depth * ((4 + 2 * model.mlp_ratio) * d * d + 2 * keys * d)
  per_token += (6 * d * d if model.modulation == "adaln_single"
                else depth * 6 * d * d + 2 * d * d)
  return 2.0 * (capacity * per_token + num_tokens * p * p * in_channels * d)


__all__ = ["DEFAULT_GROUP", "DEFAULT_GROWTH", "TokenCache", "bucket_index", "buckets",
           "cached_velocity_fn", "empty_cache", "gather_index", "pass_flops",
           "pass_matmul_flops", "plan", "refresh", "token_pass", "velocity"]
