"""Benchmark: cost of the Jacobian tools relative to one forward pass (not a test).

  python -m experiments.benchmarks.bench_jacobian --out=results/jacobian/bench_jacobian.json

The map is a DDIM step Phi_t (PIFS Eq. 4) of a rectified-flow network seen as a VP
epsilon-predictor (`velocity_to_eps`). The network is the project's default UNet
(configs/default.py: the digits model, randomly initialised; `out_channels` set
to the image's channels for 32x32x3 and 64x64x3), or, if `asyncpatch_jax.models`
is missing, `TinyUNet` below (residual conv blocks with GroupNorm, one down/up
level with a skip connection; about 0.26M parameters). Sizes: the default digits
model (16x16x1), 32x32x3 and 64x64x3, each with M = 16 patches (patch = H / 4).

Measured side by side, medians of repeats, everything jitted and warmed up:
  * forward: one Phi_t evaluation of one image;
  * power step: one power-iteration step of `spectral_norm` (JVP + VJP);
  * block power step: one step of all M^2 = 256 block power iterations as one
    vmapped batch (in vmapped chunks of `jacobian.auto_batch_size` on CPU), and
    the same step looping over the 256 blocks in Python (one jitted call per
    block, sharing one linearisation);
  * materialise: J by vmapped JVPs (+ the 256 block top singular values), i.e. block_norms
    method="exact"; at 64x64x3 512 of the n JVPs and 16 of the 256 block
    eigensolves are timed and scaled up;
  * Lyapunov (default model, a 5-step DDIM chain): one subspace iteration with
    k = 64 vectors vmapped, and looping over the 64 vectors in Python.
The counted cost (`jacobian.block_norm_costs`, XLA flops) is reported beside the
times, with the automatic choice, and the counted crossover size where
materialising J becomes cheaper than power iteration. `--tiny`: the UNet at tiny widths,
8x8x1 only, 2 tangent vectors, one repeat.
"""

from __future__ import annotations

import dataclasses
import time

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.analysis import jacobian_norms as jn
from asyncpatch_jax.analysis import norm_method as nm
from asyncpatch_jax.analysis import lyapunov as ly
from asyncpatch_jax.analysis import pifs
from asyncpatch_jax.analysis import ddim_maps
from asyncpatch_jax.runtime import checks
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_string("sizes", "16x16x1,32x32x3,64x64x3", "Image sizes HxWxC (M = 16 patches).")
flags.DEFINE_integer("num_iters", 20, "Power iterations assumed by the counted cost.")
flags.DEFINE_integer("repeats", 3, "Timing repeats (median).")
flags.DEFINE_integer("features", 32, "TinyUNet base width.")
flags.DEFINE_integer("seed", 0, "PRNG seed.")
flags.DEFINE_integer("lyapunov_vectors", 64, "Tangent vectors k of the Lyapunov benchmark.")
flags.DEFINE_list("crossover_sizes", ["8", "12", "16", "20", "24", "28", "32", "40", "48", "56",
                                      "64"], "Square sizes (C = 3) of the counted crossover.")
common.define_tiny(dict(sizes="8x8x1", num_iters=3, repeats=1, lyapunov_vectors=2,
                        crossover_sizes=["8"]))


# ----------------------------------------------------------------------------- model


def _time_features(t, dim=16):
  freqs = jnp.exp(jnp.linspace(0.0, jnp.log(1000.0), dim // 2))
  ang = t[..., None] * freqs
  return jnp.concatenate([jnp.sin(ang), jnp.cos(ang)], axis=-1)


class ResBlock(nn.Module):
  features: int

  @nn.compact
  def __call__(self, h, temb):
    skip = h if h.shape[-1] == self.features else nn.Dense(self.features)(h)
    h = nn.Conv(self.features, (3, 3))(nn.swish(nn.GroupNorm(8)(h)))
    h = h + nn.Dense(self.features)(temb)
    h = nn.Conv(self.features, (3, 3))(nn.swish(nn.GroupNorm(8)(h)))
    return h + skip


class TinyUNet(nn.Module):
  """v_hat(z, t_map): z [B, H, W, C], t_map [B, H, W] -> [B, H, W, C]."""
  features: int = 32

  @nn.compact
  def __call__(self, z, t_map):
    f = self.features
    temb = nn.swish(nn.Dense(f)(_time_features(t_map)))  # [B, H, W, f]
    h = nn.Conv(f, (3, 3))(z)
    h = ResBlock(f)(h, temb)
    skip = h
    h = nn.Conv(2 * f, (3, 3), strides=2)(h)
    b, hh, ww, _ = temb.shape
    temb2 = temb.reshape(b, hh // 2, 2, ww // 2, 2, f).mean(axis=(2, 4))
    h = ResBlock(2 * f)(h, temb2)
    h = ResBlock(2 * f)(h, temb2)
    h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)  # nearest upsampling
    h = nn.Conv(f, (3, 3))(jnp.concatenate([h, skip], -1))
    h = ResBlock(f)(h, temb)
    return nn.Conv(z.shape[-1], (3, 3))(nn.swish(nn.GroupNorm(8)(h)))


@dataclasses.dataclass(frozen=True)
class ModuleApply:
  """`(params, z, t_map) -> module.apply(...)`, hashable by the module's fields so a
  `Partial(ModuleApply(module), params)` reuses compilations across parameter values."""
  module: nn.Module

  def __call__(self, params, z, t_map):
    return self.module.apply({"params": params}, z, t_map)


def _project_velocity_model(shape, key):
  """(velocity_fn, name, num_params) of the project's default UNet, or None.

  The default config (configs/default.py, the digits model) with `out_channels`
  set to the image's channels; None (TinyUNet stands in) while
  `asyncpatch_jax.models` or the config are missing.
  """
  try:
    from asyncpatch_jax import models  # pylint: disable=import-outside-toplevel
    cfg = common.load_config("default").model
  except (ImportError, checks.InputError):
    return None
  with cfg.unlocked():
    cfg.out_channels = shape[-1]
    if FLAGS.tiny:                                       # the same code, compiled in seconds
      cfg.update(common.TINY_UNET)
  model = models.build_model(cfg)
  params = models.init_params(model, key, shape)
  nparams = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  name = "UNet(configs/default.py" + (", tiny widths)" if FLAGS.tiny else ")")
  return jax.tree_util.Partial(models.NullLabelVelocity(model), params), name, nparams


def velocity_model(shape, key):
  found = _project_velocity_model(shape, key)
  if found is not None:
    return found
  module = TinyUNet(FLAGS.features)
  z = jnp.zeros((1,) + shape)
  params = module.init(key, z, jnp.zeros(z.shape[:3]))["params"]
  nparams = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(params))
  return jax.tree_util.Partial(ModuleApply(module), params), f"TinyUNet({FLAGS.features})", nparams


# ----------------------------------------------------------------------------- timing


def timeit(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def block_loop_step(jvp_lin, vjp_lin, x, v0, patch_size):
  """All M^2 blocks, one Python call per block (same linearisation)."""
  m = v0.shape[0]
  shape = x.shape
  step = _block_step_fn(shape, patch_size, m)
  out = []
  for k in range(m):
    for j in range(m):
      out.append(step(jvp_lin, vjp_lin, v0[k, j], k, j))
  return out


_BLOCK_STEP_CACHE = {}


def _block_step_fn(shape, patch_size, m):
  key = (shape, patch_size, m)
  if key not in _BLOCK_STEP_CACHE:
    from asyncpatch_jax.analysis.patch_stats import patchify, unpatchify  # pylint: disable=import-outside-toplevel

    def step(jvp_lin, vjp_lin, v, k, j):
      eye = jnp.eye(m, dtype=v.dtype)
      tangent = unpatchify(eye[j][:, None] * v[None], shape, patch_size)
      w = patchify(jvp_lin(tangent), patch_size)[k]
      u = w / jnp.maximum(jnp.linalg.norm(w), 1e-30)
      g = patchify(vjp_lin(unpatchify(eye[k][:, None] * u[None], shape, patch_size))[0],
                   patch_size)[j]
      return g / jnp.maximum(jnp.linalg.norm(g), 1e-30), jnp.linalg.norm(g)

    _BLOCK_STEP_CACHE[key] = jax.jit(step)
  return _BLOCK_STEP_CACHE[key]


def bench_size(shape, key, num_iters, repeats):
  h, w, c = shape
  patch = h // 4
  vel, name, nparams = velocity_model(shape, key)
  abar = pifs.cosine_schedule(1000, 0.0)
  phi = ddim_maps.ddim_step(ddim_maps.velocity_to_eps(vel, per_image_time=True), abar[500], abar[480])
  x = jax.random.normal(jax.random.fold_in(key, 1), shape)
  n = x.size
  m = 16
  nk = n // m
  res = {"shape": list(shape), "patch_size": patch, "model": name, "params": nparams}

  fwd = jax.jit(lambda f, z: f(z))
  t_fwd = timeit(fwd, phi, x, repeats=repeats)
  res["forward_s"] = t_fwd

  # Global power iteration: per-step time from two iteration counts (tol < 0: no early stop).
  v0 = jax.random.normal(key, shape)
  neg = jnp.asarray(-1.0)
  k_lo, k_hi = 2, 12
  t_lo = timeit(lambda: jn._power_core(phi, x, v0, neg, k_lo), repeats=repeats)  # pylint: disable=protected-access
  t_hi = timeit(lambda: jn._power_core(phi, x, v0, neg, k_hi), repeats=repeats)  # pylint: disable=protected-access
  res["power_step_s"] = (t_hi - t_lo) / (k_hi - k_lo)
  res["power_step_over_forward"] = res["power_step_s"] / t_fwd

  # Block power iteration, vmapped over the 256 blocks.
  vb = jax.random.normal(key, (m, m, nk))
  b_lo, b_hi = 1, 3
  bs = jn.auto_batch_size(n, m * m)
  res["block_batch_size"] = bs
  core = jn._block_power_core  # pylint: disable=protected-access
  tb_lo = timeit(lambda: core(phi, x, vb, neg, patch, b_lo, bs), repeats=repeats)
  tb_hi = timeit(lambda: core(phi, x, vb, neg, patch, b_hi, bs), repeats=repeats)
  block_step = max((tb_hi - tb_lo) / (b_hi - b_lo), 1e-9)
  res["block_power_step_s"] = block_step
  res["block_power_step_over_forward"] = block_step / t_fwd
  res["block_power_total_s"] = tb_lo + (num_iters - b_lo) * block_step

  # Python loop over the blocks (same per-block work, one jitted call per block).
  jvp_lin, vjp_lin = nm.linearized_partials(phi, x)  # pylint: disable=protected-access
  t_loop = timeit(lambda: block_loop_step(jvp_lin, vjp_lin, x, vb, patch), repeats=1)
  res["block_loop_step_s"] = t_loop
  res["block_vmap_speedup"] = t_loop / block_step

  # Materialise J (+ block SVDs).
  costs = nm.block_norm_costs(phi, x, patch_size=patch, num_iters=num_iters)
  res["counted"] = {k: (float(v) if isinstance(v, (int, float)) else v)
                    for k, v in costs._asdict().items()}
  res["counted"]["power_over_forward"] = costs.power / costs.forward
  res["counted"]["exact_over_forward"] = costs.exact / costs.forward
  ebs = jn.auto_batch_size(n, n)
  res["exact_batch_size"] = ebs
  if n <= 4096:
    t_exact = timeit(lambda: jn._block_exact(phi, x, patch, ebs), repeats=1)  # pylint: disable=protected-access
    res["exact_s"] = t_exact
    res["exact_measured"] = "full"
  else:
    cols = jax.jit(lambda lin, idx: jax.lax.map(
        lambda i: lin(jax.nn.one_hot(i, n).reshape(shape)), idx, batch_size=ebs))
    t_chunk = timeit(cols, jvp_lin, jnp.arange(512), repeats=repeats)
    blocks = np.asarray(jax.random.normal(key, (16, nk, nk)))
    t_eig = timeit(lambda b: np.linalg.eigvalsh(
        np.einsum("kab,kac->kbc", b, b).astype(np.float64)), blocks, repeats=1)
    res["exact_s"] = t_chunk * n / 512 + t_eig * m * m / 16
    res["exact_measured"] = "extrapolated: 512 JVPs x n/512 + 16 block eigensolves x 16"
  res["exact_over_forward"] = res["exact_s"] / t_fwd
  res["power_total_over_forward"] = res["block_power_total_s"] / t_fwd
  res["auto_choice"] = costs.choice
  res["faster_measured"] = "power" if res["block_power_total_s"] < res["exact_s"] else "exact"
  return res


def bench_lyapunov(shape, key, repeats, k=64):
  vel, _, _ = velocity_model(shape, key)
  abar = pifs.cosine_schedule(1000, 0.0)
  chain = ddim_maps.ddim_chain_fn(ddim_maps.velocity_to_eps(vel, per_image_time=True), abar,
                           pifs.ddim_chain(1000, 200))
  x = jax.random.normal(key, shape)
  q0 = jax.random.normal(key, (k,) + shape)
  neg = jnp.asarray(-1.0)
  core = ly._subspace_core  # pylint: disable=protected-access
  t1 = timeit(lambda: core(chain, x, q0, neg, 1, len(chain)), repeats=repeats)
  t3 = timeit(lambda: core(chain, x, q0, neg, 3, len(chain)), repeats=repeats)
  t_vmap = (t3 - t1) / 2

  _, jvp = jax.linearize(chain, x)
  transpose = jax.linear_transpose(jvp, x)
  jvp1 = jax.jit(lambda lin, v: lin(v))
  vjp1 = jax.jit(lambda lin, u: lin(u)[0])
  qr = jax.jit(lambda v: ly._orthonormal_rows(v))  # pylint: disable=protected-access

  def loop_iter(q):
    p = qr(jnp.stack([jvp1(jvp, q[i]) for i in range(k)]))
    return qr(jnp.stack([vjp1(transpose, p[i]) for i in range(k)]))

  t_loop = timeit(loop_iter, q0, repeats=repeats)
  fwd = timeit(jax.jit(lambda c, z: c(z)), chain, x, repeats=repeats)
  return {"shape": list(shape), "num_vectors": k, "chain_steps": len(chain),
          "chain_forward_s": fwd, "vmapped_iter_s": t_vmap, "loop_iter_s": t_loop,
          "speedup": t_loop / t_vmap}


def counted_crossover(key, num_iters):
  """Counted power vs exact cost over square sizes (C = 3, M = 16)."""
  rows = []
  for hw in (int(v) for v in FLAGS.crossover_sizes):
    shape = (hw, hw, 3)
    vel, _, _ = velocity_model(shape, key)
    abar = pifs.cosine_schedule(1000, 0.0)
    phi = ddim_maps.ddim_step(ddim_maps.velocity_to_eps(vel, per_image_time=True), abar[500], abar[480])
    c = nm.block_norm_costs(phi, jnp.zeros(shape), patch_size=hw // 4, num_iters=num_iters,
                             max_exact_bytes=2**40)
    rows.append({"size": hw, "n": hw * hw * 3, "power_over_forward": c.power / c.forward,
                 "exact_over_forward": c.exact / c.forward, "choice": c.choice})
  return rows


def main(argv):
  del argv
  key = jax.random.key(FLAGS.seed)
  sizes = [tuple(int(v) for v in s.split("x")) for s in FLAGS.sizes.split(",")]
  out = {"device": str(jax.devices()[0]), "num_iters": FLAGS.num_iters, "sizes": []}
  for shape in sizes:
    t0 = time.time()
    r = bench_size(shape, key, FLAGS.num_iters, FLAGS.repeats)
    r["bench_wall_s"] = time.time() - t0
    out["sizes"].append(r)
    print(f"{shape}: forward {r['forward_s'] * 1e3:.2f} ms | power step "
          f"{r['power_step_over_forward']:.2f}x fwd | block step (256 blocks) vmapped "
          f"{r['block_power_step_over_forward']:.1f}x fwd, loop {r['block_loop_step_s']:.3f}s "
          f"-> {r['block_vmap_speedup']:.1f}x | total power({FLAGS.num_iters}) "
          f"{r['power_total_over_forward']:.0f}x fwd vs exact {r['exact_over_forward']:.0f}x fwd "
          f"({r['exact_measured']}) | counted power {r['counted']['power_over_forward']:.0f}x, "
          f"exact {r['counted']['exact_over_forward']:.0f}x -> auto {r['auto_choice']}, "
          f"measured faster {r['faster_measured']}  [{r['bench_wall_s']:.0f}s]", flush=True)
  t0 = time.time()
  out["lyapunov"] = bench_lyapunov(sizes[0], key, FLAGS.repeats, FLAGS.lyapunov_vectors)
  lyap = out["lyapunov"]
  print(f"Lyapunov k={FLAGS.lyapunov_vectors} on {sizes[0]}: vmapped {lyap['vmapped_iter_s']:.3f}s/iter, loop "
        f"{lyap['loop_iter_s']:.3f}s/iter -> {lyap['speedup']:.1f}x [{time.time() - t0:.0f}s]")
  out["counted_crossover"] = counted_crossover(key, FLAGS.num_iters)
  cross = [r["size"] for r in out["counted_crossover"] if r["choice"] == "exact"]
  out["crossover_largest_exact_size"] = max(cross) if cross else None
  print("counted: materialising J is cheaper up to HxWx3 =",
        out["crossover_largest_exact_size"], [(r["size"], r["choice"]) for r in out["counted_crossover"]])
  checks = {
      "power_step_le_3.5x_forward": all(r["power_step_over_forward"] <= 3.5 for r in out["sizes"]),
      "block_vmap_ge_4x_loop_M16": all(r["block_vmap_speedup"] >= 4 for r in out["sizes"]),
      "auto_power_never_slower_than_exact": all(
          r["auto_choice"] == "exact" or r["block_power_total_s"] <= r["exact_s"]
          for r in out["sizes"]),
      "lyapunov_vmap_ge_3x_loop": lyap["speedup"] >= 3,
  }
  out["checks"] = checks
  print("checks:", checks)
  if FLAGS.out:
    common.write_json(FLAGS.out, out, indent=1)
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  common.run(main)
