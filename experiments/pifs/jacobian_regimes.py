"""PIFS paper, Section 7 protocol on a model: regimes of the DDIM chain's Jacobian.

  python -m experiments.pifs.jacobian_regimes --out=results/jacobian/regimes_empirical.json
  python -m experiments.pifs.jacobian_regimes --workdir=/tmp/asyncpatch_default \\
      --out=results/jacobian/regimes_trained.json        # a trained model

The model is an epsilon-predictor in the VP convention. With `--workdir` it is the
rectified-flow model trained there (`load_velocity_fn`, converted by
`pifs_operators.velocity_to_eps`); without it a stand-in chosen by `--model`:
  empirical    the exact (Bayes-optimal) denoiser of the digits training set,
               eps*(x) = (x - sqrt(abar) E[x0 | x]) / sqrt(v) with E[x0 | x] the
               softmax-weighted mean of the 1438 training images (default);
  gaussian     the exact denoiser of the Gaussian fit N(mean, Sigma) of the digits
               (the project's `gaussian.GaussianVelocity` through `velocity_to_eps`);
  unet_random  the project's default UNet at random initialisation (architecture
               and cost only; its numbers mean nothing).
Data: the embedded digits (16x16x1), patches of 4x4 (M = 16, n_k = 16), patch
covariances from the training split. Chain: 50-step DDIM {0, 20, ..., 1000} on the
cosine s = 0 schedule (`--stride`, `--schedule`).

Measured along `--num_seeds` generated trajectories at every DDIM step t:
  * global norm kappa_t = ||J Phi_t|| (power iteration; Table 4);
  * all block norms ||[J Phi_t]_kj|| (`block_norms`, exact/power by counted cost) ->
    kappa_diag, delta_cross, kappa_pc, per-patch (PC) slack (Sec. 7.4-7.5, Tables 5, 8);
  * Rayleigh quotients kappa^diag_k,t = <v_k, [J Phi_t]_kk v_k> and the suppression
    S_k,t = f_t(lambda_k) - kappa^diag_k,t (Eq. 30-32) -> Spearman rho(lambda_k,
    kappa^diag) and rho(lambda_k, S) per step (Tables 9 and 3);
  * suppression-corrected exponents (Sec. 7.7): Lambda_eff,k = (1/T) sum_t E log g_k,t,
    g = f_t(lambda_k) - S_k,t with S on forward-noised data x_t ~ q(x_t), against the
    trajectory estimate (1/T) sum_t log |kappa^diag_k,t|, the Gaussian Lambda(lambda_k),
    and the top of the chain's Lyapunov spectrum (`lyapunov_spectrum`).
Writes the JSON and a PNG of the same name beside it. Reduced defaults finish in a few
minutes on a 2-core CPU; `--tiny` (one seed, a 5-step chain, 3 iterations; `unet_random` at
tiny widths) in seconds.
"""

from __future__ import annotations

import json
import os
import time

from absl import flags
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import scipy.stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from asyncpatch_jax import models  # noqa: E402
from asyncpatch_jax.analysis import jacobian_norms as jn  # noqa: E402
from asyncpatch_jax.analysis import norm_method as nm  # noqa: E402
from asyncpatch_jax.analysis import regimes as rg  # noqa: E402
from asyncpatch_jax.analysis import lyapunov as ly  # noqa: E402
from asyncpatch_jax.analysis import pifs  # noqa: E402
from asyncpatch_jax.analysis import ddim_maps  # noqa: E402
from asyncpatch_jax.analysis.patch_stats import patch_covariance_spectra  # noqa: E402
from experiments import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path; a PNG of the same name goes beside it.")
flags.DEFINE_string("workdir", None, "Workdir of a trained model (see load_velocity_fn).")
flags.DEFINE_enum("model", "empirical", ["empirical", "gaussian", "unet_random"],
                  "Stand-in model when --workdir is not given.")
flags.DEFINE_string("dataset", "digits", "Embedded dataset for the patch covariances.")
flags.DEFINE_integer("patch_size", 4, "Patch size p (M = H W / p^2).")
flags.DEFINE_enum("schedule", "cosine_s0", ["cosine_s0", "cosine_s0.008", "linear"],
                  "VP schedule of the analysis (T = 1000).")
flags.DEFINE_integer("stride", 20, "DDIM stride: chain {0, stride, ..., 1000}.")
flags.DEFINE_integer("num_seeds", 4, "Generated trajectories.")
flags.DEFINE_integer("q_samples", 4, "Forward-noised data points per step for Lambda_eff.")
flags.DEFINE_integer("power_iters", 50, "Power iterations for the global norm.")
flags.DEFINE_integer("block_iters", 30, "Power iterations per block (if not exact).")
flags.DEFINE_integer("lyap_vectors", 8, "Top Lyapunov exponents of the chain.")
flags.DEFINE_integer("lyap_iters", 20, "Subspace iterations for the Lyapunov spectrum.")
flags.DEFINE_integer("seed", 0, "Root PRNG seed.")
common.define_tiny(dict(num_seeds=1, stride=250, power_iters=3, block_iters=3, lyap_vectors=2,
                        lyap_iters=2, q_samples=1))

PAPER_TABLE4_STEPS = (980, 900, 800, 600, 400, 300, 200, 20)


# ----------------------------------------------------------------------------- models


def load_velocity_fn(workdir: str):
  """(velocity_fn, image_shape, description) of the model trained in `workdir`.

  The only place here that knows the training system (`common.load_run`: the newest
  checkpoint, EMA parameters), as `Partial(models.NullLabelVelocity(model), ema_params)`:
  `velocity_fn(z [B, H, W, C], t [B] or [B, H, W]) -> v_hat`, the unconditional
  (null-label) prediction.
  """
  run = common.load_run(workdir)
  text = (f"trained UNet ({workdir}, step {run.step}, EMA, {run.config.data.dataset}, "
          "null label)")
  return (jax.tree_util.Partial(models.NullLabelVelocity(run.model), run.params),
          run.image_shape, text)


def _empirical_eps(images, x, abar):
  """Exact E[eps | x] for data uniform on `images` [N, n] (VP state x)."""
  shape = x.shape
  n = images.shape[1]
  xf = x.reshape(shape[:-3] + (n,))
  a = jnp.asarray(abar, x.dtype)
  v = 1.0 - a
  d2 = (jnp.sum(xf**2, -1, keepdims=True) - 2 * jnp.sqrt(a) * xf @ images.T
        + a * jnp.sum(images**2, -1))
  w = jax.nn.softmax(-d2 / (2 * v), axis=-1)
  x0 = w @ images
  return ((xf - jnp.sqrt(a) * x0) / jnp.sqrt(v)).reshape(shape)


def build_eps_fn(images, key):
  """(eps_fn, description) for the flags."""
  shape = images.shape[1:]
  if FLAGS.workdir:
    vel, shape_w, text = load_velocity_fn(FLAGS.workdir)
    if tuple(shape_w) != tuple(shape):
      raise ValueError(f"the model in {FLAGS.workdir} takes {shape_w}, the data is {shape}.")
    return ddim_maps.velocity_to_eps(vel, per_image_time=True), text
  if FLAGS.model == "empirical":
    flat = jnp.asarray(images.reshape(len(images), -1))
    return (jax.tree_util.Partial(_empirical_eps, flat),
            f"exact denoiser of the {len(images)} training images (stand-in)")
  if FLAGS.model == "gaussian":
    from asyncpatch_jax.diffusion import gaussian  # pylint: disable=import-outside-toplevel
    flat = images.reshape(len(images), -1).astype(np.float64)
    cov = np.cov(flat.T) + 1e-3 * np.eye(flat.shape[1])
    vel = gaussian.GaussianVelocity(flat.mean(0).reshape(shape), cov)
    return ddim_maps.velocity_to_eps(vel), "exact denoiser of the Gaussian fit (stand-in)"
  from asyncpatch_jax.config import base_config  # pylint: disable=import-outside-toplevel
  cfg = base_config.get_base_config().model
  with cfg.unlocked():
    cfg.out_channels = shape[-1]
    if FLAGS.tiny:                                       # the same code, compiled in seconds
      cfg.update(common.TINY_UNET)
  model = models.build_model(cfg)
  params = models.init_params(model, key, shape)
  return (ddim_maps.velocity_to_eps(jax.tree_util.Partial(models.NullLabelVelocity(model), params),
                             per_image_time=True),
          "project UNet, random initialisation (stand-in: cost only)")


# ----------------------------------------------------------------------------- protocol


def _trajectory(chain, x_t):
  """States before each step and the output: [N + 1, H, W, C] (application order)."""
  def body(x, p):
    return chain.step(chain.consts, p, x), x
  last, states = jax.lax.scan(body, x_t, chain.params)
  return jnp.concatenate([states, last[None]])


trajectory = jax.jit(_trajectory)


def _thm26(lam, nk, st, lss):
  out = pifs.gaussian_ky_dimension(lam, nk, st.abar_t, st.abar_prev, lambda_ss=lss)
  return {"value": out["value"], "exact": out["exact"], "n_plus": out["n_plus"],
          "eq44_of_isotropic_spectrum": out["spectrum_value"]}


def spearman(a, b):
  r = scipy.stats.spearmanr(a, b)
  return float(r[0]), float(r[1])


def main(argv):
  del argv
  t_start = time.time()
  key = jax.random.key(FLAGS.seed)
  from asyncpatch_jax.data.datasets import get_dataset  # pylint: disable=import-outside-toplevel
  src = get_dataset(FLAGS.dataset, "train")
  images = np.stack([src[i]["image"] for i in range(len(src))]).astype(np.float32)
  shape = images.shape[1:]
  p = FLAGS.patch_size
  spectra = patch_covariance_spectra((images[i:i + 256] for i in range(0, len(images), 256)), p)
  lam, vecs = spectra.lambdas, spectra.top_vectors
  m, nk = vecs.shape
  eps_fn, model_text = build_eps_fn(images, jax.random.fold_in(key, 1))

  abar = {"cosine_s0": pifs.cosine_schedule(1000, 0.0),
          "cosine_s0.008": pifs.cosine_schedule(1000, 0.008),
          "linear": pifs.linear_schedule(1000)}[FLAGS.schedule]
  ts = pifs.ddim_chain(1000, FLAGS.stride)
  st = pifs.chain_steps(abar, ts)
  order = np.arange(len(st.t))[::-1]  # application order: t = T first
  steps_t = st.t[order]
  a_t, a_p = st.abar_t[order], st.abar_prev[order]
  num_steps = len(order)
  chain = ddim_maps.ddim_chain_fn(eps_fn, abar, ts)
  lss = pifs.moran_threshold(st.abar_t, st.abar_prev)
  lam_star = pifs.expansion_threshold(a_t, a_p)
  f_lam = pifs.expansion_function(lam, a_t, a_p)  # [M, N]

  # Block-norm method by counted cost, decided once.
  phi0 = ddim_maps.ddim_step(eps_fn, a_t[0], a_p[0])
  costs = nm.block_norm_costs(phi0, jnp.zeros(shape), patch_size=p,
                               num_iters=FLAGS.block_iters)
  print(f"model: {model_text}; data {FLAGS.dataset} {shape}, M = {m}, n_k = {nk}; "
        f"block norms by {costs.choice} (counted power {costs.power / costs.forward:.0f}x, "
        f"exact {costs.exact / costs.forward:.0f}x a forward pass)", flush=True)

  glob = np.zeros((FLAGS.num_seeds, num_steps))
  norms = np.zeros((FLAGS.num_seeds, num_steps, m, m))
  rq = np.zeros((FLAGS.num_seeds, num_steps, m))
  lyap = []
  for s in range(FLAGS.num_seeds):
    ks = jax.random.fold_in(key, 100 + s)
    x_t = jax.random.normal(ks, shape)
    states = trajectory(chain, x_t)
    for i in range(num_steps):
      phi = ddim_maps.ddim_step(eps_fn, a_t[i], a_p[i])
      x = states[i]
      ki = jax.random.fold_in(ks, i)
      glob[s, i] = float(jn.spectral_norm(phi, x, key=ki, num_iters=FLAGS.power_iters))
      norms[s, i] = np.asarray(jn.block_norms(phi, x, patch_size=p, key=ki,
                                               num_iters=FLAGS.block_iters,
                                               method=costs.choice))
      rq[s, i] = np.asarray(rg.diagonal_rayleigh(phi, x, vecs, patch_size=p))
    out = ly.lyapunov_spectrum(chain, x_t, key=ks, num_vectors=FLAGS.lyap_vectors,
                               num_iters=FLAGS.lyap_iters)
    lyap.append(np.asarray(out.exponents))
    print(f"seed {s}: trajectory done [{time.time() - t_start:.0f}s]", flush=True)
  sup = f_lam.T[None] - rq  # S_k,t = f_t(lambda_k) - kappa^diag_k,t  [S, N, M]

  # Suppression on forward-noised data (Thm. 27: x_t ~ q(x_t)).
  rng = np.random.RandomState(FLAGS.seed)
  log_g = np.zeros((num_steps, m))
  nonpos = 0
  for i in range(num_steps):
    phi = ddim_maps.ddim_step(eps_fn, a_t[i], a_p[i])
    vals = []
    for _ in range(FLAGS.q_samples):
      x0 = images[rng.randint(len(images))]
      x = np.sqrt(a_t[i]) * x0 + np.sqrt(1 - a_t[i]) * rng.randn(*shape).astype(np.float32)
      vals.append(np.asarray(rg.diagonal_rayleigh(phi, jnp.asarray(x), vecs, patch_size=p)))
    g = np.stack(vals)  # g_k,t = f - S = kappa^diag on q(x_t)
    nonpos += int(np.sum(g <= 0))
    log_g[i] = np.mean(np.log(np.maximum(np.abs(g), 1e-12)), axis=0)
  lambda_eff = log_g.mean(0)
  lambda_traj = np.mean(np.log(np.maximum(np.abs(rq), 1e-12)), axis=1).mean(0)
  lambda_gauss = pifs.mean_log_expansion(lam, st.abar_t, st.abar_prev)
  print(f"q(x_t) pass done [{time.time() - t_start:.0f}s]", flush=True)

  # Per-step summaries.
  pcq = [rg.pc_quantities(norms[s, i]) for s in range(FLAGS.num_seeds) for i in range(num_steps)]
  kd = np.array([float(q.kappa_diag) for q in pcq]).reshape(FLAGS.num_seeds, num_steps)
  dc = np.array([float(q.delta_cross) for q in pcq]).reshape(FLAGS.num_seeds, num_steps)
  slack = np.array([np.asarray(q.slack) for q in pcq]).reshape(FLAGS.num_seeds, num_steps, m)
  kappa_op = np.diagonal(norms, axis1=2, axis2=3)  # [S, N, M]
  per_step = []
  for i in range(num_steps):
    rho_rq = spearman(lam, rq[:, i].mean(0))
    rho_op = spearman(lam, kappa_op[:, i].mean(0))
    rho_s = spearman(lam, sup[:, i].mean(0))
    per_step.append({
        "t": int(steps_t[i]), "t_prev": int(st.t_prev[order][i]),
        "global_norm": [float(glob[:, i].mean()), float(glob[:, i].std())],
        "kappa_diag": [float(kd[:, i].mean()), float(kd[:, i].std())],
        "delta_cross": [float(dc[:, i].mean()), float(dc[:, i].std())],
        "kappa_pc": float((kd[:, i] + dc[:, i]).mean()),
        "pc_slack_mean": float(slack[:, i].mean()), "pc_slack_min": float(slack[:, i].min()),
        "pc_violated_fraction": float(np.mean(slack[:, i] <= 0)),
        "rayleigh_mean": float(rq[:, i].mean()),
        "gaussian_f_mean": float(f_lam[:, i].mean()),
        "suppression_mean": float(sup[:, i].mean()),
        "suppression_positive_fraction": float(np.mean(sup[:, i] > 0)),
        "lambda_star": float(lam_star[i]),
        "rho_lambda_rayleigh": rho_rq, "rho_lambda_kappa_op": rho_op,
        "rho_lambda_suppression": rho_s,
    })
  cum = np.prod(glob, axis=1)
  lyap = np.stack(lyap)
  summary = {
      "all_patches_above_lambda_star": bool(np.all(lam[:, None] > lam_star[None])),
      "suppression_positive_fraction": float(np.mean(sup > 0)),
      "global_norm_above_1_fraction": float(np.mean(glob > 1)),
      "cumulative_global_norm_per_seed": cum.tolist(),
      "pc_satisfied_steps": [r["t"] for r in per_step if r["pc_violated_fraction"] == 0],
      "pc_violated_steps": [r["t"] for r in per_step if r["pc_violated_fraction"] == 1],
      "rho_lambda_suppression_significant_positive": [
          r["t"] for r in per_step if r["rho_lambda_suppression"][0] > 0
          and r["rho_lambda_suppression"][1] < 0.05],
      "rho_lambda_suppression_significant_negative": [
          r["t"] for r in per_step if r["rho_lambda_suppression"][0] < 0
          and r["rho_lambda_suppression"][1] < 0.05],
      "rho_lambda_rayleigh_significant_negative": [
          r["t"] for r in per_step if r["rho_lambda_rayleigh"][0] < 0
          and r["rho_lambda_rayleigh"][1] < 0.05],
      "rho_lambda_rayleigh_significant_positive": [
          r["t"] for r in per_step if r["rho_lambda_rayleigh"][0] > 0
          and r["rho_lambda_rayleigh"][1] < 0.05],
      "lambda_eff_sign_agreement_with_trajectory": float(np.mean(
          np.sign(lambda_eff) == np.sign(lambda_traj))),
      "nonpositive_g_count": nonpos,
  }
  all_eigs = spectra.eigvals.reshape(-1)
  gauss_spec = pifs.mean_log_expansion(np.maximum(all_eigs, 1e-8), st.abar_t, st.abar_prev)
  result = {
      "model": model_text, "dataset": FLAGS.dataset, "image_shape": list(shape),
      "patch_size": p, "num_patches": m, "n_k": nk, "schedule": FLAGS.schedule,
      "stride": FLAGS.stride, "num_seeds": FLAGS.num_seeds, "block_method": costs.choice,
      "lambdas": lam.tolist(), "moran_lambda_ss": lss,
      "min_lambda_star": float(lam_star.min()),
      "table4": {str(t): per_step[int(np.flatnonzero(steps_t == t)[0])]["global_norm"]
                 for t in PAPER_TABLE4_STEPS if t in steps_t},
      "per_step": per_step,
      "lyapunov": {
          "gaussian_Lambda_lambda_k": lambda_gauss.tolist(),
          "lambda_eff_q": lambda_eff.tolist(),
          "lambda_trajectory_rayleigh": lambda_traj.tolist(),
          "chain_top_exponents_mean": lyap.mean(0).tolist(),
          "chain_top_exponents_std": lyap.std(0).tolist(),
          "ky_top_k_per_seed": [float(pifs.kaplan_yorke_dimension(jnp.asarray(e))) for e in lyap],
          "gaussian_ky_thm26_isotropic": _thm26(lam, nk, st, lss),
          "gaussian_ky_full_patch_spectra": float(pifs.kaplan_yorke_dimension(
              jnp.asarray(gauss_spec))),
      },
      "summary": summary,
      "wall_s": time.time() - t_start,
  }
  print(json.dumps({"table4": result["table4"], "summary": summary}, indent=1))
  if FLAGS.out:
    common.write_json(FLAGS.out, result, time_key="wall_s", indent=1)
    out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
    plot(result, glob, kd, dc, slack, os.path.join(out_dir, os.path.splitext(
        os.path.basename(FLAGS.out))[0] + ".png"))
    print(f"wrote {FLAGS.out} [{time.time() - t_start:.0f}s]")


def plot(result, glob, kd, dc, slack, path):
  t = np.array([r["t"] for r in result["per_step"]])
  fig, ax = plt.subplots(2, 2, figsize=(10, 7))
  ax[0, 0].plot(t, glob.mean(0), "k-", label=r"global $\|J\Phi_t\|$")
  ax[0, 0].plot(t, kd.mean(0), "b-", label=r"$\kappa^{diag}_t$")
  ax[0, 0].plot(t, kd.mean(0) + dc.mean(0), "r--", label=r"$\kappa^{pc}_t$")
  ax[0, 0].axhline(1.0, color="gray", lw=0.5)
  ax[0, 0].set(xlabel="t", title="norms (Tables 4-5)")
  ax[0, 0].legend(fontsize=7)
  ax2 = ax[0, 0].twinx()
  ax2.plot(t, dc.mean(0), "g:", label=r"$\delta^{cross}_t$")
  ax2.set_ylabel(r"$\delta^{cross}_t$", color="g")
  im = ax[0, 1].imshow(slack.mean(0).T, aspect="auto", cmap="RdBu",
                       extent=[t[0], t[-1], slack.shape[-1] - 0.5, -0.5],
                       vmin=-np.percentile(np.abs(slack), 90),
                       vmax=np.percentile(np.abs(slack), 90))
  fig.colorbar(im, ax=ax[0, 1])
  ax[0, 1].set(xlabel="t", ylabel="patch k", title="(PC) slack (1 - kappa_k) - C_k (Table 8)")
  ax[1, 0].plot(t, [r["rho_lambda_rayleigh"][0] for r in result["per_step"]], "b.-",
                label=r"$\rho(\lambda_k, \kappa^{diag}_{k,t})$")
  ax[1, 0].plot(t, [r["rho_lambda_suppression"][0] for r in result["per_step"]], "m.-",
                label=r"$\rho(\lambda_k, S_{k,t})$")
  ax[1, 0].axhline(0, color="gray", lw=0.5)
  ax[1, 0].set(xlabel="t", title="Spearman across patches (Tables 3, 9)")
  ax[1, 0].legend(fontsize=7)
  lam = np.array(result["lambdas"])
  ly_ = result["lyapunov"]
  ax[1, 1].plot(lam, ly_["gaussian_Lambda_lambda_k"], "ko", label=r"Gaussian $\Lambda(\lambda_k)$")
  ax[1, 1].plot(lam, ly_["lambda_eff_q"], "rs", label=r"$\Lambda_{eff,k}$ on $q(x_t)$")
  ax[1, 1].plot(lam, ly_["lambda_trajectory_rayleigh"], "b^", label="trajectory estimate")
  ax[1, 1].axhline(0, color="gray", lw=0.5)
  ax[1, 1].set(xlabel=r"$\lambda_k$", title="suppression-corrected exponents (Sec. 7.7)")
  ax[1, 1].legend(fontsize=7)
  fig.suptitle(result["model"], fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=70)
  plt.close(fig)


if __name__ == "__main__":
  common.run(main)
