"""evaluation/statistics.py against closed forms and NumPy."""

import numpy as np
import pytest
from scipy import stats as scipy_stats

from asyncpatch_jax.evaluation import metrics
from asyncpatch_jax.evaluation import statistics
from asyncpatch_jax.runtime import checks


def test_bootstrap_interval_of_a_mean_matches_the_t_interval_on_gaussian_data():
  """n = 400 draws of N(3, 2^2): the BCa bootstrap interval's ends are within 5% of the
  half-width of the closed-form t interval (Monte Carlo error of 20,000 resamples ~1%)."""
  x = np.random.default_rng(0).normal(3.0, 2.0, 400)
  got = statistics.interval(x, resamples=20000)
  half = scipy_stats.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / np.sqrt(len(x))
  assert got.estimate == pytest.approx(x.mean(), abs=1e-12)
  assert abs(got.low - (x.mean() - half)) < 0.05 * half, (got, half)
  assert abs(got.high - (x.mean() + half)) < 0.05 * half, (got, half)
  assert (got.level, got.n, got.method) == (0.95, 400, "BCa")


def test_paired_interval_is_narrower_than_unpaired_on_correlated_data():
  """a = z + e, b = z + 0.1 + e': the shared per-image z (sd 3) cancels in the paired
  difference, whose interval then holds the true -0.1 and excludes 0."""
  rng = np.random.default_rng(1)
  z = rng.normal(0, 3, 300)
  a, b = z + rng.normal(0, 0.2, 300), z + 0.1 + rng.normal(0, 0.2, 300)
  p = statistics.paired(a, b)
  u = statistics.unpaired(a, b)
  assert p.high - p.low < 0.2 * (u.high - u.low)
  assert p.low < -0.1 < p.high and p.high < 0
  assert u.low < 0 < u.high                         # unpaired: lost in the images' spread
  assert statistics.verdict(p) == "worse" and statistics.verdict(u) == "within noise"
  assert statistics.verdict(p, higher_is_better=False) == "better"
  # The paired interval is the interval of the per-image differences.
  d = statistics.interval(a - b)
  assert (p.low, p.high) == (d.low, d.high)


def test_seed_aggregation_matches_numpy():
  v = [0.81, 0.79, 0.86, 0.83]
  got = statistics.across_seeds(v)
  assert got["mean"] == pytest.approx(np.mean(v), abs=1e-15)
  assert got["std"] == pytest.approx(np.std(v, ddof=1), abs=1e-15)
  assert got["sem"] == pytest.approx(np.std(v, ddof=1) / 2.0, abs=1e-15)
  assert got["n"] == 4 and got["values"] == v


def test_set_level_interval_recomputes_the_metric_on_resampled_images():
  """A set-level metric (here the variance of 1-d features, whose sampling sd is known:
  sigma^2 sqrt(2 / (n - 1)) for Gaussian data) gets an interval about +-1.96 of it."""
  x = np.random.default_rng(2).normal(0, 1.5, 500)
  seen = []

  def var(idx):
    seen.append(len(idx))
    return float(np.var(x[idx], ddof=1))

  got = statistics.set_interval(var, len(x), resamples=2000)
  assert got.estimate == pytest.approx(np.var(x, ddof=1))
  half = 1.96 * 1.5 ** 2 * np.sqrt(2 / (len(x) - 1))
  assert abs((got.high - got.low) / 2 - half) < 0.15 * half, (got, half)
  assert set(seen) == {500} and len(seen) > 2000          # one call per resample (+ the estimate)
  # Paired set-level: a metric minus itself shifted by a constant is exactly the constant.
  diff = statistics.paired_set(var, lambda idx: var(idx) - 0.25, len(x), resamples=200)
  assert diff.low == pytest.approx(0.25) and diff.high == pytest.approx(0.25)


def test_frechet_interval_is_bias_corrected_and_covers_the_true_distance():
  """Gaussian features [256, 16] against a fixed reference N(0, I), whose true Frechet distance
  is the closed form of the generating N(mu, C): over 120 draws the default (basic)
  interval holds it at about its 95% level (Monte Carlo s.e. of a coverage 2%), while the
  percentile interval, shifted up by the resamples' repeats, holds it under half the time."""
  rng = np.random.default_rng(0)
  d, n = 16, 256
  a = rng.normal(size=(d, d)) / np.sqrt(d)
  cov, mu = a @ a.T + 0.5 * np.eye(d), 0.3 * rng.normal(size=d)
  truth = metrics.frechet_distance(mu, cov, np.zeros(d), np.eye(d))
  chol = np.linalg.cholesky(cov)
  covered = {"basic": 0, "percentile": 0}
  for trial in range(120):
    x = mu + rng.normal(size=(n, d)) @ chol.T
    fd = lambda idx, x=x: metrics.frechet_distance(*metrics.feature_statistics(x[idx]),
                                                   np.zeros(d), np.eye(d))
    for method in covered:
      got = statistics.set_interval(fd, n, resamples=200, seed=trial, method=method)
      assert got.method == method and got.estimate == fd(np.arange(n))
      covered[method] += got.low <= truth <= got.high
  assert 0.88 <= covered["basic"] / 120 <= 1.0, covered
  assert covered["percentile"] / 120 < 0.7, covered
  assert statistics.set_interval(fd, n, resamples=50).method == "basic"     # the default
  with pytest.raises(checks.InputError, match="set_interval method 'BCa'"):
    statistics.set_interval(fd, n, method="BCa")


def test_verdict_rule_and_bad_input():
  make = lambda lo, hi: statistics.Interval((lo + hi) / 2, lo, hi, 0.95, 10, "BCa")
  assert statistics.verdict(make(0.1, 0.4)) == "better"
  assert statistics.verdict(make(-0.4, -0.1)) == "worse"
  assert statistics.verdict(make(-0.1, 0.4)) == "within noise"
  assert statistics.verdict(make(0.1, 0.4), higher_is_better=False) == "worse"
  assert statistics.interval([2.0, 2.0, 2.0]).as_dict()["low"] == 2.0   # no spread
  with pytest.raises(checks.InputError, match="same images"):
    statistics.paired([1.0, 2.0, 3.0], [1.0, 2.0])
  with pytest.raises(checks.InputError, match="at least 2 finite"):
    statistics.interval([1.0, np.nan, 2.0])
  with pytest.raises(checks.InputError, match="2 or more runs"):
    statistics.across_seeds([0.5])


def test_seed_difference_is_welchs_t_interval():
  """Against the Welch interval written out (Satterthwaite degrees of freedom) and scipy's
  ttest_ind; with equal spreads and sizes it is the pooled t interval."""
  a, b = np.array([0.81, 0.84, 0.80]), np.array([0.70, 0.79, 0.73, 0.77])
  got = statistics.seed_difference(a, b)
  va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 4
  dof = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 3)
  half = scipy_stats.t.ppf(0.975, dof) * np.sqrt(va + vb)
  assert got.estimate == pytest.approx(a.mean() - b.mean(), abs=1e-12)
  assert (got.low, got.high) == pytest.approx((got.estimate - half, got.estimate + half), abs=1e-12)
  ci = scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
  assert (got.low, got.high) == pytest.approx((ci.low, ci.high), abs=1e-9)
  assert statistics.verdict(got) == "better"
  # Equal variances and sizes: the pooled interval (2n - 2 degrees of freedom).
  c, d = np.array([1.0, 2.0, 3.0]), np.array([2.0, 3.0, 4.0])
  pooled = scipy_stats.t.ppf(0.975, 4) * np.sqrt(2 * c.var(ddof=1) / 3)
  assert statistics.seed_difference(c, d).high == pytest.approx(-1 + pooled, abs=1e-12)
  assert statistics.verdict(statistics.seed_difference(c, d)) == "within noise"
  with pytest.raises(checks.InputError, match="2 or more runs a side"):
    statistics.seed_difference([1.0], [1.0, 2.0])


def test_seed_paired_is_the_paired_t_interval():
  """Two methods on each seed's same run: scipy's ttest_rel interval; the run-to-run spread
  that Welch's interval keeps cancels, so it is narrower on the same values."""
  a = np.array([30.1, 31.4, 29.2])
  b = np.array([29.8, 31.0, 28.9])
  got = statistics.seed_paired(a, b)
  ci = scipy_stats.ttest_rel(a, b).confidence_interval(0.95)
  assert got.estimate == pytest.approx((a - b).mean(), abs=1e-12)
  assert (got.low, got.high) == pytest.approx((ci.low, ci.high), abs=1e-9)
  assert statistics.verdict(got) == "better"
  assert statistics.verdict(statistics.seed_difference(a, b)) == "within noise"
  with pytest.raises(checks.InputError, match="same 2 or more runs"):
    statistics.seed_paired([1.0, 2.0], [1.0, 2.0, 3.0])
