"""PIFS schedule theory and operators against independent float64 references.

References: scalar `math` loops written straight from the paper's equations (and
alternative forms of them: Eq. 62, the Gaussian conditional mean), the paper's
Table 1 and Section 6.2 numbers, and closed forms of the Gaussian Jacobian.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.analysis import pifs
from asyncpatch_jax.analysis import ddim_maps

T = 1000
SCHEDULES = {
    "linear": pifs.linear_schedule(T),
    "cosine_s0": pifs.cosine_schedule(T, 0.0),
    "cosine_s0.008": pifs.cosine_schedule(T, 0.008),
}
CHAINS = {
    "linear": (SCHEDULES["linear"], pifs.full_chain(T)),
    "cosine_s0": (SCHEDULES["cosine_s0"], pifs.full_chain(T)),
    "cosine_s0.008": (SCHEDULES["cosine_s0.008"], pifs.full_chain(T)),
    "ddim50_cosine_s0": (SCHEDULES["cosine_s0"], pifs.ddim_chain(T, 20)),
    "ddim49_cosine_s0": (SCHEDULES["cosine_s0"], pifs.ddim_chain(T, 20, first=20)),
}


# ----------------------------------------------------------------------------- references


def ref_linear(num_steps):
  out, prod = [1.0], 1.0
  for t in range(1, num_steps + 1):
    beta = 1e-4 + (0.02 - 1e-4) * (t - 1) / (num_steps - 1)
    prod *= 1.0 - beta
    out.append(prod)
  return out


def ref_cosine(num_steps, s):
  f = lambda t: math.cos((t / num_steps + s) / (1 + s) * math.pi / 2) ** 2
  out, prod = [1.0], 1.0
  for t in range(1, num_steps + 1):
    prod *= 1.0 - min(1.0 - f(t) / f(t - 1), 0.999)
    out.append(prod)
  return out


def ref_b(a, ap):
  return math.sqrt(1 - ap) - math.sqrt(ap) * math.sqrt(1 - a) / math.sqrt(a)


def ref_f_snr(lam, a, ap):
  """Eq. 62: f_t in terms of SNR_t = abar_t / v_t (an algebraically different form)."""
  snr = a / (1 - a)
  return (math.sqrt(ap / a) * lam * snr + math.sqrt((1 - ap) / (1 - a))) / (lam * snr + 1)


def ref_root(fun, lo, hi):
  for _ in range(200):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if fun(mid) < 0 else (lo, mid)
  return 0.5 * (lo + hi)


# ----------------------------------------------------------------------------- schedules


def test_schedules_match_scalar_reference():
  np.testing.assert_allclose(SCHEDULES["linear"], ref_linear(T), rtol=1e-12, atol=0)
  for s in (0.0, 0.008):
    np.testing.assert_allclose(pifs.cosine_schedule(T, s), ref_cosine(T, s), rtol=1e-12)
  # Without the clip the cosine schedule is f(t) / f(0): check where the clip is idle.
  t = np.arange(T)
  f = np.cos((t / T + 0.008) / 1.008 * np.pi / 2) ** 2
  np.testing.assert_allclose(SCHEDULES["cosine_s0.008"][:T], f / f[0], rtol=1e-11)


def test_chain_steps_and_bad_chains():
  steps = pifs.chain_steps(SCHEDULES["cosine_s0"], pifs.ddim_chain(T, 20))
  assert steps.t[0] == 20 and steps.t_prev[0] == 0 and len(steps.t) == 50
  assert steps.abar_prev[0] == 1.0
  with pytest.raises(ValueError, match="not strictly increasing"):
    pifs.chain_steps(SCHEDULES["linear"], [0, 20, 20, 40])
  with pytest.raises(ValueError, match="not strictly increasing"):
    pifs.chain_steps(SCHEDULES["linear"], [1000, 980, 960])
  with pytest.raises(ValueError, match=r"\[0, 1000\]"):
    pifs.chain_steps(SCHEDULES["linear"], [0, 500, 1001])
  with pytest.raises(ValueError, match="reach T"):
    pifs.ddim_chain(T, 30)


# ----------------------------------------------------------------------------- formulas


@pytest.mark.parametrize("name", list(CHAINS))
def test_step_formulas_match_scalar_reference(name):
  abar, ts = CHAINS[name]
  st = pifs.chain_steps(abar, ts)
  b = pifs.score_coefficient(st.abar_t, st.abar_prev)
  l_star = pifs.contraction_threshold(st.abar_t, st.abar_prev)
  lam_star = pifs.expansion_threshold(st.abar_t, st.abar_prev)
  lams = np.array([0.3, 1.0, 7.0, 40.0])
  f = pifs.expansion_function(lams, st.abar_t, st.abar_prev)
  idx = np.unique(np.linspace(0, len(st.t) - 1, 40).astype(int))
  for i in idx:
    a, ap = st.abar_t[i], st.abar_prev[i]
    assert b[i] == pytest.approx(ref_b(a, ap), rel=1e-12)
    assert b[i] < 0  # Prop. 3
    assert l_star[i] == pytest.approx((math.sqrt(ap / a) - 1) / abs(ref_b(a, ap)), rel=1e-12)
    for j, lam in enumerate(lams):
      assert f[j, i] == pytest.approx(ref_f_snr(lam, a, ap), rel=1e-10)
    # lambda*(t) (Eq. 27) is the root of f_t = 1, found here by scalar bisection.
    root = ref_root(lambda lam: ref_f_snr(lam, a, ap) - 1.0, 1e-9, 1e9)
    assert lam_star[i] == pytest.approx(root, rel=1e-8)


def test_mean_log_expansion_is_the_mean_log():
  abar, ts = CHAINS["ddim50_cosine_s0"]
  st = pifs.chain_steps(abar, ts)
  for mu in (0.5, 1.05, 3.0):
    ref = sum(math.log(ref_f_snr(mu, a, ap)) for a, ap in zip(st.abar_t, st.abar_prev))
    assert pifs.mean_log_expansion(mu, st.abar_t, st.abar_prev) == pytest.approx(
        ref / len(st.t), rel=1e-10)


# ----------------------------------------------------------------------------- theorems


@pytest.mark.parametrize("name", list(CHAINS))
def test_theorem_17(name):
  """(b) lambda*(t) > 1 and f_t(1) = sqrt(abar abar') + sqrt(v v') < 1; (a) f_t(lambda*) = 1;
  (c) f_t strictly increasing."""
  st = pifs.chain_steps(*CHAINS[name])
  a, ap = st.abar_t, st.abar_prev
  lam_star = pifs.expansion_threshold(a, ap)
  assert np.all(lam_star > 1.0)
  f1 = pifs.expansion_function(1.0, a, ap)
  np.testing.assert_allclose(f1, np.sqrt(a * ap) + np.sqrt((1 - a) * (1 - ap)), rtol=1e-12)
  assert np.all(f1 < 1.0)
  np.testing.assert_allclose(np.diagonal(pifs.expansion_function(lam_star, a, ap)), 1.0,
                             atol=1e-9)
  grid = np.geomspace(0.01, 100.0, 200)
  assert np.all(np.diff(pifs.expansion_function(grid, a, ap), axis=0) > 0)


@pytest.mark.parametrize("name", list(CHAINS))
def test_moran_threshold_and_theorem_25(name):
  st = pifs.chain_steps(*CHAINS[name])
  a, ap = st.abar_t, st.abar_prev
  lss = pifs.moran_threshold(a, ap)
  prod = math.prod(ref_f_snr(lss, x, y) for x, y in zip(a, ap))
  assert abs(prod - 1.0) < 1e-12  # Eq. 45
  # Uniqueness/bracketing: G < 1 just below, > 1 just above.
  assert math.prod(ref_f_snr(lss - 1e-7, x, y) for x, y in zip(a, ap)) < 1.0
  assert math.prod(ref_f_snr(lss + 1e-7, x, y) for x, y in zip(a, ap)) > 1.0
  # Thm. 25(c) and (a).
  assert lss > pifs.expansion_threshold(a, ap).min()
  assert pifs.mean_log_expansion(lss * 1.01, a, ap) > 0
  assert pifs.mean_log_expansion(lss * 0.99, a, ap) < 0


def test_theorem_28_no_equalised_schedule():
  """A constant L* is impossible for T >= 3: from abar_0 = 1 the only step with
  L*_1 = L lands on a1 = ((1 - L^2) / (1 + L^2))^2, and no abar_2 in (0, a1) gives
  L*_2 = L (the difference keeps one sign on a fine grid)."""
  for l_target in (0.05, 0.3, 0.6366, 0.8054, 0.95):
    a1 = ((1 - l_target**2) / (1 + l_target**2)) ** 2
    assert pifs.contraction_threshold(a1, 1.0) == pytest.approx(l_target, rel=1e-10)
    a2 = a1 * np.linspace(1e-6, 1 - 1e-9, 20001)
    diff = pifs.contraction_threshold(a2, a1) - l_target
    assert np.all(diff > 0) or np.all(diff < 0)
    assert np.abs(diff).min() > 1e-9
  for name in ("linear", "cosine_s0", "cosine_s0.008"):
    st = pifs.chain_steps(*CHAINS[name])
    l_star = pifs.contraction_threshold(st.abar_t, st.abar_prev)
    assert l_star.std() / l_star.mean() > 0.3


# ----------------------------------------------------------------------------- paper numbers


PAPER_TABLE1 = {  # mean, CV, L* at finest step, finest t (PIFS Table 1)
    "linear": (0.805, 0.341, 0.00500, 1),
    "cosine_s0": (0.637, 0.483, 0.00079, 1),
    "cosine_s0.008": (0.641, 0.474, 0.00321, 1),
    "ddim50_cosine_s0": (0.637, 0.483, 0.01571, 20),
}


@pytest.mark.parametrize("name", list(PAPER_TABLE1))
def test_table1_matches_paper(name):
  st = pifs.chain_steps(*CHAINS[name])
  l_star = pifs.contraction_threshold(st.abar_t, st.abar_prev)
  mean, cv, finest, finest_t = PAPER_TABLE1[name]
  assert round(l_star.mean(), 3) == mean
  assert round(l_star.std() / l_star.mean(), 3) == cv
  assert round(l_star[0], 5) == finest  # printed with 5 decimals
  assert st.t[0] == finest_t


def test_expansion_threshold_figures_match_paper():
  """Section 6.2: interior min near t = 350 / 500 / 496 (1.0025, 1.0016, 1.0016) and
  maxima 1.19 / 1.33 / 1.25; the paper's 50-step figures (min lambda* = 1.031664,
  lambda** = 1.049681) are those of cosine s = 0.008 on the chain {0, 20, ..., 980}."""
  expected = {"linear": (1.0025, 350, 1.19), "cosine_s0": (1.0016, 500, 1.33),
              "cosine_s0.008": (1.0016, 496, 1.25)}
  for name, (lo, argmin, hi) in expected.items():
    st = pifs.chain_steps(*CHAINS[name])
    lam = pifs.expansion_threshold(st.abar_t, st.abar_prev)
    interior = (st.t >= 2) & (st.t <= T - 2)
    assert round(lam[interior].min(), 4) == lo
    assert st.t[interior][np.argmin(lam[interior])] == argmin
    assert round(lam[interior].max(), 2) == hi
  st = pifs.chain_steps(SCHEDULES["cosine_s0.008"], np.arange(0, 981, 20))
  assert round(pifs.expansion_threshold(st.abar_t, st.abar_prev).min(), 6) == 1.031664
  assert round(pifs.moran_threshold(st.abar_t, st.abar_prev), 6) == 1.049681


# ----------------------------------------------------------------------------- KY, IG


def ky_brute(values, counts):
  l = np.sort(np.repeat(values, counts))[::-1]
  cs = np.cumsum(l)
  j = int(np.sum(cs >= 0))
  if j == 0:
    return 0.0
  return float(len(l)) if j == len(l) else j + cs[j - 1] / abs(l[j])


def test_gaussian_ky_dimension_theorem_26():
  st = pifs.chain_steps(*CHAINS["ddim50_cosine_s0"])
  a, ap = st.abar_t, st.abar_prev
  lss = pifs.moran_threshold(a, ap)
  n_k = np.array([4, 4, 4, 4])
  # Condition (46) holds: one weakly expanding patch.
  lams = np.array([1.06, 0.9, 0.5, 0.3])
  out = pifs.gaussian_ky_dimension(lams, n_k, a, ap)
  expo = pifs.mean_log_expansion(lams, a, ap)
  assert out["condition_46"] and out["exact"] and out["n_plus"] == 4
  assert out["value"] == pytest.approx(4 + 4 * expo[0] / abs(expo[1]), rel=1e-12)
  assert out["value"] == pytest.approx(ky_brute(expo, n_k), rel=1e-12)
  assert out["spectrum_value"] == pytest.approx(out["value"], rel=1e-12)
  # (46) fails: the theorem's lower bound is below the KY of the exact spectrum.
  lams = np.array([3.0, 1.2, 0.9, 0.3])
  out = pifs.gaussian_ky_dimension(lams, n_k, a, ap, lambda_ss=lss)
  expo = pifs.mean_log_expansion(lams, a, ap)
  assert not out["condition_46"] and not out["exact"]
  assert out["value"] == pytest.approx(8 + 8 * expo[1] / abs(expo[2]), rel=1e-12)
  assert out["spectrum_value"] == pytest.approx(ky_brute(expo, n_k), rel=1e-12)
  assert out["value"] <= out["spectrum_value"] + 1e-12
  # Saturated and empty attractors.
  assert pifs.gaussian_ky_dimension([5.0, 9.0], 3, a, ap)["value"] == 6.0
  assert pifs.gaussian_ky_dimension([0.5, 0.9], 3, a, ap)["value"] == 0.0


def test_information_gain_and_ky_growth():
  st = pifs.chain_steps(*CHAINS["cosine_s0.008"])
  a, ap = st.abar_t, st.abar_prev
  lams, n_k = np.array([0.8, 2.0, 20.0]), np.array([3, 5, 7])
  ig = pifs.information_gain(lams, n_k, a, ap)
  ig_exact = pifs.information_gain(lams, n_k, a, ap, exact=True)
  dd = pifs.ky_dimension_growth(lams, n_k, a, ap)
  lss = pifs.moran_threshold(a, ap)
  for i in (0, 1, 300, 998, 999):
    logf = [math.log(ref_f_snr(l, a[i], ap[i])) for l in lams]
    assert ig[i] == pytest.approx(sum(n * lf**2 for n, lf in zip(n_k, logf)), rel=1e-10)
    assert dd[i] == pytest.approx(
        sum(n * lf for n, lf, l in zip(n_k, logf, lams) if l > lss), rel=1e-10)
    # Eq. 54: KL(N(0, s1 I) || N(0, s2 I)) from the covariance form of the Gaussian KL.
    kl = 0.0
    for lam, n in zip(lams, n_k):
      s1, s2 = ap[i] * lam + 1 - ap[i], a[i] * lam + 1 - a[i]
      kl += 0.5 * n * (s1 / s2 - 1 - math.log(s1 / s2))
    assert ig_exact[i] == pytest.approx(kl, rel=1e-9)
  # Theorem 32: Delta d_t <= sqrt(N++) sqrt(IG_t), and sum_t Delta d_t = T sum n_k Lambda.
  n_pp = n_k[lams > lss].sum()
  assert np.all(dd <= np.sqrt(n_pp * ig) + 1e-12)
  expo = pifs.mean_log_expansion(lams[lams > lss], a, ap)
  assert dd.sum() == pytest.approx(len(a) * np.sum(n_k[lams > lss] * expo), rel=1e-10)


# ----------------------------------------------------------------------------- operators


def _random_spd(n, seed, jitter=0.05):
  a = np.random.RandomState(seed).randn(n, n)
  return a @ a.T / n + jitter * np.eye(n)


def test_gaussian_eps_and_ddim_step_jacobian():
  """Thm. 17 proof: J eps* = sqrt(v) (abar Sigma + v I)^{-1}; J Phi_t from Eq. 7."""
  shape, n = (2, 3, 2), 12
  sigma = _random_spd(n, 0)
  mean = np.random.RandomState(1).randn(n)
  with jax.enable_x64(True):
    eps_fn = ddim_maps.gaussian_eps_fn(sigma, mean, image_shape=shape)
    x = np.random.RandomState(2).randn(*shape)
    a, ap = 0.3, 0.45
    v = 1 - a
    # Conditional mean by solve (not by the eigendecomposition the library uses).
    ref = np.sqrt(v) * np.linalg.solve(a * sigma + v * np.eye(n), x.reshape(-1) - np.sqrt(a) * mean)
    np.testing.assert_allclose(np.asarray(eps_fn(jnp.asarray(x), a)).reshape(-1), ref, rtol=1e-10)
    # Batched input gives the same.
    xb = jnp.stack([jnp.asarray(x), 2 * jnp.asarray(x)])
    np.testing.assert_allclose(np.asarray(eps_fn(xb, a))[0].reshape(-1), ref, rtol=1e-10)
    phi = ddim_maps.ddim_step(eps_fn, a, ap)
    jac = np.asarray(jax.jacfwd(phi)(jnp.asarray(x))).reshape(n, n)
    ref_jac = (np.sqrt(ap / a) * np.eye(n) + ref_b(a, ap) * np.sqrt(v)
               * np.linalg.inv(a * sigma + v * np.eye(n)))
    np.testing.assert_allclose(jac, ref_jac, rtol=1e-10, atol=1e-12)


def test_gaussian_eps_rejects_non_positive_definite():
  bad = np.diag([1.0, 0.5, -0.1, 2.0])
  with pytest.raises(ValueError, match="not positive definite"):
    ddim_maps.gaussian_eps_fn(bad)
  with pytest.raises(ValueError, match="not symmetric"):
    ddim_maps.gaussian_eps_fn(np.array([[1.0, 0.5], [0.0, 1.0]]))
  with pytest.raises(ValueError, match="abar_t"):
    ddim_maps.ddim_step(lambda x, a: x, 0.5, 0.4)


def _gaussian_rf_velocity(sigma, mean):
  """Exact E[eps - x | z] for z = (1 - t) x + t eps, x ~ N(mean, Sigma), per-image t."""
  n = sigma.shape[0]

  def vel(z, t_map):
    t = np.asarray(t_map)[:, 0, 0]
    out = []
    for zb, tb in zip(np.asarray(z).reshape(len(t), n), t):
      k = (1 - tb) ** 2 * sigma + tb**2 * np.eye(n)
      r = np.linalg.solve(k, zb - (1 - tb) * mean)
      e_eps = tb * r
      e_x = mean + (1 - tb) * sigma @ r
      out.append(e_eps - e_x)
    return jnp.asarray(np.stack(out).reshape(np.shape(z)))

  return vel


def test_velocity_to_eps_matches_exact_gaussian_eps():
  """RF -> VP conversion: the exact Gaussian velocity, wrapped, is the exact eps*."""
  shape, n = (2, 2, 3), 12
  sigma = _random_spd(n, 3)
  mean = 0.3 * np.random.RandomState(4).randn(n)
  with jax.enable_x64(True):
    eps_vp = ddim_maps.gaussian_eps_fn(sigma, mean)
    eps_rf = ddim_maps.velocity_to_eps(_gaussian_rf_velocity(sigma, mean))
    vel = _gaussian_rf_velocity(sigma, mean)
    eps_rf_image = ddim_maps.velocity_to_eps(
        lambda z, t: vel(z, np.broadcast_to(np.asarray(t)[:, None, None], z.shape[:3])),
        per_image_time=True)
    x = jnp.asarray(np.random.RandomState(5).randn(3, *shape))
    for abar in (0.999, 0.7, 0.2, 1e-3):
      np.testing.assert_allclose(np.asarray(eps_rf(x, abar)), np.asarray(eps_vp(x, abar)),
                                 rtol=1e-9, atol=1e-11)
      np.testing.assert_allclose(np.asarray(eps_rf_image(x, abar)),
                                 np.asarray(eps_vp(x, abar)), rtol=1e-9, atol=1e-11)
    t = ddim_maps.rf_time(0.7)
    assert (1 - t) / t == pytest.approx(math.sqrt(0.7 / 0.3), rel=1e-12)


def test_ddim_chain_scan_equals_step_sequence():
  shape, n = (2, 2, 1), 4
  with jax.enable_x64(True):
    eps_fn = ddim_maps.gaussian_eps_fn(_random_spd(n, 6))
    abar, ts = SCHEDULES["cosine_s0"], pifs.ddim_chain(T, 100)
    x = jnp.asarray(np.random.RandomState(7).randn(*shape))
    y = x
    for f in ddim_maps.ddim_step_fns(eps_fn, abar, ts):
      y = f(y)
    chain = ddim_maps.ddim_chain_fn(eps_fn, abar, ts)
    assert len(chain) == 10
    np.testing.assert_allclose(np.asarray(chain(x)), np.asarray(y), rtol=1e-10, atol=1e-13)
    # With exact Gaussian eps and a = 1 at the end, the chain's Jacobian is the product
    # of the per-step closed forms (independent check of ordering).
    jac = np.asarray(jax.jacfwd(chain)(x)).reshape(n, n)
    st = pifs.chain_steps(abar, ts)
    sig = np.asarray(_random_spd(n, 6))
    prod = np.eye(n)
    for a, ap in zip(st.abar_t[::-1], st.abar_prev[::-1]):
      prod = (np.sqrt(ap / a) * np.eye(n) + ref_b(a, ap) * np.sqrt(1 - a)
              * np.linalg.inv(a * sig + (1 - a) * np.eye(n))) @ prod
    np.testing.assert_allclose(jac, prod, rtol=1e-9, atol=1e-12)
