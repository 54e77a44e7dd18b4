"""PIFS schedule theory (Dooms, "Fractals made practical"): closed-form, float64.

Everything here depends on the noise schedule (and, for the Gaussian attractor, on
patch variances) only; no model is evaluated. Conventions are the paper's discrete
variance-preserving ones (docs/conventions.md, "The PIFS analysis convention"):

  * `abar` is an array `[T + 1]` with `abar[0] = 1` (clean) decreasing to `abar[T]`.
  * A *chain* is a strictly increasing integer array of timesteps `[t_0 < t_1 < ... <
    t_N]` into `abar`; the full chain is `0, 1, ..., T`, the 50-step DDIM chain on
    T = 1000 is `0, 20, ..., 1000`. Step `i` (1-based) moves from `t_i` to `t_{i-1}`;
    the DDIM reverse chain applies the steps from `i = N` down to `i = 1`.
  * Per-step quantities take `(abar_t, abar_prev)`: arrays `[S]` (or broadcastable)
    holding `abar[t_i]` and `abar[t_{i-1}]`; `chain_steps` builds them. With
    `v_t = 1 - abar_t` every formula below is the paper's with `t - 1` read as "the
    previous point of the chain".

All arithmetic is NumPy float64, except the Moran bisection which is a
`lax.while_loop` under a local `jax.enable_x64` context (the global flag is never
touched).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks

# -----------------------------------------------------------------------------
# Schedules and chains.
# -----------------------------------------------------------------------------


def linear_schedule(num_steps: int, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> np.ndarray:
  """Linear-beta schedule of Ho et al. (PIFS Section 2.1).

  betas increase linearly from `beta_start` (t = 1) to `beta_end` (t = T) and
  `abar_t = prod_{s <= t} (1 - beta_s)`.

  Args:
    num_steps: T >= 1.
    beta_start, beta_end: the first and last beta.

  Returns:
    abar: float64 `[T + 1]` with `abar[0] = 1`.
  """
  num_steps = _check_num_steps(num_steps)
  betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
  return np.concatenate([[1.0], np.cumprod(1.0 - betas)])


def cosine_schedule(num_steps: int, s: float = 0.008,
                    max_beta: float = 0.999) -> np.ndarray:
  """Cosine schedule of Nichol & Dhariwal (PIFS Eq. 2), betas clipped at `max_beta`.

  `f(t) = cos^2((t / T + s) / (1 + s) * pi / 2)`, `beta_t = min(1 - f(t) / f(t - 1),
  max_beta)` and `abar_t = prod_{u <= t} (1 - beta_u)`; without clipping this is
  `abar_t = f(t) / f(0)`. The clip only acts at the last steps (for s = 0 it keeps
  `abar_T` away from 0).

  Args:
    num_steps: T >= 1.
    s: the offset `s_off >= 0` (0.008 is the improved schedule, 0 the original).
    max_beta: the clip.

  Returns:
    abar: float64 `[T + 1]` with `abar[0] = 1`.
  """
  num_steps = _check_num_steps(num_steps)
  if not s >= 0:
    raise checks.InputError(f"s = {s}; the cosine offset must be >= 0.")
  t = np.arange(num_steps + 1, dtype=np.float64) / num_steps
  f = np.cos((t + s) / (1.0 + s) * np.pi / 2.0) ** 2
  betas = np.minimum(1.0 - f[1:] / f[:-1], max_beta)
  return np.concatenate([[1.0], np.cumprod(1.0 - betas)])


def full_chain(num_steps: int) -> np.ndarray:
  """The chain `0, 1, ..., T` of every training step. Returns int `[T + 1]`."""
  return np.arange(_check_num_steps(num_steps) + 1)


def ddim_chain(num_steps: int, stride: int, first: int = 0) -> np.ndarray:
  """Sub-sampled DDIM chain `first, first + stride, ..., T` (must end at T).

  `ddim_chain(1000, 20)` is the 50-step chain `{0, 20, ..., 1000}`;
  `ddim_chain(1000, 20, first=20)` the 49-step chain `{20, 40, ..., 1000}`.

  Returns:
    int `[N + 1]`.
  """
  num_steps = _check_num_steps(num_steps)
  if stride < 1 or first < 0 or (num_steps - first) % stride:
    raise checks.InputError(f"stride = {stride}, first = {first}: the chain first + k * stride "
                     f"must reach T = {num_steps} exactly.")
  return np.arange(first, num_steps + 1, stride)


class ChainSteps(NamedTuple):
  """The steps of a chain, in increasing t (step i moves from t[i] to t_prev[i])."""
  t: np.ndarray  # int [S]
  t_prev: np.ndarray  # int [S]
  abar_t: np.ndarray  # float64 [S]
  abar_prev: np.ndarray  # float64 [S]


def check_chain(timesteps, num_steps: int | None = None) -> np.ndarray:
  """Validates a chain: integers, strictly increasing, at least two, inside [0, T].

  Returns:
    The chain as int64 `[N + 1]`.
  """
  ts = np.asarray(timesteps)
  if ts.ndim != 1 or ts.size < 2:
    raise checks.InputError(f"chain has shape {ts.shape}; expected at least two timesteps [N + 1].")
  if not np.issubdtype(ts.dtype, np.integer):
    if not np.all(np.equal(np.mod(ts, 1), 0)):
      raise checks.InputError(f"chain {ts.tolist()} holds non-integer timesteps.")
    ts = ts.astype(np.int64)
  if np.any(np.diff(ts) <= 0):
    bad = int(np.argmax(np.diff(ts) <= 0))
    raise checks.InputError(f"chain is not strictly increasing: t[{bad}] = {ts[bad]} >= "
                     f"t[{bad + 1}] = {ts[bad + 1]}. Give the timesteps in increasing "
                     "order, each once.")
  if ts[0] < 0 or (num_steps is not None and ts[-1] > num_steps):
    raise checks.InputError(f"chain spans [{ts[0]}, {ts[-1]}]; timesteps must lie in "
                     f"[0, {num_steps}].")
  return ts.astype(np.int64)


def chain_steps(abar, timesteps) -> ChainSteps:
  """Per-step `(abar_t, abar_prev)` of a chain on a schedule.

  Args:
    abar: float `[T + 1]`, `abar[0] = 1`, strictly decreasing along the chain, > 0.
    timesteps: a chain (see `check_chain`).

  Returns:
    `ChainSteps` with arrays `[N]`.
  """
  abar = np.asarray(abar, dtype=np.float64)
  if abar.ndim != 1 or abar.size < 2:
    raise checks.InputError(f"abar has shape {abar.shape}; expected [T + 1] with T >= 1.")
  ts = check_chain(timesteps, abar.size - 1)
  a = abar[ts]
  if np.any(a <= 0) or np.any(a > 1) or np.any(np.diff(a) >= 0):
    raise checks.InputError("abar must lie in (0, 1] and decrease strictly along the chain "
                     f"(got abar[chain] in [{a.min():.3g}, {a.max():.3g}]).")
  return ChainSteps(t=ts[1:], t_prev=ts[:-1], abar_t=a[1:], abar_prev=a[:-1])


# -----------------------------------------------------------------------------
# Per-step quantities (Eq. 5, 10, 26, 27).
# -----------------------------------------------------------------------------


def _pair(abar_t, abar_prev):
  a = np.asarray(abar_t, dtype=np.float64)
  ap = np.asarray(abar_prev, dtype=np.float64)
  if np.any(a <= 0) or np.any(ap > 1) or np.any(ap <= a):
    raise checks.InputError("need 0 < abar_t < abar_prev <= 1 at every step (a strictly "
                     "decreasing schedule).")
  return a, ap


def score_coefficient(abar_t, abar_prev) -> np.ndarray:
  """The DDIM score-step coefficient b_t (PIFS Eq. 5); negative (Prop. 3).

  `b_t = sqrt(1 - abar_prev) - sqrt(abar_prev) sqrt(1 - abar_t) / sqrt(abar_t)`.
  Shapes broadcast. NumPy inputs are checked and give float64; JAX arrays (also
  traced ones, as in `ddim_maps.ddim_step`) are computed with jnp in their dtype.
  """
  if isinstance(abar_t, jax.Array) or isinstance(abar_prev, jax.Array):
    a, ap = jnp.asarray(abar_t), jnp.asarray(abar_prev)
    return jnp.sqrt(1.0 - ap) - jnp.sqrt(ap) * jnp.sqrt(1.0 - a) / jnp.sqrt(a)
  a, ap = _pair(abar_t, abar_prev)
  return np.sqrt(1.0 - ap) - np.sqrt(ap) * np.sqrt(1.0 - a) / np.sqrt(a)


def contraction_threshold(abar_t, abar_prev) -> np.ndarray:
  """The contraction threshold L*_t (PIFS Eq. 10, Thm. 6).

  `L*_t = (sqrt(abar_prev / abar_t) - 1) / |b_t|`: Phi_t is an l2 contraction when
  the isotropic score gain exceeds it by the residual norm (condition C1).
  """
  a, ap = _pair(abar_t, abar_prev)
  return (np.sqrt(ap / a) - 1.0) / np.abs(score_coefficient(a, ap))


def expansion_function(lam, abar_t, abar_prev) -> np.ndarray:
  """The diagonal expansion function f_t(lambda) (PIFS Eq. 26, Thm. 17).

  `f_t(lambda) = sqrt(abar_prev / abar_t) - |b_t| sqrt(v_t) / (lambda abar_t + v_t)`,
  the eigenvalue of the Gaussian-optimal DDIM step along a data direction of
  variance lambda.

  Args:
    lam: variances, any shape `[...]`, > 0.
    abar_t, abar_prev: `[S]` (or scalars).

  Returns:
    float64 `[..., S]` (`[...]` for scalar steps).
  """
  a, ap = _pair(abar_t, abar_prev)
  lam = np.asarray(lam, dtype=np.float64)
  if np.any(lam < 0):
    raise checks.InputError(f"lam has negative entries (min {lam.min():.3g}); variances are >= 0.")
  if a.ndim:
    lam = lam[..., None]
  v = 1.0 - a
  return np.sqrt(ap / a) - np.abs(score_coefficient(a, ap)) * np.sqrt(v) / (lam * a + v)


def expansion_threshold(abar_t, abar_prev) -> np.ndarray:
  """The per-step patch expansion threshold lambda*(t) (PIFS Eq. 27).

  `lambda*(t) = sqrt(v_t) (sqrt(v_t) - sqrt(v_prev)) / ((sqrt(abar_prev) -
  sqrt(abar_t)) sqrt(abar_t))`, the unique root of `f_t(lambda) = 1`; > 1 (Thm. 17b).
  """
  a, ap = _pair(abar_t, abar_prev)
  v, vp = 1.0 - a, 1.0 - ap
  return np.sqrt(v) * (np.sqrt(v) - np.sqrt(vp)) / ((np.sqrt(ap) - np.sqrt(a)) * np.sqrt(a))


def mean_log_expansion(mu, abar_t, abar_prev) -> np.ndarray:
  """Lambda(mu) = (1/N) sum_t log f_t(mu) over the N steps (PIFS Thm. 25).

  Under Gaussian data with the perfect score this is the Lyapunov exponent (Eq. 43)
  of the chain along a data direction of variance mu.

  Args:
    mu: variances `[...]`.
    abar_t, abar_prev: `[S]`, the steps of one chain.

  Returns:
    float64 `[...]`.
  """
  a = np.atleast_1d(np.asarray(abar_t, dtype=np.float64))
  ap = np.atleast_1d(np.asarray(abar_prev, dtype=np.float64))
  return np.mean(np.log(expansion_function(mu, a, ap)), axis=-1)


# -----------------------------------------------------------------------------
# The Moran threshold (Eq. 45).
# -----------------------------------------------------------------------------


def _log_g_jnp(lam, a, ap):
  """sum_t log f_t(lam) in jnp (float64 under enable_x64)."""
  v, vp = 1.0 - a, 1.0 - ap
  b_abs = jnp.sqrt(ap) * jnp.sqrt(v) / jnp.sqrt(a) - jnp.sqrt(vp)
  return jnp.sum(jnp.log(jnp.sqrt(ap / a) - b_abs * jnp.sqrt(v) / (lam * a + v)))


def moran_threshold(abar_t, abar_prev, *, tol: float = 1e-12) -> float:
  """The global expansion threshold lambda** (PIFS Eq. 45, Thm. 25) by bisection.

  The unique root of `G(lambda) = prod_t f_t(lambda) = 1` on (1, inf): G is strictly
  increasing, G(1) < 1 (Thm. 17b) and G(inf) = sqrt(abar_first / abar_last) > 1.
  The bracket [1, hi] (hi found by doubling) is halved in a `lax.while_loop` in
  float64 until its width is at most `tol`.

  Args:
    abar_t, abar_prev: `[S]`, the steps of one chain (`chain_steps`).
    tol: absolute width of the final bracket.

  Returns:
    lambda** as a Python float.
  """
  a, ap = _pair(np.atleast_1d(abar_t), np.atleast_1d(abar_prev))
  if a.ndim != 1 or a.shape != ap.shape:
    raise checks.InputError(f"abar_t {a.shape} and abar_prev {ap.shape} must both be [S].")
  if not tol > 0:
    raise checks.InputError(f"tol = {tol}; expected > 0.")
  with jax.enable_x64(True):
    a_j = jnp.asarray(a, jnp.float64)
    ap_j = jnp.asarray(ap, jnp.float64)
    root = _moran_bisect(a_j, ap_j, jnp.float64(tol))
    return float(root)


@jax.jit
def _moran_bisect(a, ap, tol):
  log_g = lambda lam: _log_g_jnp(lam, a, ap)
  # Bracket: G(1) < 1; double hi until G(hi) > 1 (at most 1000 doublings).
  hi = jax.lax.while_loop(lambda h: (log_g(h) <= 0) & (h < 1e300), lambda h: 2.0 * h,
                          jnp.asarray(2.0, a.dtype))

  def body(c):
    lo, hi = c
    mid = 0.5 * (lo + hi)
    up = log_g(mid) > 0
    return jnp.where(up, lo, mid), jnp.where(up, mid, hi)

  def cond(c):
    lo, hi = c
    mid = 0.5 * (lo + hi)
    # Stop at width tol, or when the bracket cannot shrink further in float64.
    return ((hi - lo) > tol) & (mid > lo) & (mid < hi)

  lo, hi = jax.lax.while_loop(cond, body, (jnp.asarray(1.0, a.dtype), hi))
  return 0.5 * (lo + hi)


# -----------------------------------------------------------------------------
# Gaussian attractor: Lyapunov spectrum and Kaplan-Yorke dimension (Thm. 25-26).
# -----------------------------------------------------------------------------


def _check_patches(lambdas, n_k):
  lam = np.atleast_1d(np.asarray(lambdas, dtype=np.float64))
  if lam.ndim != 1 or np.any(lam <= 0):
    raise checks.InputError(f"lambdas has shape {lam.shape} (min {lam.min():.3g}); expected "
                     "positive patch variances [M].")
  n = np.broadcast_to(np.asarray(n_k), lam.shape).astype(np.int64)
  if np.any(n < 1):
    raise checks.InputError("n_k must be >= 1 (the dimension of each patch).")
  return lam, n


def gaussian_ky_dimension(lambdas, n_k, abar_t, abar_prev,
                          lambda_ss: float | None = None) -> dict:
  """Kaplan-Yorke dimension of the Gaussian PIFS attractor (PIFS Thm. 26, Eq. 47).

  Isotropic patches `Sigma_k = lambda_k I_{n_k}`: patch k contributes `n_k` Lyapunov
  exponents `Lambda(lambda_k)`. With `N+ = sum_{lambda_k > lambda**} n_k` and k* the
  contracting patch of largest variance,

      d_KY = N+ + sum_{lambda_k > lambda**} n_k Lambda(lambda_k) / |Lambda(lambda_k*)|

  when condition (46) holds (the cut-off index is exactly N+). When (46) fails the
  theorem gives only the lower bound `N+ + N+ Lambda+ / |Lambda(lambda_k*)|` with
  `Lambda+ = min_{lambda_k > lambda**} Lambda(lambda_k)`; then `value` is that bound
  and `exact` is False. If every patch expands, `d_KY = n` (saturated, Sec. 6.2); if
  none does, `d_KY = 0`.

  Args:
    lambdas: `[M]` patch variances.
    n_k: patch dimensions, int or `[M]`.
    abar_t, abar_prev: `[S]`, the chain.
    lambda_ss: lambda** if already computed.

  `spectrum_value` is Eq. 44 applied directly to the multiset of exponents; it
  equals `value` whenever (46) holds (and is >= it otherwise).

  Returns:
    dict with `value`, `exact` (bool), `spectrum_value`, `n_plus` (N+), `lambda_ss`,
    `exponents` `[M]` (Lambda(lambda_k)) and `condition_46` (bool, or None when it
    does not apply).
  """
  lam, n = _check_patches(lambdas, n_k)
  if lambda_ss is None:
    lambda_ss = moran_threshold(abar_t, abar_prev)
  expo = mean_log_expansion(lam, abar_t, abar_prev)
  expanding = lam > lambda_ss
  contracting = lam < lambda_ss
  n_plus = int(n[expanding].sum())
  out = dict(lambda_ss=float(lambda_ss), exponents=expo, n_plus=n_plus,
             spectrum_value=float(kaplan_yorke_dimension(np.repeat(expo, n))))
  if not expanding.any():
    return dict(out, value=0.0, exact=True, condition_46=None)
  if not contracting.any():
    return dict(out, value=float(n.sum()), exact=True, condition_46=None)
  k_star = np.flatnonzero(contracting)[np.argmax(lam[contracting])]
  lam_minus = abs(expo[k_star])
  mass = float(np.sum(n[expanding] * expo[expanding]))
  cond = mass < lam_minus
  if cond:
    return dict(out, value=n_plus + mass / lam_minus, exact=True, condition_46=True)
  lam_plus = float(expo[expanding].min())
  return dict(out, value=n_plus + n_plus * lam_plus / lam_minus, exact=False,
              condition_46=False)


def kaplan_yorke_dimension(exponents):
  """Kaplan-Yorke dimension d = j* + sum_{i <= j*} l_i / |l_{j*+1}| (PIFS Eq. 44).

  The exponents are sorted in decreasing order; j* is the largest j whose partial
  sum is >= 0 (0 if l_1 < 0, giving d = 0). If all partial sums are >= 0 the result
  is the number of exponents given (for a truncated top-k spectrum that is only a
  lower bound). NumPy input is computed in NumPy (float64), a JAX array in jnp
  (traceable).

  Args:
    exponents: `[k]`.

  Returns:
    d `[]`.
  """
  xp = jnp if isinstance(exponents, jax.Array) else np
  l = xp.asarray(exponents)
  if l.ndim != 1 or l.shape[0] == 0:
    raise checks.InputError(f"exponents has shape {l.shape}; expected a non-empty vector [k].")
  l = xp.sort(l)[::-1]
  cs = xp.cumsum(l)
  j = xp.sum(cs >= 0)  # the non-negative partial sums form a prefix
  k = l.shape[0]
  frac = cs[xp.maximum(j - 1, 0)] / xp.abs(l[xp.minimum(j, k - 1)])
  return xp.where(j == 0, 0.0, xp.where(j == k, float(k), j + frac))


# -----------------------------------------------------------------------------
# Information gain and KY dimension growth (Def. 31, Eq. 54-56).
# -----------------------------------------------------------------------------


def information_gain(lambdas, n_k, abar_t, abar_prev, *, exact: bool = False) -> np.ndarray:
  """Per-step information gain IG_t (PIFS Eq. 55; Eq. 54 with `exact=True`).

  The leading-order form is `IG_t ~ sum_k n_k (log f_t(lambda_k))^2`. The exact form
  is `KL(p_prev || p_t) = sum_k n_k / 2 (e^{2 eps_k} - 1 - 2 eps_k)` with
  `eps_k = log(sigma_prev,k / sigma_t,k)`, `sigma_t,k^2 = abar_t lambda_k + v_t`.

  Args:
    lambdas: `[M]` patch variances; n_k: int or `[M]`.
    abar_t, abar_prev: `[S]`.

  Returns:
    float64 `[S]`.
  """
  lam, n = _check_patches(lambdas, n_k)
  a, ap = _pair(np.atleast_1d(abar_t), np.atleast_1d(abar_prev))
  if exact:
    var_t = lam[:, None] * a + (1.0 - a)
    var_prev = lam[:, None] * ap + (1.0 - ap)
    eps = 0.5 * np.log(var_prev / var_t)
    return np.sum(n[:, None] / 2.0 * np.expm1(2.0 * eps) - n[:, None] * eps, axis=0)
  logf = np.log(expansion_function(lam, a, ap))  # [M, S]
  return np.sum(n[:, None] * logf**2, axis=0)


def ky_dimension_growth(lambdas, n_k, abar_t, abar_prev,
                        lambda_ss: float | None = None) -> np.ndarray:
  """Per-step KY dimension growth Delta d_t (PIFS Eq. 56).

  `Delta d_t ~ sum_{k: lambda_k > lambda**} n_k log f_t(lambda_k)`.

  Returns:
    float64 `[S]`.
  """
  lam, n = _check_patches(lambdas, n_k)
  a, ap = _pair(np.atleast_1d(abar_t), np.atleast_1d(abar_prev))
  if lambda_ss is None:
    lambda_ss = moran_threshold(a, ap)
  keep = lam > lambda_ss
  logf = np.log(expansion_function(lam[keep], a, ap))
  return np.sum(n[keep][:, None] * logf, axis=0)


def _check_num_steps(num_steps) -> int:
  if int(num_steps) != num_steps or num_steps < 1:
    raise checks.InputError(f"num_steps = {num_steps}; expected an integer T >= 1.")
  return int(num_steps)
