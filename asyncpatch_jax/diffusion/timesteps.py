"""Training noise-level samplers: per-pixel time maps `t [B, H, W]` (AsyncPatch Sec. 3.1, App. C).

(A noise-level sampler draws the training times; the samplers that generate images are
diffusion/samplers.py's.)

Five samplers, all jittable and keyed (`sampler(key, batch, height, width)`):
  global       one t ~ U(t_min, t_max) per image (the synchronous baseline);
  independent  iid t per pixel;
  patchwise    a random patch size per image, one uniform t per patch (Fig. 2 middle);
  perlin       t * m + (1 - m) * b with a thresholded multi-octave Perlin mask m and
               b ~ Bernoulli(1/2) per image (Fig. 2 left, after RAD);
  asyncpatch   mean tbar ~ U(t_min, t_max), delta = min(tbar - t_min, t_max - tbar, 1/2),
               one t ~ U(tbar - delta, tbar + delta) per patch (Fig. 2 right, Fig. 8).
The first four draw their uniforms on [t_min, t_max] (so `perlin`'s background is
t_min or t_max). With `antithetic=True`, asyncpatch pairs patches as tbar +/- u, so
each image's mean is exactly tbar while each patch stays U(tbar - delta, tbar + delta).

Token-aligned maps (`token_size` p > 1, for a DiT with p x p tokens: diffusion/tokens.py).
The sampler draws its map on the token grid (H/p, W/p), with every size in pixels divided
by p -- patch sizes (which must then be multiples of p; the default sizes are those of
`default_patch_sizes` that are), Perlin cells (c // p, at least 1) -- and repeats each
value over its token, so every token has one time and the statistics the sampler controls
(per-image mean, per-patch spread, patch-size mix) are those of the pixel sampler at the
token's resolution.

Clean tokens (`clean_fraction` > 0, for a clean-context DiT: models/dit.py). A model whose
clean tokens (time exactly 0) attend only to each other must see exact zeros in training,
in the patterns the sampler will give it. With probability `clean_fraction` an image gets
a clean set, drawn on the token grid from a family chosen uniformly among `clean_families`:
  inpaint         the complement of 1-3 random boxes (sides 1 to half the grid): inpainting;
  autoregressive  a random raster prefix of the patches of a random 1x2, 2x1, 2x2 or 4x4
                  grid of the tokens (those that divide it): a later stage of
                  autoregressive or progressive generation;
  random          each token clean with probability u ~ U(0, 1) per image: finished tokens
                  of an adaptive policy;
at least one token stays noisy. The clean tokens' times are set to 0; every other token
keeps the sampler's time, so the noisy tokens keep its statistics (the per-image mean,
per-patch spread and patch-size mix above). The default is 0 (no clean sets);
configs/dit.py:<data>,clean uses 0.5, which gives half the images a clean set, so the model
keeps learning generation from pure noise.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from asyncpatch_jax.diffusion import tokens
from asyncpatch_jax.runtime import checks

SAMPLER_NAMES = ("global", "independent", "patchwise", "perlin", "asyncpatch")
CLEAN_FAMILIES = ("inpaint", "autoregressive", "random")
_STAGE_GRIDS = ((1, 2), (2, 1), (2, 2), (4, 4))


def clean_sets(key: jax.Array, batch: int, height: int, width: int,
               families: tuple[str, ...] = CLEAN_FAMILIES) -> jax.Array:
  """[B, H, W] bool clean sets (module docstring), one family drawn per image; at least one
  position of every image stays noisy."""
  k_family, k_box, k_grid, k_stage, k_density, k_random, k_keep = jax.random.split(key, 7)
  masks = []
  for family in families:
    if family == "inpaint":
      kb = jax.random.split(k_box, 3)
      hole = jnp.zeros((batch, height, width), bool)
      count = jax.random.randint(kb[0], (batch, 1, 1), 1, 4)
      for i in range(3):
        ks = jax.random.split(jax.random.fold_in(kb[1], i), 4)
        bh = jax.random.randint(ks[0], (batch, 1, 1), 1, max(height // 2, 1) + 1)
        bw = jax.random.randint(ks[1], (batch, 1, 1), 1, max(width // 2, 1) + 1)
        top = jax.random.randint(ks[2], (batch, 1, 1), 0, height - bh + 1)
        left = jax.random.randint(ks[3], (batch, 1, 1), 0, width - bw + 1)
        rows, cols = jnp.arange(height)[None, :, None], jnp.arange(width)[None, None, :]
        box = (rows >= top) & (rows < top + bh) & (cols >= left) & (cols < left + bw)
        hole = hole | (box & (i < count))
      masks.append(~hole)
    elif family == "autoregressive":
      grids = [g for g in _STAGE_GRIDS if height % g[0] == 0 and width % g[1] == 0
               and g[0] * g[1] > 1] or [(1, 1)]
      stages = []
      for gr, gc in grids:
        rows = jnp.arange(height)[:, None] // (height // gr)
        cols = jnp.arange(width)[None, :] // (width // gc)
        patch = rows * gc + cols                                # raster order
        done = jax.random.randint(jax.random.fold_in(k_stage, gr * 100 + gc), (batch, 1, 1),
                                  1, max(gr * gc, 2))
        stages.append(patch[None] < done)
      which = jax.random.randint(k_grid, (batch,), 0, len(stages))
      masks.append(jnp.stack(stages)[which, jnp.arange(batch)])
    elif family == "random":
      density = jax.random.uniform(k_density, (batch, 1, 1))
      masks.append(jax.random.uniform(k_random, (batch, height, width)) < density)
    else:
      raise checks.InputError(f"clean family {family!r}; use some of {CLEAN_FAMILIES}.")
  which = jax.random.randint(k_family, (batch,), 0, len(masks))
  clean = jnp.stack(masks)[which, jnp.arange(batch)]
  # Keep one random position noisy where a mask would make the whole image clean.
  keep = jax.random.randint(k_keep, (batch,), 0, height * width)
  keep = jax.nn.one_hot(keep, height * width, dtype=bool).reshape(batch, height, width)
  full = jnp.all(clean, axis=(1, 2), keepdims=True)
  return clean & ~(full & keep)


def default_patch_sizes(height: int, width: int) -> tuple[int, ...]:
  """Powers of two from 2 to min(H, W) / 2 that divide both sides."""
  sizes, p = [], 2
  while p <= min(height, width) // 2:
    if height % p == 0 and width % p == 0:
      sizes.append(p)
    p *= 2
  return tuple(sizes) or (1,)


def _fade(x):
  return x * x * x * (x * (x * 6.0 - 15.0) + 10.0)


def perlin_noise(key: jax.Array, height: int, width: int, cell: int) -> jax.Array:
  """One octave of 2-D gradient (Perlin) noise with lattice spacing `cell` pixels: [H, W].

  Values lie in [-sqrt(1/2), sqrt(1/2)]; the noise is 0 on lattice points.
  """
  gh, gw = -(-height // cell) + 1, -(-width // cell) + 1
  angle = jax.random.uniform(key, (gh, gw), maxval=2.0 * math.pi)
  grad = jnp.stack([jnp.cos(angle), jnp.sin(angle)], axis=-1)  # [gh, gw, 2]
  ys = (jnp.arange(height) + 0.5) / cell
  xs = (jnp.arange(width) + 0.5) / cell
  y0, x0 = jnp.floor(ys).astype(jnp.int32), jnp.floor(xs).astype(jnp.int32)
  fy, fx = ys - y0, xs - x0                                    # [H], [W]

  def corner(dy, dx):
    g = grad[(y0 + dy)[:, None], (x0 + dx)[None, :]]           # [H, W, 2]
    return g[..., 0] * (fy - dy)[:, None] + g[..., 1] * (fx - dx)[None, :]

  uy, ux = _fade(fy)[:, None], _fade(fx)[None, :]
  top = corner(0, 0) + ux * (corner(0, 1) - corner(0, 0))
  bottom = corner(1, 0) + ux * (corner(1, 1) - corner(1, 0))
  return top + uy * (bottom - top)


def fractal_perlin_noise(key: jax.Array, height: int, width: int, cell: int,
                         octaves: int, persistence: float = 0.5) -> jax.Array:
  """Multi-octave Perlin noise: sum_o persistence^o * perlin(cell / 2^o), normalised: [H, W]."""
  keys = jax.random.split(key, octaves)
  total, norm = jnp.zeros((height, width)), 0.0
  for o in range(octaves):  # static, a handful of octaves
    c = max(1, cell // (2 ** o))
    total = total + persistence ** o * perlin_noise(keys[o], height, width, c)
    norm += persistence ** o
  return total / norm


def _patch_map(values: jax.Array, patch: int) -> jax.Array:
  """[B, H/p, W/p] -> [B, H, W] by repeating each value over its p x p patch."""
  return jnp.repeat(jnp.repeat(values, patch, axis=1), patch, axis=2)


@dataclasses.dataclass(frozen=True)
class NoiseLevelSampler:
  """A training noise-level sampler: `sampler(key, batch, height, width) -> t [B, H, W]`.

  Attributes:
    name: one of SAMPLER_NAMES.
    t_min, t_max: the range of times drawn.
    patch_sizes: patch sides (pixels) for patchwise/asyncpatch, one drawn uniformly per
      image; None -> `default_patch_sizes(H, W)`. Each must divide H and W.
    perlin_cells: Perlin lattice spacings (pixels), one drawn uniformly per image.
    perlin_octaves: number of octaves of the Perlin mask.
    perlin_threshold: (lo, hi); the mask is noise > thr with thr ~ U(lo, hi) per image.
    antithetic: asyncpatch only; exact per-image mean tbar (see module docstring).
    token_size: p > 1 draws maps constant on every p x p token (module docstring).
    clean_fraction: the share of images given a clean set (time exactly 0) drawn from
      `clean_families` on the token grid (module docstring); 0 = none.
  """
  name: str = "asyncpatch"
  t_min: float = 0.0
  t_max: float = 1.0
  patch_sizes: tuple[int, ...] | None = None
  perlin_cells: tuple[int, ...] = (4, 8, 16)
  perlin_octaves: int = 3
  perlin_threshold: tuple[float, float] = (-0.2, 0.2)
  antithetic: bool = False
  token_size: int = 1
  clean_fraction: float = 0.0
  clean_families: tuple[str, ...] = CLEAN_FAMILIES

  @classmethod
  def from_config(cls, ts, token_size: int = 1) -> "NoiseLevelSampler":
    """The sampler that `config.timesteps` describes (sampler, t range, patches, Perlin),
    for a model with tokens of `token_size` pixels a side (models.patch_size)."""
    return cls(name=ts.sampler, t_min=ts.t_min, t_max=ts.t_max,
               patch_sizes=tuple(ts.patch_sizes) or None, perlin_cells=tuple(ts.perlin_cells),
               perlin_octaves=ts.perlin_octaves, perlin_threshold=tuple(ts.perlin_threshold),
               antithetic=ts.antithetic, token_size=token_size,
               clean_fraction=ts.get("clean_fraction", 0.0),
               clean_families=tuple(ts.get("clean_families", CLEAN_FAMILIES)))

  def __post_init__(self):
    checks.check_choice(self.name, SAMPLER_NAMES, "timestep sampler")
    if not 0.0 <= self.t_min < self.t_max <= 1.0:
      raise checks.InputError(f"t_min={self.t_min}, t_max={self.t_max}; expected "
                       "0 <= t_min < t_max <= 1.")
    if self.patch_sizes is not None:
      object.__setattr__(self, "patch_sizes", tuple(int(p) for p in self.patch_sizes))
      if not self.patch_sizes or min(self.patch_sizes) < 1:
        raise checks.InputError(f"patch_sizes={self.patch_sizes}; expected positive sizes.")
    object.__setattr__(self, "perlin_cells", tuple(int(c) for c in self.perlin_cells))
    if not self.perlin_cells or min(self.perlin_cells) < 1 or self.perlin_octaves < 1:
      raise checks.InputError(f"perlin_cells={self.perlin_cells}, perlin_octaves="
                       f"{self.perlin_octaves}; expected positive values.")
    lo, hi = self.perlin_threshold
    if lo > hi:
      raise checks.InputError(f"perlin_threshold={self.perlin_threshold}; expected lo <= hi.")
    checks.check_range(self.clean_fraction, "timesteps.clean_fraction", 0.0, 1.0)
    object.__setattr__(self, "clean_families", tuple(self.clean_families))
    if self.clean_fraction > 0 and not self.clean_families:
      raise checks.InputError("timesteps.clean_families is empty; name some of "
                              f"{CLEAN_FAMILIES} or set timesteps.clean_fraction=0.")
    for family in self.clean_families:
      checks.check_choice(family, CLEAN_FAMILIES, "timesteps.clean_families entry")

  def patch_sizes_for(self, height: int, width: int) -> tuple[int, ...]:
    """The patch sizes (pixels) drawn for images H x W; InputError for one that does not
    divide the image or is not a multiple of the token size."""
    p = self.token_size
    tokens.check_patch_size(height, width, p, "the image (the model's token size)")
    sizes = self.patch_sizes
    if sizes is None:
      sizes = tuple(s for s in default_patch_sizes(height, width) if s % p == 0) or (p,)
    for s in sizes:
      if height % s or width % s:
        raise checks.InputError(f"patch size {s} in patch_sizes={sizes} does not divide the "
                         f"image {height}x{width}; use sizes that divide both sides.")
      if s % p:
        raise checks.InputError(
            f"patch size {s} in timesteps.patch_sizes={sizes} is not a multiple of the "
            f"model's token size {p}; a DiT needs one time per token: use multiples of {p}.")
    return sizes

  def __call__(self, key: jax.Array, batch: int, height: int, width: int) -> jax.Array:
    """Draws time maps `[batch, height, width]` in [t_min, t_max] (and 0 on clean sets)."""
    if self.clean_fraction > 0:
      k_t, k_clean, k_which = jax.random.split(key, 3)
      t = dataclasses.replace(self, clean_fraction=0.0)(k_t, batch, height, width)
      p = self.token_size
      clean = clean_sets(k_clean, batch, height // p, width // p, self.clean_families)
      clean = clean & jax.random.bernoulli(k_which, self.clean_fraction, (batch, 1, 1))
      return jnp.where(_patch_map(clean, p), 0.0, t)
    if self.token_size > 1:
      p = self.token_size
      sizes = (self.patch_sizes_for(height, width)
               if self.name in ("patchwise", "asyncpatch") else None)
      on_tokens = dataclasses.replace(
          self, token_size=1, patch_sizes=None if sizes is None else tuple(s // p for s in sizes),
          perlin_cells=tuple(max(1, c // p) for c in self.perlin_cells))
      return _patch_map(on_tokens(key, batch, height // p, width // p), p)
    if self.name in ("patchwise", "asyncpatch"):
      sizes = self.patch_sizes_for(height, width)
    shape = (batch, height, width)
    scale = self.t_max - self.t_min
    if self.name == "global":
      t = jax.random.uniform(key, (batch, 1, 1))
      return self.t_min + scale * jnp.broadcast_to(t, shape)
    if self.name == "independent":
      return self.t_min + scale * jax.random.uniform(key, shape)
    if self.name == "patchwise":
      k_size, k_t = jax.random.split(key)
      u = self._per_patch_uniforms(k_t, sizes, batch, height, width, k_size)
      return self.t_min + scale * u
    if self.name == "perlin":
      return self._perlin(key, batch, height, width)
    return self._asyncpatch(key, sizes, batch, height, width)

  def _per_patch_uniforms(self, key, sizes, batch, height, width, size_key):
    """U(0, 1) per patch, with one patch size per image drawn from `sizes`: [B, H, W]."""
    keys = jax.random.split(key, len(sizes))
    maps = jnp.stack([
        _patch_map(jax.random.uniform(k, (batch, height // p, width // p)), p)
        for k, p in zip(keys, sizes)])                        # [S, B, H, W]
    choice = jax.random.randint(size_key, (batch,), 0, len(sizes))
    return maps[choice, jnp.arange(batch)]

  def _perlin(self, key, batch, height, width):
    k_noise, k_cell, k_thr, k_t, k_b = jax.random.split(key, 5)

    def one(k):
      keys = jax.random.split(k, len(self.perlin_cells))
      return jnp.stack([fractal_perlin_noise(kk, height, width, c, self.perlin_octaves)
                        for kk, c in zip(keys, self.perlin_cells)])
    noise = jax.vmap(one)(jax.random.split(k_noise, batch))   # [B, S, H, W]
    cell = jax.random.randint(k_cell, (batch,), 0, len(self.perlin_cells))
    noise = noise[jnp.arange(batch), cell]
    lo, hi = self.perlin_threshold
    thr = jax.random.uniform(k_thr, (batch, 1, 1), minval=lo, maxval=hi)
    m = (noise > thr).astype(jnp.float32)
    u = jax.random.uniform(k_t, (batch, height, width))
    b = jax.random.bernoulli(k_b, 0.5, (batch, 1, 1)).astype(jnp.float32)
    return self.t_min + (self.t_max - self.t_min) * (u * m + (1.0 - m) * b)

  def _asyncpatch(self, key, sizes, batch, height, width):
    k_mean, k_size, k_t, k_perm = jax.random.split(key, 4)
    tbar = jax.random.uniform(k_mean, (batch, 1, 1), minval=self.t_min, maxval=self.t_max)
    delta = jnp.minimum(jnp.minimum(tbar - self.t_min, self.t_max - tbar), 0.5)
    if not self.antithetic:
      u = self._per_patch_uniforms(k_t, sizes, batch, height, width, k_size)
      return jnp.clip(tbar + delta * (2.0 * u - 1.0), self.t_min, self.t_max)
    keys = jax.random.split(k_t, len(sizes))
    perm_keys = jax.random.split(k_perm, len(sizes))
    maps = []
    for k, kp, p in zip(keys, perm_keys, sizes):
      n = (height // p) * (width // p)
      half = jax.random.uniform(k, (batch, (n + 1) // 2))
      signs = jnp.concatenate([half, -half], axis=1)[:, :n]   # +u, -u pairs
      if n % 2:  # an odd patch count keeps one patch at exactly tbar
        signs = signs.at[:, n - 1].set(0.0)
      signs = jax.vmap(jax.random.permutation)(jax.random.split(kp, batch), signs)
      maps.append(_patch_map(signs.reshape(batch, height // p, width // p), p))
    choice = jax.random.randint(k_size, (batch,), 0, len(sizes))
    offsets = jnp.stack(maps)[choice, jnp.arange(batch)]
    return jnp.clip(tbar + delta * offsets, self.t_min, self.t_max)


def get_sampler(name: str, **kwargs) -> NoiseLevelSampler:
  """The timestep sampler `name` (one of SAMPLER_NAMES) with its options."""
  return NoiseLevelSampler(name=name, **kwargs)
