"""PIFS paper, Table 1, the lambda*(t) figures of Section 6.2, lambda** and Table 2.

All numbers come from the closed-form schedule theory in `asyncpatch_jax/pifs.py`
(float64, no model):

  python -m experiments.pifs.pifs_tables --out=results/pifs/pifs_tables.json

Conventions: T = 1000, abar[0] = 1, steps t = 1..T (t -> t - 1); linear betas
1e-4..0.02; cosine with offset s, betas clipped at 0.999; the 50-step DDIM chain is
{0, 20, ..., 1000} on cosine s = 0 and the 49-step chain {20, 40, ..., 1000}. CV uses
the population standard deviation; lambda* min/max are over the interior t in
[2, T - 2]. The JSON also records the paper's printed numbers beside ours, the chain
that reproduces the paper's 50-step lambda** exactly, and Table 2 computed with
stand-in patch variances (the paper prints only the range of the CIFAR-10 ones).
Writes `thresholds.png` (lambda*(t) and L*_t) beside the JSON. Runs in a few seconds
(`--tiny` is the same run).
"""

from __future__ import annotations

import os

from absl import flags
import matplotlib
import numpy as np
import scipy.stats

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from asyncpatch_jax.analysis import pifs  # noqa: E402
from experiments import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path; PNGs are written beside it.")
common.define_tiny({}, "The same run (it takes seconds).")

T = 1000
SCHEDULES = {
    "linear": pifs.linear_schedule(T),
    "cosine_s0": pifs.cosine_schedule(T, 0.0),
    "cosine_s0.008": pifs.cosine_schedule(T, 0.008),
}
CHAINS = {
    "linear": ("linear", pifs.full_chain(T)),
    "cosine_s0": ("cosine_s0", pifs.full_chain(T)),
    "cosine_s0.008": ("cosine_s0.008", pifs.full_chain(T)),
    "ddim50_cosine_s0": ("cosine_s0", pifs.ddim_chain(T, 20)),
    "ddim49_cosine_s0": ("cosine_s0", pifs.ddim_chain(T, 20, first=20)),
}
TABLE1_KEYS = ("linear", "cosine_s0", "cosine_s0.008", "ddim50_cosine_s0")
LAMBDA_STAR_KEYS = ("linear", "cosine_s0", "cosine_s0.008")
MORAN_KEYS = tuple(CHAINS)

PAPER = {
    "table1": {  # mean, CV, L* at the finest step, finest t (Table 1)
        "linear": [0.805, 0.341, 0.00500, 1],
        "cosine_s0": [0.637, 0.483, 0.00079, 1],
        "cosine_s0.008": [0.641, 0.474, 0.00321, 1],
        "ddim50_cosine_s0": [0.637, 0.483, 0.01571, 20],
    },
    "lambda_star": {  # interior [min, max], argmin (Sec. 6.2)
        "linear": {"min": 1.0025, "argmin": 350, "max": 1.19},
        "cosine_s0": {"min": 1.0016, "argmin": 500, "max": 1.33},
        "cosine_s0.008": {"min": 1.002, "argmin": 496, "max": 1.25},
    },
    "moran": {"training_chain": 1.0024, "ddim50": 1.049681, "ddim49": 1.0497,
              "ddim50_min_lambda_star": 1.031664},
    "table2": {"linear": {"cv_ig": 1.107, "cv_dd": 0.836, "spearman": 0.9999, "ratio": 1.04},
               "cosine_s0.008": {"cv_ig": 0.867, "cv_dd": 0.570, "spearman": 0.9998,
                                 "ratio": 1.02}},
}


def steps_of(key):
  sched, chain = CHAINS[key]
  return pifs.chain_steps(SCHEDULES[sched], chain)


def table1():
  out = {}
  for key in TABLE1_KEYS:
    st = steps_of(key)
    l_star = pifs.contraction_threshold(st.abar_t, st.abar_prev)
    out[key] = {"mean": float(l_star.mean()), "cv": float(l_star.std() / l_star.mean()),
                "finest": float(l_star[0]), "finest_t": int(st.t[0])}
  return out


def lambda_star():
  out = {}
  for key in LAMBDA_STAR_KEYS:
    st = steps_of(key)
    lam = pifs.expansion_threshold(st.abar_t, st.abar_prev)
    inner = (st.t >= 2) & (st.t <= T - 2)
    li, ti = lam[inner], st.t[inner]
    out[key] = {"min": float(li.min()), "argmin": int(ti[np.argmin(li)]),
                "max": float(li.max()), "argmax": int(ti[np.argmax(li)]),
                "at_t1": float(lam[0]), "at_tT": float(lam[-1])}
  return out


def moran():
  out, extra = {}, {}
  for key in MORAN_KEYS:
    st = steps_of(key)
    lss = pifs.moran_threshold(st.abar_t, st.abar_prev)
    out[key] = lss
    extra[key] = {
        "residual": float(abs(np.prod(pifs.expansion_function(lss, st.abar_t, st.abar_prev)) - 1)),
        "min_lambda_star": float(pifs.expansion_threshold(st.abar_t, st.abar_prev).min()),
    }
  # The chain whose lambda** and min lambda* equal the paper's 50-step numbers.
  st = pifs.chain_steps(SCHEDULES["cosine_s0.008"], np.arange(0, 981, 20))
  extra["paper_match_cosine_s0.008_0_to_980"] = {
      "lambda_ss": pifs.moran_threshold(st.abar_t, st.abar_prev),
      "min_lambda_star": float(pifs.expansion_threshold(st.abar_t, st.abar_prev).min()),
      "num_steps": int(len(st.t))}
  return out, extra


def table2():
  """Table 2 with 16 stand-in variances evenly spaced over the paper's CIFAR-10 range."""
  lams, n_k = np.linspace(18.7, 44.4, 16), 192
  out = {}
  for key in ("linear", "cosine_s0.008"):
    st = steps_of(key)
    ig = pifs.information_gain(lams, n_k, st.abar_t, st.abar_prev)
    dd = pifs.ky_dimension_growth(lams, n_k, st.abar_t, st.abar_prev)
    n_pp = 16 * n_k
    out[key] = {"cv_ig": float(ig.std() / ig.mean()),
                "cv_dd": float(np.abs(dd).std() / np.abs(dd).mean()),
                "spearman": float(scipy.stats.spearmanr(ig, np.abs(dd))[0]),
                "ratio": float(np.mean(ig / dd**2) * n_pp)}
  return {"lambdas": "16 values evenly spaced on [18.7, 44.4] (stand-in), n_k = 192",
          **out}


def plot(out_dir):
  fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
  for key in LAMBDA_STAR_KEYS:
    st = steps_of(key)
    ax[0].semilogy(st.t, pifs.expansion_threshold(st.abar_t, st.abar_prev) - 1, label=key)
    ax[1].plot(st.t, pifs.contraction_threshold(st.abar_t, st.abar_prev), label=key)
  st = steps_of("ddim50_cosine_s0")
  ax[0].semilogy(st.t, pifs.expansion_threshold(st.abar_t, st.abar_prev) - 1, "k.",
                 ms=3, label="ddim50_cosine_s0")
  ax[1].plot(st.t, pifs.contraction_threshold(st.abar_t, st.abar_prev), "k.", ms=3,
             label="ddim50_cosine_s0")
  ax[0].set(xlabel="t", ylabel=r"$\lambda^*(t) - 1$", title="expansion threshold (Eq. 27)")
  ax[1].set(xlabel="t", ylabel=r"$L^*_t$", title="contraction threshold (Eq. 10)")
  ax[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "thresholds.png"), dpi=80)
  plt.close(fig)


def main(argv):
  del argv
  t1 = table1()
  ls = lambda_star()
  mo, mo_extra = moran()
  t2 = table2()
  print("Table 1 (L*_t)            mean    CV      finest    t   | paper")
  for key, r in t1.items():
    p = PAPER["table1"][key]
    print(f"  {key:20s} {r['mean']:.4f}  {r['cv']:.4f}  {r['finest']:.5f}  {r['finest_t']:3d} "
          f"| {p[0]:.3f} {p[1]:.3f} {p[2]:.5f} {p[3]}")
  print("lambda*(t), interior t in [2, T-2]: min (argmin), max (argmax) | paper")
  for key, r in ls.items():
    p = PAPER["lambda_star"][key]
    print(f"  {key:14s} {r['min']:.5f} ({r['argmin']}), {r['max']:.4f} ({r['argmax']}) "
          f"| {p['min']} ({p['argmin']}), {p['max']}")
  print("Moran threshold lambda** (Eq. 45):")
  for key, v in mo.items():
    print(f"  {key:18s} {v:.6f}  (|prod f - 1| = {mo_extra[key]['residual']:.1e}, "
          f"min lambda* = {mo_extra[key]['min_lambda_star']:.6f})")
  m = mo_extra["paper_match_cosine_s0.008_0_to_980"]
  print(f"  paper: training chain 1.0024, 50-step 1.049681 (min lambda* 1.031664); "
        f"cosine s=0.008 on {{0..980}}: {m['lambda_ss']:.6f} ({m['min_lambda_star']:.6f})")
  print("Table 2 (stand-in variances):")
  for key in ("linear", "cosine_s0.008"):
    r, p = t2[key], PAPER["table2"][key]
    print(f"  {key:14s} CV(IG) {r['cv_ig']:.3f} CV(|dd|) {r['cv_dd']:.3f} "
          f"rho {r['spearman']:.4f} ratio {r['ratio']:.3f} | paper {p}")
  result = {"table1": t1, "lambda_star": ls, "moran": mo, "moran_details": mo_extra,
            "table2_standin": t2, "paper": PAPER}
  if FLAGS.out:
    common.write_json(FLAGS.out, result, indent=1)
    plot(os.path.dirname(os.path.abspath(FLAGS.out)))
    print(f"wrote {FLAGS.out}")


if __name__ == "__main__":
  common.run(main)
