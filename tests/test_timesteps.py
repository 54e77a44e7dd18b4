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


def _mean_of_uniforms_moments(n):
  """Central moments (variance, 4th) of the mean of n iid U(0, 1) values (closed form)."""
  var, mu4 = 1.0 / 12.0, 1.0 / 80.0
  return var / n, (n * mu4 + 3 * n * (n - 1) * var ** 2) / n ** 4


def _assert_patch_structure(t, sizes):
  """Each map is constant on the patches of one size in `sizes` and differs across them.

  Returns the detected patch size per image: the largest size whose patches are constant.
  """
  def blocks(p):                                        # [B, H/p, p, W/p, p]
    return t.reshape(len(t), HW // p, p, HW // p, p)
  constant = np.stack([np.all(blocks(p) == blocks(p)[:, :, :1, :, :1], axis=(1, 2, 3, 4))
                       for p in sizes])                   # [S, B]
  assert constant.any(axis=0).all(), "not constant on patches of any size"
  p_img = np.array(sizes)[len(sizes) - 1 - np.argmax(constant[::-1], axis=0)]
  for p in sizes:
    values = t[p_img == p][:, ::p, ::p]                   # one value per patch
    assert np.all(values[:, 1:] != values[:, :-1]) and np.all(
        values[:, :, 1:] != values[:, :, :-1]), f"neighbouring {p}x{p} patches share a time"
  return p_img


def _assert_patchwise_mean_statistics(t, sizes, t_min, t_max):
  """The per-image mean time against its closed form for `patchwise` (AsyncPatch Fig. 3 middle).

  With patch size p drawn uniformly from `sizes` and n_p = (H/p)(W/p) iid U(t_min, t_max)
  patch values, the per-image mean m has E m = (t_min + t_max)/2 and, given p,
  Var(m | p) = r^2 / (12 n_p) (r = t_max - t_min); all conditional means agree, so the
  mixture has Var m = mean_p r^2 / (12 n_p). Sampling errors from the closed-form 4th
  moments; every check at 5 standard errors.
  """
  n_img, r = len(t), t_max - t_min
  means = t.mean(axis=(1, 2))
  p_img = _assert_patch_structure(t, sizes)
  counts = np.array([np.sum(p_img == p) for p in sizes])
  q = 1.0 / len(sizes)
  assert np.all(np.abs(counts - n_img * q) < 5 * np.sqrt(n_img * q * (1 - q))), counts
  mix_var = mix_mu4 = 0.0
  for p, count in zip(sizes, counts):
    var, mu4 = _mean_of_uniforms_moments((HW // p) ** 2)
    var, mu4 = var * r ** 2, mu4 * r ** 4
    mix_var, mix_mu4 = mix_var + q * var, mix_mu4 + q * mu4
    m = means[p_img == p]
    assert abs(m.mean() - (t_min + r / 2)) < 5 * np.sqrt(var / count), (p, m.mean())
    assert abs(m.var() - var) < 5 * np.sqrt((mu4 - var ** 2) / count), (p, m.var(), var)
  assert abs(means.var() - mix_var) < 5 * np.sqrt((mix_mu4 - mix_var ** 2) / n_img), (
      means.var(), mix_var)
  # The patch values themselves are U(t_min, t_max) (one per patch, first 64 images).
  values = np.concatenate([img[::p, ::p].ravel() for img, p in zip(t[:64], p_img[:64])])
  assert stats.kstest(values, "uniform", args=(t_min, r)).pvalue > 1e-3


def test_patchwise_matches_its_closed_form_and_a_global_map_does_not():
  sizes, t_min, t_max = (2, 4, 8, 16), 0.2, 0.9          # the default sizes for 32x32
  assert timesteps.default_patch_sizes(HW, HW) == sizes
  t = _draw("patchwise", t_min=t_min, t_max=t_max)
  assert t.min() >= t_min and t.max() <= t_max
  _assert_patchwise_mean_statistics(t, sizes, t_min, t_max)
  # A global map is constant on every patch but equal across them, and its per-image
  # mean has variance r^2 / 12: it fails the structure and the statistics.
  g = _draw("global", t_min=t_min, t_max=t_max)
  with pytest.raises(AssertionError, match="neighbouring"):
    _assert_patch_structure(g, sizes)
  with pytest.raises(AssertionError):
    _assert_patchwise_mean_statistics(g, sizes, t_min, t_max)
