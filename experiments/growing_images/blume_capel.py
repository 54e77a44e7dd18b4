"""Growing Images, Figures 2-6: the block Blume-Capel chain under spatial schedules.

Reproduces, with the paper's setup (Section 4.3, App. B): L = 8 blocks,
J_intra = 1, J_inter = 0.6, Delta = 0.5, h = 0, block 1 clamped to +1, 24 seeds
with m^(0) ~ N(0, 0.1^2) on the hidden blocks, T = 21000, T_phase = T / 7 = 3000,
T_int = 20, N = 1 in the rate pi / N:
  fig2_profiles.png       block profiles at T_phase, 4 T_phase, 7 T_phase (Fig. 2);
  fig4_bias.png           ||m(T) - m*||_2 vs T up to 4.2e5 (Fig. 4);
  fig5_traces.png         per-block traces m_l(t) (Fig. 5);
  fig6_two_boundary.png   blocks 1, 8 clamped to +1, -1, |H| = 6, T_phase = 3500 (Fig. 6);
  fig3_phase_diagram.png  classes of the single-block free energy over (h, Delta) (Fig. 3);
and the numbers in a JSON file:

  python -m experiments.growing_images.blume_capel --out=results/blume_capel/blume_capel.json

Runs in float64 (the machine-precision biases of Fig. 4 need it); about a
minute on a 2-core CPU. `--tiny`: 2 seeds, 8 for the plateau check, no Fig. 3.
"""

from __future__ import annotations

import os
import time

from absl import flags
import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after selecting the backend)

from asyncpatch_jax import spin  # noqa: E402
from experiments import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path; the PNG figures are written beside it.")
flags.DEFINE_integer("num_seeds", 24, "Initial-condition seeds per schedule.")
flags.DEFINE_integer("seed", 0, "Root PRNG seed.")
flags.DEFINE_bool("phase_diagram", True, "Also compute Fig. 3 (about 10 s).")
flags.DEFINE_integer("num_seeds_check", 4096,
                     "Seeds for the seed-expectation of the progressive plateaus (0 to skip).")
common.define_tiny(dict(num_seeds=2, phase_diagram=False, num_seeds_check=8))

NAMES = ("parallel", "interleaved", "progressive_lr", "progressive_rl")
LABELS = {"parallel": "parallel", "interleaved": "interleaved",
          "progressive_lr": "progressive L→R", "progressive_rl": "progressive R→L"}
COLOURS = {"parallel": "tab:blue", "interleaved": "tab:green", "progressive_lr": "tab:red",
           "progressive_rl": "tab:purple"}
PAPER_CHAIN = dict(num_blocks=8, block_size=1, j_intra=1.0, j_inter=0.6, delta=0.5, fields=0.0)
NUM_STEPS = 21_000             # T; T_phase = T / |H|
LONG_STEPS = 420_000           # the Fig. 4 horizon: one progressive sweep, T_phase = 60000
INTERLEAVE_STEPS = 20          # T_int
INIT_SCALE = 0.1
RECORD = 10                    # trace resolution for Fig. 2, 5, 6
LONG_RECORD = 20               # trace resolution for the Fig. 4 trajectory panel
# Fig. 4 horizons: multiples of |H| T_int = 140, from 140 to 4.2e5.
HORIZONS = 140 * np.array([1, 2, 5, 10, 20, 50, 150, 300, 750, 1500, 3000])
PAPER_NUMBERS = {"m_star_last": 0.36, "bias_progressive_lr": 1.0, "bias_progressive_rl": 1.4,
                 "bias_parallel_interleaved": "machine precision",
                 "bias_two_boundary_progressive": 0.84}
# Fig. 3: the paper does not state J; J = 6 > 3 puts the block in the first-order
# regime of the mean-field Blume-Capel model, so all classes appear (J = J_intra = 1
# or J_intra + 2 J_inter = 2.2 has no first-order line: classes 1-3 only).
PHASE_J = 6.0
PHASE_HS = np.linspace(-1.5, 1.5, 61)
PHASE_DELTAS = np.linspace(1.5, 4.5, 61)
PHASE_GAMMAS = np.round(np.linspace(0.0, 1.1, 12), 3)


def _stats(values):
  values = np.asarray(values)
  return float(values.mean()), float(values.std())


def run_chain(chain, m0, m_star, num_steps, record_every):
  """Mean-field traces [R+1, S, L] per schedule and the seed-mean/sd of the final bias."""
  traces, bias, bias_sd = {}, {}, {}
  for name in NAMES:
    schedule = spin.make_schedule(name, chain, num_steps, interleave_steps=INTERLEAVE_STEPS)
    traj = spin.run_mean_field(m0, chain, schedule, record_every=record_every)
    traces[name] = np.asarray(traj.m)
    bias[name], bias_sd[name] = _stats(spin.l2_bias(traj.m[-1], m_star))
  return np.asarray(traj.times), traces, bias, bias_sd


def plot_profiles(path, traces, times, m_star, checkpoints, clamped, title):
  """Fig. 2 / Fig. 6: block profiles (mean +- sd over seeds) at three depths."""
  blocks = np.arange(1, m_star.size + 1)
  fig, axes = plt.subplots(1, len(checkpoints), figsize=(4.2 * len(checkpoints), 3.6), sharey=True)
  for ax, (label, t) in zip(axes, checkpoints):
    k = int(np.flatnonzero(times == t)[0])
    for block in clamped:
      ax.axvspan(block + 0.5, block + 1.5, color="0.85", zorder=0)
    for offset, name in zip((-0.09, -0.03, 0.03, 0.09), NAMES):
      m = traces[name][k]
      ax.errorbar(blocks + offset, m.mean(0), yerr=m.std(0), marker="o", ms=3.5, capsize=2,
                  color=COLOURS[name], label=LABELS[name])
    ax.plot(blocks, m_star, "k:", lw=1.8, label="Bayes-optimal $m^*$")
    ax.set_title(f"{label} (t = {t})")
    ax.set_xlabel("block ℓ")
    ax.set_xticks(blocks)
  axes[0].set_ylabel("block magnetisation $m_\\ell$")
  axes[0].legend(fontsize=7, loc="best")
  fig.suptitle(title, fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_traces(path, traces, times, m_star, hidden):
  """Fig. 5: m_l(t) per hidden block, mean +- sd over seeds."""
  fig, axes = plt.subplots(2, 4, figsize=(14, 6), sharex=True)
  for ax, block in zip(axes.flat, hidden):
    for name in NAMES:
      m = traces[name][:, :, block]
      mean, sd = m.mean(1), m.std(1)
      ax.plot(times, mean, color=COLOURS[name], lw=1.2, label=LABELS[name])
      ax.fill_between(times, mean - sd, mean + sd, color=COLOURS[name], alpha=0.2, lw=0)
    ax.axhline(m_star[block], color="k", ls=":", lw=1.5)
    ax.set_title(f"block {block + 1}")
  axes.flat[-1].axis("off")
  handles, labels = axes.flat[0].get_legend_handles_labels()
  axes.flat[-1].legend(handles + [plt.Line2D([], [], color="k", ls=":")], labels + ["$m^*_\\ell$"],
                       loc="center")
  for ax in axes[1]:
    ax.set_xlabel("t")
  fig.suptitle("Per-block traces, single boundary (mean ± 1 sd over seeds)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def plot_bias(path, horizon_bias, long_times, long_bias):
  """Fig. 4: ||m(T) - m*||_2, log-log; (a) end of a run of horizon T, (b) along the T = 4.2e5 run.

  Lines are seed means; bands the 16-84 % seed percentiles (+-1 sd for a normal
  spread, but well defined on a log axis).
  """
  floor = 1e-17
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for ax, x, per_seed in ((axes[0], HORIZONS, horizon_bias), (axes[1], long_times[1:], long_bias)):
    for name in NAMES:
      values = per_seed[name] if ax is axes[0] else per_seed[name][1:]      # [K, S]
      low, high = np.percentile(values, [16, 84], axis=1)
      ax.plot(x, np.maximum(values.mean(1), floor), "o-" if ax is axes[0] else "-", ms=3,
              color=COLOURS[name], label=LABELS[name])
      ax.fill_between(x, np.maximum(low, floor), np.maximum(high, floor), color=COLOURS[name],
                      alpha=0.2, lw=0)
  axes[0].set_title("(a) bias at the end of a run of horizon T\n(T_phase = T/7, T_int = 20)",
                    fontsize=9)
  axes[1].set_title("(b) bias along the T = 4.2e5 run\n(one progressive sweep, T_phase = 60000)",
                    fontsize=9)
  for ax in axes:
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("iteration T")
    ax.axvline(NUM_STEPS, color="0.6", ls="--", lw=0.8)
  axes[0].set_ylabel("$\\|m^{(T)} - m^*\\|_2$ (seed mean, 16-84 % band)")
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def plot_phase_diagram(path, classes):
  """Fig. 3: class of the single-block posterior over (h, Delta), one panel per gamma."""
  colours = ["0.3", "#f0f0f0", "#9ecae1", "#fdae6b", "#a1d99b", "#e6550d", "#3182bd"]
  cmap = matplotlib.colors.ListedColormap(colours)
  norm = matplotlib.colors.BoundaryNorm(np.arange(-0.5, 7.5), cmap.N)
  fig, axes = plt.subplots(3, 4, figsize=(13, 9.5), sharex=True, sharey=True)
  extent = [PHASE_HS[0], PHASE_HS[-1], PHASE_DELTAS[0], PHASE_DELTAS[-1]]
  for ax, gamma, grid in zip(axes.flat, PHASE_GAMMAS, classes):
    ax.imshow(grid, origin="lower", extent=extent, aspect="auto", cmap=cmap, norm=norm,
              interpolation="nearest")
    ax.set_title(f"γ = {gamma:g}", fontsize=9)
  for ax in axes[-1]:
    ax.set_xlabel("h")
    ax.set_xticks([-1.0, -0.5, 0.0, 0.5, 1.0])
  for ax in axes[:, 0]:
    ax.set_ylabel("Δ")
  patches = [matplotlib.patches.Patch(color=colours[k], label=f"{k}: {spin.PHASE_CLASSES[k]}")
             for k in range(1, 7)]
  fig.legend(handles=patches, loc="lower center", ncol=3, fontsize=8, frameon=False)
  fig.suptitle(f"Single-block posterior free energy f(m): number and ranking of minima "
               f"(J = {PHASE_J:g}; effective Δ + γ²/2, planted s0 ~ prior marginal)",
               fontsize=10)
  fig.tight_layout(rect=(0, 0.06, 1, 0.97))
  fig.savefig(path, dpi=70)
  plt.close(fig)


def main(argv):
  del argv
  start = time.time()
  jax.config.update("jax_enable_x64", True)   # Fig. 4 reaches machine precision (float64)
  out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
  os.makedirs(out_dir, exist_ok=True)
  root = jax.random.key(FLAGS.seed)

  # --- Single boundary: block 1 clamped to +1 (Fig. 2, 4, 5). ---
  chain = spin.BlockChain(**PAPER_CHAIN, clamped={0: 1.0})
  m_star = np.asarray(spin.bayes_optimal_profile(chain))
  m0 = spin.initial_magnetisation(jax.random.fold_in(root, 1), chain, FLAGS.num_seeds, INIT_SCALE)
  times, traces, bias, bias_sd = run_chain(chain, m0, m_star, NUM_STEPS, RECORD)
  phase = NUM_STEPS // len(chain.hidden)
  print(f"[{time.time() - start:5.1f}s] m* = {np.round(m_star, 4).tolist()}")
  print(f"[{time.time() - start:5.1f}s] bias at T = {NUM_STEPS}: {bias}")

  long_times, long_traces, bias_long, bias_long_sd = run_chain(chain, m0, m_star, LONG_STEPS,
                                                               LONG_RECORD)
  long_bias = {name: np.linalg.norm(long_traces[name] - m_star, axis=-1) for name in NAMES}
  del long_traces
  print(f"[{time.time() - start:5.1f}s] bias at T = {LONG_STEPS}: {bias_long}")

  horizon_bias = {}
  for name in NAMES:
    schedules = [spin.make_schedule(name, chain, int(t), interleave_steps=INTERLEAVE_STEPS)
                 for t in HORIZONS]
    final = spin.run_mean_field_batch(m0, chain, schedules)                   # [K, S, L]
    horizon_bias[name] = np.asarray(spin.l2_bias(final, m_star))
    # The batched sweep and the single runs agree at T = 21000 and T = 4.2e5.
    np.testing.assert_allclose(horizon_bias[name][list(HORIZONS).index(NUM_STEPS)].mean(),
                               bias[name], rtol=1e-9, atol=1e-15)
    np.testing.assert_allclose(horizon_bias[name][-1].mean(), bias_long[name],
                               rtol=1e-9, atol=1e-15)
  print(f"[{time.time() - start:5.1f}s] bias vs horizon done")

  plot_profiles(os.path.join(out_dir, "fig2_profiles.png"), traces, times, m_star,
                [("1 phase", phase), ("4 phases", 4 * phase), ("7 phases", 7 * phase)], clamped=[0],
                title=f"Single boundary: block 1 clamped to +1, |H| = 7, T_phase = {phase}, "
                      f"{FLAGS.num_seeds} seeds (mean ± 1 sd)")
  plot_traces(os.path.join(out_dir, "fig5_traces.png"), traces, times, m_star, chain.hidden)
  plot_bias(os.path.join(out_dir, "fig4_bias.png"), horizon_bias, long_times, long_bias)

  # --- Two boundaries: blocks 1, 8 clamped to +1, -1 (App. B.3, Fig. 6). ---
  chain2 = spin.BlockChain(**PAPER_CHAIN, clamped={0: 1.0, 7: -1.0})
  m_star2 = np.asarray(spin.bayes_optimal_profile(chain2))
  m02 = spin.initial_magnetisation(jax.random.fold_in(root, 2), chain2, FLAGS.num_seeds, INIT_SCALE)
  times2, traces2, bias2, bias2_sd = run_chain(chain2, m02, m_star2, NUM_STEPS, RECORD)
  phase2 = NUM_STEPS // len(chain2.hidden)
  plot_profiles(os.path.join(out_dir, "fig6_two_boundary.png"), traces2, times2, m_star2,
                [("1 phase", phase2), ("4 phases", 4 * phase2), ("6 phases", 6 * phase2)],
                clamped=[0, 7], title=f"Two boundaries: blocks 1, 8 clamped to +1, -1, |H| = 6, "
                                      f"T_phase = {phase2}, {FLAGS.num_seeds} seeds")
  print(f"[{time.time() - start:5.1f}s] two-boundary bias: {bias2}")

  # --- Seed expectation of the progressive plateaus (24 seeds leave ~2 % noise). ---
  plateau_many = None
  if FLAGS.num_seeds_check:
    plateau_many = {}
    for label, c, ms, key in (("single", chain, m_star, 3), ("two_boundary", chain2, m_star2, 4)):
      m0_many = spin.initial_magnetisation(jax.random.fold_in(root, key), c, FLAGS.num_seeds_check,
                                           INIT_SCALE)
      for name in ("progressive_lr", "progressive_rl"):
        final = spin.run_mean_field(m0_many, c, spin.make_schedule(name, c, NUM_STEPS)).m[-1]
        per_seed = np.asarray(spin.l2_bias(final, ms))
        plateau_many[f"{label}/{name}"] = {
            "mean": float(per_seed.mean()),
            "standard_error": float(per_seed.std() / np.sqrt(per_seed.size))}
    print(f"[{time.time() - start:5.1f}s] plateaus over {FLAGS.num_seeds_check} seeds: "
          f"{plateau_many}")

  # --- Fig. 3: phase diagram of the single-block posterior. ---
  phase_result = None
  if FLAGS.phase_diagram:
    classes = np.asarray(spin.phase_diagram(j=PHASE_J, hs=PHASE_HS, deltas=PHASE_DELTAS,
                                            gammas=PHASE_GAMMAS))
    plot_phase_diagram(os.path.join(out_dir, "fig3_phase_diagram.png"), classes)
    phase_result = {
        "j": PHASE_J, "h_range": [PHASE_HS[0], PHASE_HS[-1], len(PHASE_HS)],
        "delta_range": [PHASE_DELTAS[0], PHASE_DELTAS[-1], len(PHASE_DELTAS)],
        "gammas": PHASE_GAMMAS.tolist(), "classes": spin.PHASE_CLASSES,
        "class_fractions": {f"{g:g}": {str(k): round(float((c == k).mean()), 4) for k in range(7)}
                            for g, c in zip(PHASE_GAMMAS, classes)}}
    print(f"[{time.time() - start:5.1f}s] phase diagram done")

  final_profile = lambda tr: {name: tr[name][-1].mean(0).tolist() for name in NAMES}
  result = {
      "m_star": m_star.tolist(),
      "bias": bias,
      "bias_long": bias_long,
      "bias_two_boundary": bias2,
      "bias_sd": bias_sd,
      "bias_long_sd": bias_long_sd,
      "bias_two_boundary_sd": bias2_sd,
      "m_star_two_boundary": m_star2.tolist(),
      "final_profile_mean": final_profile(traces),
      "final_profile_mean_two_boundary": final_profile(traces2),
      "plateau_bias_many_seeds": plateau_many,
      "bias_vs_horizon": {"horizons": HORIZONS.tolist(),
                          **{name: horizon_bias[name].mean(1).tolist() for name in NAMES}},
      "phase_diagram": phase_result,
      "paper": PAPER_NUMBERS,
      "settings": {**PAPER_CHAIN,
                   "clamped": {"single": {"1": 1.0}, "two_boundary": {"1": 1.0, "8": -1.0}},
                   "num_seeds": FLAGS.num_seeds, "num_seeds_check": FLAGS.num_seeds_check,
                   "seed": FLAGS.seed, "init_scale": INIT_SCALE,
                   "num_steps": NUM_STEPS, "t_phase": phase, "t_phase_two_boundary": phase2,
                   "long_num_steps": LONG_STEPS, "long_t_phase": LONG_STEPS // len(chain.hidden),
                   "t_int": INTERLEAVE_STEPS, "rate": "pi_l / N with N = 1", "dtype": "float64",
                   "block_indexing": "m_star[0] is the paper's block 1 (clamped)"},
      "wall_time_s": round(time.time() - start, 1),
  }
  common.write_json(FLAGS.out, result, time_key="wall_time_s", indent=1)
  print(f"[{time.time() - start:5.1f}s] wrote {FLAGS.out} and figures to {out_dir}")


if __name__ == "__main__":
  common.run(main, required=("out",))
