"""Image metrics: PSNR and SSIM (dm-pix), the Frechet distance, streaming feature statistics, PRDC.

All take images in [-1, 1] or features `[N, D]` from any extractor (feature_nets.py).
The Frechet distance of Inception-v3 pool3 features is FID (Heusel et al. 2017); on
the features of another network it is reported under that network's name
(`fd_digits`, never "FID"), see `feature_nets.metric_names`.
"""

from __future__ import annotations

import functools
import warnings

import dm_pix as pix
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from jax.sharding import PartitionSpec as P

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import multihost


# ---------------------------------------------------------------------------- PSNR, SSIM


def _check_pair(a, b) -> None:
  checks.check_image(a, "a")
  if np.shape(a) != np.shape(b):
    raise checks.InputError(f"images of shapes {tuple(np.shape(a))} and {tuple(np.shape(b))}; "
                            "PSNR/SSIM compare two batches of the same shape [B, H, W, C].")


def psnr(a, b) -> jax.Array:
  """Per-image PSNR in dB of images a, b: [B, H, W, C] in [-1, 1] (peak = the [0, 1] range).

  10 log10(1 / MSE) of the images mapped to [0, 1] (dm-pix `psnr`).
  """
  _check_pair(a, b)
  return _psnr(jnp.asarray(a), jnp.asarray(b))


@jax.jit
def _psnr(a: jax.Array, b: jax.Array) -> jax.Array:
  return pix.psnr((a + 1.0) / 2.0, (b + 1.0) / 2.0)


def ssim(a, b, filter_size: int = 11) -> jax.Array:
  """Per-image SSIM (Wang et al. 2004) of a, b: [B, H, W, C] in [-1, 1], mapped to [0, 1].

  dm-pix `ssim`: Gaussian window of `filter_size` (sigma 1.5), K1 = 0.01, K2 = 0.03,
  valid filtering, mean over pixels and channels.
  """
  _check_pair(a, b)
  if min(np.shape(a)[1:3]) < filter_size:
    raise checks.InputError(f"images of size {tuple(np.shape(a)[1:3])} are smaller than the SSIM "
                            f"window filter_size={filter_size}; pass a smaller odd filter_size.")
  return _ssim(jnp.asarray(a), jnp.asarray(b), filter_size)


@functools.partial(jax.jit, static_argnums=2)
def _ssim(a: jax.Array, b: jax.Array, filter_size: int) -> jax.Array:
  """One compiled program per (shape, filter_size) (dm-pix's is op by op)."""
  return pix.ssim((a + 1.0) / 2.0, (b + 1.0) / 2.0, filter_size=filter_size)


# ---------------------------------------------------------------------------- Frechet distance


def frechet_distance(mu1, cov1, mu2, cov2) -> float:
  """||mu1 - mu2||^2 + tr C1 + tr C2 - 2 tr (C1 C2)^(1/2) between N(mu1, C1) and N(mu2, C2).

  Heusel et al. 2017 (FID), Dowson & Landau 1982. float64. The trace of the matrix
  square root uses symmetric eigenvalues only: for any factor A A^T = C1 (Cholesky, or
  V W^(1/2) from eigh of C1 when C1 is singular), C1 C2 has the eigenvalues of the
  symmetric PSD A^T C2 A (as it has those of C1^(1/2) C2 C1^(1/2)), so tr (C1 C2)^(1/2)
  is the sum of the square roots of its (clipped non-negative) eigenvalues. This stays
  finite for rank-deficient covariances (fewer samples than dimensions), where `sqrtm`
  of the non-symmetric product needs pytorch-fid's eps retry.

  Args:
    mu1, mu2: [D] means. cov1, cov2: [D, D] covariances.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  cov1, cov2 = np.atleast_2d(np.asarray(cov1, np.float64)), np.atleast_2d(np.asarray(cov2, np.float64))
  for name, mu, cov in (("1", mu1, cov1), ("2", mu2, cov2)):
    if mu.ndim != 1 or cov.shape != (mu.size, mu.size):
      raise checks.InputError(f"mu{name} has shape {mu.shape} and cov{name} {cov.shape}; expected "
                              "a mean [D] and a covariance [D, D].")
    if not (np.isfinite(mu).all() and np.isfinite(cov).all()):
      raise checks.InputError(f"mu{name} or cov{name} holds NaN or inf.")
  if mu1.size != mu2.size:
    raise checks.InputError(f"feature widths differ: {mu1.size} vs {mu2.size}; both statistics "
                            "must come from the same feature extractor.")
  cov1, cov2 = (cov1 + cov1.T) / 2.0, (cov2 + cov2.T) / 2.0
  m = _congruence(cov1, cov2)
  eig = scipy.linalg.eigvalsh((m + m.T) / 2.0, driver="evr") if m.size else np.zeros(0)
  tr_sqrt = float(np.sum(np.sqrt(np.clip(eig, 0.0, None))))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2.0 * tr_sqrt)


def _congruence(cov1: np.ndarray, cov2: np.ndarray) -> np.ndarray:
  """A^T C2 A for a factor A A^T = C1; its eigenvalues are those of C1 C2 (and zeros).

  A is the Cholesky factor when C1 is positive definite (BLAS-3 triangular products),
  else V_+ W_+^(1/2) from the eigendecomposition of C1 restricted to its positive
  eigenvalues (rank-deficient covariances: an r x r problem).
  """
  try:
    a = scipy.linalg.cholesky(cov1, lower=True)
  except np.linalg.LinAlgError:
    w, v = scipy.linalg.eigh(cov1, driver="evd")
    keep = w > 0.0
    a = v[:, keep] * np.sqrt(w[keep])                # [D, r]
    return a.T @ cov2 @ a
  trmm = scipy.linalg.blas.dtrmm
  return trmm(1.0, a, trmm(1.0, a, cov2, side=1, lower=1), side=0, lower=1, trans_a=1)


class FeatureStats:
  """Streaming mean and covariance of features, batch by batch, in float64.

  stats = FeatureStats(); for f in batches: stats.update(f); mu, cov = stats.mean_cov()

  Batches are merged with the pairwise update of Chan et al. (1979) (means and
  centred scatter matrices), so no sample is kept and the result equals the two-pass
  `np.mean` / `np.cov(rowvar=False)` (ddof = 1, as pytorch-fid) up to rounding.
  """

  def __init__(self):
    self.n = 0
    self.mean: np.ndarray | None = None
    self.scatter: np.ndarray | None = None       # sum of centred outer products [D, D]

  @property
  def dim(self) -> int | None:
    return None if self.mean is None else self.mean.size

  def update(self, features) -> "FeatureStats":
    """Adds a batch of features [B, D]."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
      raise checks.InputError(f"features have shape {f.shape}; expected [B, D].")
    if self.mean is not None and f.shape[1] != self.dim:
      raise checks.InputError(f"features of width {f.shape[1]} added to statistics of width "
                              f"{self.dim}; use one feature extractor per FeatureStats.")
    if not np.isfinite(f).all():
      raise checks.InputError("features hold NaN or inf.")
    nb = f.shape[0]
    if nb == 0:
      return self
    mean_b = f.mean(0)
    centred = f - mean_b
    scatter_b = centred.T @ centred
    if self.mean is None:
      self.n, self.mean, self.scatter = nb, mean_b, scatter_b
      return self
    n = self.n + nb
    delta = mean_b - self.mean
    self.scatter = self.scatter + scatter_b + np.outer(delta, delta) * (self.n * nb / n)
    self.mean = self.mean + delta * (nb / n)
    self.n = n
    return self

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    """(mean [D], covariance [D, D]); warns when fewer samples than dimensions + 1."""
    if self.n < 2:
      raise checks.InputError(f"feature statistics of {self.n} sample(s); a covariance needs at "
                              "least 2.")
    if self.n - 1 < self.dim:
      warnings.warn(f"{self.n} samples of {self.dim}-d features: the covariance has rank at "
                    f"most {self.n - 1} < {self.dim} (rank deficient); the Frechet distance "
                    "stays finite but is biased, compare it only at equal sample counts.",
                    RuntimeWarning, stacklevel=2)
    return self.mean.copy(), self.scatter / (self.n - 1)


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
  """(mean, covariance) of features [N, D] in float64 (one `FeatureStats` batch)."""
  return FeatureStats().update(features).mean_cov()


# ---------------------------------------------------------------------------- PRDC


def _sq_dists(a: jax.Array, b: jax.Array) -> jax.Array:
  """Squared Euclidean distances [n, m] (full float32 matmul precision on every backend)."""
  ab = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(jnp.sum(a * a, 1)[:, None] + jnp.sum(b * b, 1)[None, :] - 2.0 * ab, 0.0)


def _kth_nn_rows(row_blocks: jax.Array, starts: jax.Array, x: jax.Array, k: int) -> jax.Array:
  """Squared distance of each row to its k-th nearest neighbour in x [N, D] (itself excluded).

  row_blocks [nb, block, D] are rows of x (zero padding past its end) whose global
  indices start at `starts` [nb]; a block at a time against all of x. Returns [nb * block].
  """
  n, block = x.shape[0], row_blocks.shape[1]

  def one(args):
    rows, start = args
    d = _sq_dists(rows, x)
    self_col = (start + jnp.arange(block))[:, None] == jnp.arange(n)[None, :]
    d = jnp.where(self_col, jnp.inf, d)
    return -jax.lax.top_k(-d, k)[0][:, k - 1]

  return jax.lax.map(one, (row_blocks, starts)).reshape(-1)


def _real_fake_pass(real_blocks: jax.Array, r2_blocks: jax.Array, fake: jax.Array,
                    fake_r2: jax.Array, axes: tuple[str, ...] = ()):
  """One pass over the real-fake distances, a block of real rows at a time.

  Per real row (recall, coverage) directly; per fake point (precision, density) as a
  running count of the real balls holding it. Padded real rows carry radius -inf: they
  hold nothing. Returns (count [nf], in_fake [nb * block], covered [nb * block]).
  axes: inside shard_map, the mesh axes the rows are split over (the count then differs
  per device until it is summed).
  """
  count = jnp.zeros((fake.shape[0],), jnp.int32)
  if axes:
    count = jax.lax.pcast(count, axes, to="varying")

  def real_block(count, args):
    rows, r2 = args
    d = _sq_dists(rows, fake)                                  # [block, nf]
    count = count + jnp.sum(d < r2[:, None], 0, dtype=jnp.int32)
    return count, (jnp.any(d < fake_r2[None, :], 1), jnp.min(d, 1) < r2)

  count, (in_fake, covered) = jax.lax.scan(real_block, count, (real_blocks, r2_blocks))
  return count, in_fake.reshape(-1), covered.reshape(-1)


def _row_blocks(x: jax.Array, block: int, shards: int):
  """(x as [nb, block, D] zero-padded blocks, their start rows [nb]); nb a multiple of shards."""
  nb = -(-x.shape[0] // block)
  nb = -(-nb // shards) * shards
  blocks = jnp.pad(x, ((0, nb * block - x.shape[0]), (0, 0))).reshape(nb, block, x.shape[1])
  return blocks, jnp.arange(nb) * block


@functools.partial(jax.jit, static_argnames=("k", "block", "mesh"))
def _prdc(real: jax.Array, fake: jax.Array, k: int, block: int, mesh=None):
  """Per-sample PRDC counts (see `prdc_per_sample`); with a mesh, the row blocks are split
  over all its devices.

  The sharded program is the single-device one per shard: each device takes its share
  of the (padded) row blocks against the replicated other set (shard_map); the per-fake
  counts are summed over devices (psum), the per-real flags stay sharded.
  """
  centre = jnp.mean(real, 0)                 # distances are shift invariant; centring helps float32
  real, fake = real - centre, fake - centre
  nr, nf = real.shape[0], fake.shape[0]
  shards = 1 if mesh is None else mesh.size
  real_blocks, real_starts = _row_blocks(real, block, shards)
  fake_blocks, fake_starts = _row_blocks(fake, block, shards)
  kth = functools.partial(_kth_nn_rows, k=k)
  rows_pass = _real_fake_pass
  if mesh is not None:
    rows = P(tuple(mesh.axis_names))         # the block axis over every device of the mesh
    kth = jax.shard_map(kth, mesh=mesh, in_specs=(rows, rows, P()), out_specs=rows)

    def summed_pass(*args):
      axes = tuple(mesh.axis_names)
      count, in_fake, covered = _real_fake_pass(*args, axes=axes)
      return jax.lax.psum(count, axes), in_fake, covered

    rows_pass = jax.shard_map(summed_pass, mesh=mesh, in_specs=(rows, rows, P(), P()),
                              out_specs=(P(), rows, rows))
  real_r2 = kth(real_blocks, real_starts, real)          # [padded nr]
  fake_r2 = kth(fake_blocks, fake_starts, fake)[:nf]
  real_r2 = jnp.where(jnp.arange(real_r2.shape[0]) < nr, real_r2, -jnp.inf)
  count, in_fake, covered = rows_pass(real_blocks, real_r2.reshape(real_blocks.shape[:2]), fake,
                                      fake_r2)
  return {"real_balls": count, "in_fake": in_fake[:nr], "covered": covered[:nr]}


def prdc(real_features, fake_features, k: int = 5, block: int = 1024,
         mesh: jax.sharding.Mesh | None = None) -> dict:
  """Precision, recall, density and coverage (Naeem et al. 2020; see `prdc_per_sample`).

  Returns {"precision", "recall", "density", "coverage"} as floats: the means over the
  fake points (precision, density) and over the real points (recall, coverage) of
  `prdc_per_sample`'s values.
  """
  return prdc_means(prdc_per_sample(real_features, fake_features, k, block, mesh), k)


def prdc_values(per_sample: dict, k: int) -> dict[str, np.ndarray]:
  """The per-point values (float64) whose means are PRDC, from `prdc_per_sample`'s arrays
  (computed with the same k): precision and density per fake point, recall and coverage
  per real point."""
  balls = np.asarray(per_sample["real_balls"])
  return {"precision": (balls > 0).astype(np.float64), "recall":
          np.asarray(per_sample["in_fake"], np.float64), "density": balls / k,
          "coverage": np.asarray(per_sample["covered"], np.float64)}


def prdc_means(per_sample: dict, k: int) -> dict:
  """PRDC as floats: the means of `prdc_values`, the density summed as integers first (the
  value does not depend on the order of a float sum)."""
  out = {m: float(np.mean(v)) for m, v in prdc_values(per_sample, k).items()}
  balls = np.asarray(per_sample["real_balls"])
  out["density"] = float(np.sum(balls)) / (k * len(balls))
  return out


def prdc_per_sample(real_features, fake_features, k: int = 5, block: int = 1024,
                    mesh: jax.sharding.Mesh | None = None) -> dict:
  """Precision, recall, density and coverage (Naeem et al. 2020, Eq. 1-4 with Kynkaanniemi et al.).

  With B_k(x) the ball around x whose radius is the distance to its k-th nearest
  neighbour in its own set (itself excluded), and all comparisons strict (<):
    precision = share of fake points inside some real ball,
    recall    = share of real points inside some fake ball,
    density   = (1 / k) mean over fake points of the number of real balls holding it,
    coverage  = share of real points whose ball holds some fake point.
  Distances are computed in float32 on the default device, `block` rows at a time, so
  10k x 10k sets of 2048-d features never hold a full distance matrix.

  With a mesh (built by the caller, e.g. `training.sharding.sampling_mesh()`), the row
  blocks are split over all of its devices (each device: its rows against the whole other
  set); the block is then at most ceil(rows / devices), and the rows are zero-padded to a
  whole number of blocks per device (padded rows are dropped), so any set size works on
  any mesh. The counts equal the single-device ones unless two distances tie to within
  float32 rounding (the per-block matrix products may round differently).

  Args:
    real_features: [N, D]. fake_features: [M, D]. k: neighbours (k < N and k < M).
    block: rows per distance block. mesh: a jax.sharding.Mesh, or None (default device).
  Returns numpy arrays, each metric the mean of one of them:
    real_balls [M] int: the number of real balls holding each fake point (precision: the
      share > 0; density: the mean / k);
    in_fake [N] bool: each real point inside some fake ball (recall);
    covered [N] bool: each real point's ball holding some fake point (coverage).
  Per-point values make bootstrap intervals conditional on the other set: precision and
  density resample the fake points with the real balls fixed, recall and coverage the
  real points with the fake points (and both sets' radii) fixed.
  """
  real, fake = np.asarray(real_features), np.asarray(fake_features)
  for name, f in (("real_features", real), ("fake_features", fake)):
    if f.ndim != 2:
      raise checks.InputError(f"{name} has shape {f.shape}; expected [N, D].")
    if not np.isfinite(f).all():
      raise checks.InputError(f"{name} holds NaN or inf.")
  if real.shape[1] != fake.shape[1]:
    raise checks.InputError(f"feature widths differ: real {real.shape[1]} vs fake {fake.shape[1]}; "
                            "both sets must come from the same feature extractor.")
  k = checks.check_positive_int(k, "k")
  block = checks.check_positive_int(block, "block")
  n_min = min(real.shape[0], fake.shape[0])
  if k >= n_min:
    raise checks.InputError(f"k={k} nearest neighbours need more than k samples in each set; got "
                            f"{real.shape[0]} real and {fake.shape[0]} fake.")
  if mesh is not None and not isinstance(mesh, jax.sharding.Mesh):
    raise checks.InputError(f"mesh={mesh!r}; expected a jax.sharding.Mesh (runtime/sharding.py "
                            "builds one) or None.")
  shards = 1 if mesh is None else mesh.size
  block = min(block, -(-max(real.shape[0], fake.shape[0]) // shards))
  out = multihost.gather(_prdc(jnp.asarray(real, jnp.float32), jnp.asarray(fake, jnp.float32),
                              k=k, block=block, mesh=mesh))
  return {name: np.asarray(v) for name, v in out.items()}
