"""The two benchmark scripts end to end on the tiny config (experiments/asyncpatch/
sampler_ablation.py, inpainting_benchmark.py), run as experiments/asyncpatch/README.md writes
them with --tiny (the test config, 2 training steps, 4 sampler steps, the square family)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from asyncpatch_jax.diffusion import repaint
from fixtures.readme import readme_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  """The README's command of `script` with --tiny and `args` (later flags win)."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  res = subprocess.run([sys.executable, *script[1:], "--tiny", *args], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-4000:]


@pytest.mark.slow
def test_sampler_ablation_then_inpainting_benchmark(tmp_path):
  """Both scripts over 2 training seeds; the table's seed statistics and verdicts are
  recomputed here from the per-run values with scipy."""
  # --tiny: the workdirs go to <dir of --out>/tiny_workdirs/<sampler>_s<seed>, where
  # inpainting_benchmark.py --tiny finds the global and asyncpatch models.
  _run(readme_command("experiments/asyncpatch/sampler_ablation.py"),
       f"--out={tmp_path}/ablation.json")
  ablation = json.load(open(tmp_path / "ablation.json"))
  runs = ablation["runs"]
  assert list(runs) == ["global", "asyncpatch"] and list(runs["global"]) == ["0", "1"]
  for sampler, per_seed in runs.items():
    for seed, r in per_seed.items():
      assert r["step"] == 2
      assert os.path.exists(tmp_path / "tiny_workdirs" / f"{sampler}_s{seed}" / "config.json")
      g = r["generation"]
      assert g["fd_interval"]["low"] <= g["fd"] <= g["fd_interval"]["high"] and g["fd"] > 0
      q = r["inpainting"]["asyncpatch"]
      assert q["network_evals"] == 4
      assert q["families"]["square"]["psnr_interval"]["n"] == 20
  # RePaint inpaints for the global model only (the paper's Table 1): 4 steps + one jump of 2.
  assert runs["global"]["0"]["inpainting"]["repaint"]["network_evals"] == 6
  assert "repaint" not in runs["asyncpatch"]["0"]["inpainting"]
  table = ablation["table"]
  assert list(table) == ["global", "global + RePaint", "asyncpatch"]
  psnr = lambda s, m: [runs[s][k]["inpainting"][m]["families"]["square"]["psnr"] for k in "01"]
  row = table["global + RePaint"]["square psnr"]
  a, b = psnr("global", "repaint"), psnr("asyncpatch", "asyncpatch")
  ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
  d = row["minus_reference"]
  assert d["estimate"] == pytest.approx(np.mean(a) - np.mean(b), abs=1e-9)
  assert (d["low"], d["high"]) == pytest.approx((ci.low, ci.high), abs=1e-6)
  assert row["sem"] == pytest.approx(np.std(a, ddof=1) / np.sqrt(2), abs=1e-9)
  assert "verdict" not in table["asyncpatch"]["square psnr"]
  assert ablation["command"].startswith("python -m experiments.asyncpatch.sampler_ablation ")

  _run(readme_command("experiments/asyncpatch/inpainting_benchmark.py"),
       f"--out={tmp_path}/inpainting.json")
  bench = json.load(open(tmp_path / "inpainting.json"))
  evals = {m: r["network_evals"] for m, r in bench["table"]["asyncpatch"].items()}
  # 4 and 8 AsyncPatch steps; RePaint (4, 2, 2) and the budget of 6 at jump length 2,
  # which is the same schedule (params_for_budget).
  assert evals == {"asyncpatch": 4, "asyncpatch@8": 8, "repaint": 6, "repaint@6": 6}
  assert repaint.params_for_budget(6, 2) == (4, 2, 2)
  # AsyncPatch Eq. 4 is the same computation in both scripts (same model, masks, key).
  for seed in "01":
    got = bench["runs"]["asyncpatch"][seed]["asyncpatch"]["families"]["square"]["psnr"]
    assert got == pytest.approx(b[int(seed)], abs=1e-5)
  # The same-model comparison is paired over seeds (ttest_rel), the cross-model one Welch.
  same, cross = bench["comparisons"]
  assert (same["interval_over_seeds"], cross["interval_over_seeds"]) == ("paired-t", "welch-t")
  value = lambda m, spec, k: bench["runs"][m][k][spec]["families"]["square"]["psnr"]
  x = [value("asyncpatch", "asyncpatch@8", k) for k in "01"]
  y = [value("asyncpatch", "repaint", k) for k in "01"]
  ci = stats.ttest_rel(x, y).confidence_interval(0.95)
  d = same["families"]["square"]["psnr"]["a_minus_b"]
  assert (d["low"], d["high"]) == pytest.approx((ci.low, ci.high), abs=1e-6)
  assert set(same["families"]["square"]["psnr"]["within_seed_paired"]) == {"0", "1"}
  assert os.path.exists(tmp_path / "inpainting.md")
