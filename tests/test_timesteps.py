"""Training timestep samplers: the statistics of AsyncPatch Fig. 3 and the patch structure."""

import jax
import numpy as np
import pytest
from scipy import stats

from asyncpatch_jax.diffusion import timesteps

N, HW = 4096, 32


def _draw(name, n=N, **kw):
  sampler = timesteps.get_sampler(name, **kw)
  return np.asarray(jax.jit(sampler, static_argnums=(1, 2, 3))(jax.random.key(0), n, HW, HW))


def test_global_and_independent_statistics():
  g = _draw("global")
  assert np.all(g == g[:, :1, :1])
  means = g.mean((1, 2))
  assert abs(means.std() - 1 / np.sqrt(12)) < 0.01
  assert stats.kstest(means, "uniform").pvalue > 1e-3
  ind = _draw("independent")
  m = ind.mean((1, 2))
  assert m.std() < 0.02 and abs(m.std() - 1 / np.sqrt(12 * HW * HW)) < 0.002
  assert stats.kstest(ind[:64].reshape(-1), "uniform").pvalue > 1e-3


@pytest.mark.parametrize("name", ["patchwise", "asyncpatch"])
def test_patch_samplers_are_constant_on_their_patches(name):
  t = _draw(name, patch_sizes=(4, 8, 16))
  for img in t[:200]:
    # Some patch size p in {4, 8, 16} tiles the map with constant blocks.
    ok = [np.all(img.reshape(HW // p, p, HW // p, p) == img[::p, ::p][:, None, :, None])
          for p in (4, 8, 16)]
    assert any(ok)
  assert t.min() >= 0 and t.max() <= 1


def test_asyncpatch_controls_the_mean_and_spread():
  t_min, t_max = 0.1, 0.9
  t = _draw("asyncpatch", t_min=t_min, t_max=t_max, patch_sizes=(2, 4))
  means, spread = t.mean((1, 2)), t.max((1, 2)) - t.min((1, 2))
  # Per-image mean ~ U(t_min, t_max) (Fig. 3 right): the patch average concentrates on tbar.
  assert stats.kstest(means, "uniform", args=(t_min, t_max - t_min)).statistic < 0.03
  # Spread of U(tbar - d, tbar + d) over >= 64 patches is close to 2d, d = min(tbar - t_min, t_max - tbar, .5).
  d = np.minimum(np.minimum(means - t_min, t_max - means), 0.5)
  assert np.mean(np.abs(spread - 2 * d)) < 0.05
  exact = _draw("asyncpatch", t_min=t_min, t_max=t_max, patch_sizes=(4, 8), antithetic=True)
  em = exact.mean((1, 2))
  assert stats.kstest(em, "uniform", args=(t_min, t_max - t_min)).pvalue > 1e-3
  # Antithetic pairs give each image exactly its tbar: spread is symmetric around the mean.
  np.testing.assert_allclose(exact.max((1, 2)) + exact.min((1, 2)), 2 * em, atol=0.08)


def test_perlin_mask_structure():
  t = _draw("perlin", n=1024)
  clean_or_noise = np.isin(t, (0.0, 1.0))
  # Background pixels are all 0 or all 1 per image; the rest is iid uniform.
  frac = clean_or_noise.mean((1, 2))
  assert 0.2 < frac.mean() < 0.8
  # Spatially correlated mask: neighbours agree much more than chance.
  agree = (clean_or_noise[:, 1:] == clean_or_noise[:, :-1]).mean()
  p = clean_or_noise.mean()
  assert agree > 0.8 and agree > p ** 2 + (1 - p) ** 2 + 0.25
  means = t.mean((1, 2))
  assert means.std() > 0.1      # far wider than independent sampling (Fig. 3 left)


def test_perlin_noise_matches_numpy_reference():
  key = jax.random.key(5)
  cell, h, w = 4, 8, 12
  noise = np.asarray(timesteps.perlin_noise(key, h, w, cell))
  angle = np.asarray(jax.random.uniform(key, (h // cell + 1, w // cell + 1), maxval=2 * np.pi))
  g = np.stack([np.cos(angle), np.sin(angle)], -1)
  fade = lambda x: 6 * x ** 5 - 15 * x ** 4 + 10 * x ** 3
  ref = np.zeros((h, w))
  for i in range(h):
    for j in range(w):
      y, x = (i + .5) / cell, (j + .5) / cell
      y0, x0 = int(y), int(x)
      fy, fx = y - y0, x - x0
      d = lambda dy, dx: g[y0 + dy, x0 + dx] @ np.array([fy - dy, fx - dx])
      top = d(0, 0) + fade(fx) * (d(0, 1) - d(0, 0))
      bot = d(1, 0) + fade(fx) * (d(1, 1) - d(1, 0))
      ref[i, j] = top + fade(fy) * (bot - top)
  np.testing.assert_allclose(noise, ref, atol=1e-5)


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match="Did you mean 'perlin'"):
    timesteps.get_sampler("perlinn")
  with pytest.raises(ValueError, match="patch size 3"):
    timesteps.get_sampler("patchwise", patch_sizes=(3,))(jax.random.key(0), 2, 8, 8)
  with pytest.raises(ValueError, match="t_min"):
    timesteps.get_sampler("global", t_min=0.5, t_max=0.2)
