"""Uncertainty for the numbers the library reports, and the one rule for calling a
difference "better" or "worse".

  interval(values)          bootstrap interval of a per-image metric's mean (PSNR, SSIM,
                            a 0/1 confident or valid flag), resampling images;
  set_interval(fn, n)       bootstrap interval of a set-level metric (Frechet distance,
                            PRDC): fn(indices) recomputes it on the resampled images;
  paired(a, b)              interval of mean(a) - mean(b) over the same images, masks and
                            keys (resampled together: the shared noise cancels);
  unpaired(a, b)            the same for values on different images;
  paired_set(fn_a, fn_b, n) the same for set-level metrics;
  across_seeds(values)      mean, sample standard deviation and standard error over
                            repeated runs (training or sampling seeds);
  seed_difference(a, b)     Welch's t interval of the difference of two methods' seed
                            means (a claim about training; different runs on each side);
  seed_paired(a, b)         the t interval of the mean per-seed difference when both
                            methods ran on each seed's same trained model (two samplers of
                            one run): the run-to-run spread cancels;
  verdict(diff)             the rule: "better" / "worse" when the 95% interval of the
                            paired difference excludes 0, else "within noise".

Intervals are scipy.stats.bootstrap's (BCa by default; for set-level metrics, whose
jackknife would recompute the metric n times, the basic (reverse percentile) interval, which
corrects the bias of resamples with repeats), seeded, so a result is reproducible. Each
comes back as an `Interval`, JSON-ready with `as_dict`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from scipy import stats

from asyncpatch_jax.runtime import checks

LEVEL = 0.95
RESAMPLES = 2000


@dataclasses.dataclass(frozen=True)
class Interval:
  """estimate (on the full sample) with its [low, high] interval at `level`."""
  estimate: float
  low: float
  high: float
  level: float
  n: int
  method: str

  def as_dict(self) -> dict:
    return dataclasses.asdict(self)

  def excludes_zero(self) -> bool:
    return self.low > 0 or self.high < 0


def _check(values, name: str) -> np.ndarray:
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or len(values) < 2 or not np.isfinite(values).all():
    raise checks.InputError(f"{name}: expected at least 2 finite per-image values in a 1-D "
                            f"array; got shape {values.shape}.")
  return values


def _interval(estimate, result, level, n, method) -> Interval:
  ci = result.confidence_interval
  return Interval(float(estimate), float(ci.low), float(ci.high), level, int(n), method)


def interval(values, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0,
             method: str = "BCa") -> Interval:
  """Bootstrap interval of the mean of per-image values [N]."""
  values = _check(values, "interval")
  if np.ptp(values) == 0:              # every image the same: no spread to resample
    v = float(values[0])
    return Interval(v, v, v, level, len(values), method)
  res = stats.bootstrap((values,), np.mean, n_resamples=resamples, confidence_level=level,
                        method=method, rng=np.random.default_rng(seed))
  return _interval(values.mean(), res, level, len(values), method)


def paired(a, b, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0,
           method: str = "BCa") -> Interval:
  """Interval of mean(a) - mean(b), a and b [N] measured on the same images (and masks
  and keys): the images are resampled together."""
  a, b = _check(a, "paired a"), _check(b, "paired b")
  if a.shape != b.shape:
    raise checks.InputError(f"paired: a has {len(a)} values and b {len(b)}; a paired "
                            "comparison needs the same images on both sides.")
  return interval(a - b, level=level, resamples=resamples, seed=seed, method=method)


def unpaired(a, b, *, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0,
             method: str = "BCa") -> Interval:
  """Interval of mean(a) - mean(b) for values on different images (each side resampled on
  its own): use `paired` whenever the images, masks and keys are shared."""
  a, b = _check(a, "unpaired a"), _check(b, "unpaired b")
  res = stats.bootstrap((a, b), lambda x, y, axis=-1: x.mean(axis) - y.mean(axis),
                        n_resamples=resamples, confidence_level=level, method=method,
                        rng=np.random.default_rng(seed))
  return _interval(a.mean() - b.mean(), res, level, min(len(a), len(b)), method)


SET_METHODS = ("basic", "percentile")


def set_interval(fn: Callable[[np.ndarray], float], n: int, *, level: float = LEVEL,
                 resamples: int = 500, seed: int = 0, method: str = "basic") -> Interval:
  """Bootstrap interval of a set-level metric of n images: fn(indices [n]) is the metric on
  the images at `indices` (with repeats).

  method "basic" (the default; scipy's reverse percentile, [2 est - q_hi, 2 est - q_lo]) is
  bias-corrected: a resample with repeats has fewer distinct images, which raises a Frechet
  distance by about as much as the estimate itself exceeds the true distance, and the
  basic interval subtracts that shift where the "percentile" interval [q_lo, q_hi] adds it.
  On Gaussian features with a known distance (tests/test_statistics.py) the basic interval
  covers the truth at about its level; the percentile one, above the estimate, at under half.
  """
  if n < 2:
    raise checks.InputError(f"set_interval: {n} images; need at least 2.")
  checks.check_choice(method, SET_METHODS, "set_interval method")
  res = stats.bootstrap((np.arange(n),), lambda idx: fn(np.asarray(idx, np.int64)),
                        n_resamples=resamples, confidence_level=level, method=method,
                        vectorized=False, rng=np.random.default_rng(seed))
  return _interval(fn(np.arange(n)), res, level, n, method)


def paired_set(fn_a: Callable[[np.ndarray], float], fn_b: Callable[[np.ndarray], float],
               n: int, **kwargs) -> Interval:
  """set_interval of fn_a - fn_b, both on the same resampled images."""
  return set_interval(lambda idx: fn_a(idx) - fn_b(idx), n, **kwargs)


def across_seeds(values) -> dict:
  """{'values', 'mean', 'std' (ddof 1), 'sem', 'n'} of one number over repeated runs."""
  values = np.asarray(values, np.float64)
  if values.ndim != 1 or len(values) < 2:
    raise checks.InputError(f"across_seeds: expected the values of 2 or more runs; got "
                            f"shape {values.shape}.")
  std = float(values.std(ddof=1))
  return {"values": values.tolist(), "mean": float(values.mean()), "std": std,
          "sem": std / np.sqrt(len(values)), "n": len(values)}


def seed_difference(a, b, *, level: float = LEVEL) -> Interval:
  """Interval of mean(a) - mean(b) for one number of runs repeated over seeds (a: one
  method's runs, b: the other's; 2 or more each): Welch's t interval, whose
  Welch-Satterthwaite degrees of freedom allow unequal spreads. With 3 seeds a side it is
  wide; it is the honest interval for a claim about training."""
  a, b = (np.asarray(v, np.float64) for v in (a, b))
  if a.ndim != 1 or b.ndim != 1 or len(a) < 2 or len(b) < 2:
    raise checks.InputError(f"seed_difference: expected the values of 2 or more runs a side; "
                            f"got shapes {a.shape} and {b.shape}.")
  va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
  se = np.sqrt(va + vb)
  dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1)) if se > 0 else np.inf
  half = float(stats.t.ppf(0.5 + level / 2, dof) * se)
  estimate = float(a.mean() - b.mean())
  return Interval(estimate, estimate - half, estimate + half, level, min(len(a), len(b)),
                  "welch-t")


def seed_paired(a, b, *, level: float = LEVEL) -> Interval:
  """Interval of mean(a - b) over seeds, a[s] and b[s] measured on the same run of seed s
  (e.g. two inpainting methods on one trained model): the one-sample t interval of the
  per-seed differences, n - 1 degrees of freedom."""
  a, b = (np.asarray(v, np.float64) for v in (a, b))
  if a.ndim != 1 or a.shape != b.shape or len(a) < 2:
    raise checks.InputError(f"seed_paired: expected the values of the same 2 or more runs on "
                            f"both sides; got shapes {a.shape} and {b.shape}.")
  d = a - b
  half = float(stats.t.ppf(0.5 + level / 2, len(d) - 1) * d.std(ddof=1) / np.sqrt(len(d)))
  estimate = float(d.mean())
  return Interval(estimate, estimate - half, estimate + half, level, len(d), "paired-t")


def verdict(diff: Interval, higher_is_better: bool = True) -> str:
  """The rule for a paired difference (method a - method b): "better" or "worse" (for a)
  when its interval excludes 0, "within noise" otherwise."""
  if not diff.excludes_zero():
    return "within noise"
  return "better" if (diff.low > 0) == higher_is_better else "worse"
