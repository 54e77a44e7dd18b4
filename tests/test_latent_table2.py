"""experiments/asyncpatch/latent_table2.py end to end with --tiny, as the AsyncPatch README writes
it: the five models over 2 seeds, their equal-cost step counts, the timesteps each trained with,
and the seed statistics and verdicts recomputed here with scipy (paired t for the
latent pair, Welch for the rest)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from fixtures.readme import readme_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_latent_table2_tiny(tmp_path):
  cmd = readme_command("experiments/asyncpatch/latent_table2.py")
  env = dict(os.environ, PYTHONPATH=ROOT)
  res = subprocess.run([sys.executable, *cmd[1:], "--tiny", f"--out={tmp_path}/t2.json"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-4000:]
  out = json.load(open(tmp_path / "t2.json"))
  cost = out["training_cost"]
  lat, pix_i, pix_f = cost["latent_asyncpatch"], cost["pixel_images"], cost["pixel_flops"]
  # Equal images: the pixel run sees the latent run's steps x batch (tiny: 2 x 16 at batch 8).
  assert (lat["steps"], lat["batch"], pix_i["batch"]) == (2, 16, 8)
  assert pix_i["steps"] * pix_i["batch"] == lat["steps"] * lat["batch"] == 32
  # Equal FLOPs: the pixel steps whose FLOPs are nearest the latent run's (at least 1).
  assert pix_f["steps"] == max(1, round(lat["train_flops"] / pix_f["flops_per_step"]))
  assert pix_f["flops_per_step"] == pix_i["flops_per_step"] > lat["flops_per_step"] > 0
  dit = cost["dit_flops"]
  assert dit["steps"] == max(1, round(lat["train_flops"] / dit["flops_per_step"]))
  assert dit["batch"] == 8 and dit["train_flops"] == dit["steps"] * dit["flops_per_step"]
  root = tmp_path / "tiny_table2_workdirs"
  samplers = {"latent_asyncpatch": "asyncpatch", "latent_global": "global",
              "pixel_images": "asyncpatch", "pixel_flops": "asyncpatch", "dit_flops": "asyncpatch"}
  for model, sampler in samplers.items():
    for seed in "01":
      config = json.load(open(root / f"{model}_s{seed}" / "config.json"))
      assert config["timesteps"]["sampler"] == sampler, model
      assert config["seed"] == int(seed)
      assert config["model"]["name"] == ("dit" if model == "dit_flops" else "unet"), model
      latent = config.get("latent", {}).get("autoencoder_workdir", "")
      assert latent == (str(root / "vqae") if model.startswith("latent") else ""), model
      run = out["runs"][model][seed]
      assert run["step"] == cost[model]["steps"], model
      g = run["generation"]
      assert g["num_samples"] == g["num_reference"] == 16 and g["reference_split"] == "test"
  # Each comparison: mean, s.e. and Welch's interval over seeds from the per-seed values.
  assert [(c["candidate"], c["baseline"]) for c in out["comparisons"]] == [
      ("latent_asyncpatch", "latent_global"), ("latent_asyncpatch", "pixel_flops"),
      ("latent_asyncpatch", "pixel_images"), ("dit_flops", "pixel_flops")]
  assert [c["interval_over_seeds"] for c in out["comparisons"]] == [
      "paired-t", "welch-t", "welch-t", "welch-t"]
  # Inpainting: the same comparisons per mask family, on the same crops and masks for every run.
  assert [(c["candidate"], c["baseline"], c["interval_over_seeds"])
          for c in out["inpainting_comparisons"]] == [
      (c["candidate"], c["baseline"], c["interval_over_seeds"]) for c in out["comparisons"]]
  holes = {out["runs"][m][s]["inpainting"]["families"]["square"]["hole_fraction"]
           for m in samplers for s in "01"}
  assert len(holes) == 1 and 0 < holes.pop() < 1
  for model in samplers:
    q = out["runs"][model]["0"]["inpainting"]
    assert q["num_images"] == 8 and list(q["families"]) == ["square"]
    assert q["network_evals"] == 2, model                      # --num_steps: Eq. 4, one pass
  checked = [("generation", c) for c in out["comparisons"]]
  checked += [("inpainting", c) for c in out["inpainting_comparisons"]]
  for task, c in checked:
    cand, base = c["candidate"], c["baseline"]
    paired = c["interval_over_seeds"] == "paired-t"
    for metric, row in c["metrics"].items():
      if task == "generation":
        a = [out["runs"][cand][s]["generation"][metric] for s in "01"]
        b = [out["runs"][base][s]["generation"][metric] for s in "01"]
      else:
        family, name = metric.split(" ")
        a = [out["runs"][cand][s]["inpainting"]["families"][family][name] for s in "01"]
        b = [out["runs"][base][s]["inpainting"]["families"][family][name] for s in "01"]
      assert row[cand]["mean"] == pytest.approx(np.mean(a), abs=1e-9)
      assert row[base]["sem"] == pytest.approx(np.std(b, ddof=1) / np.sqrt(2), abs=1e-9)
      d = row[f"{cand}_minus_{base}"]
      assert d["estimate"] == pytest.approx(np.mean(a) - np.mean(b), abs=1e-9)
      if (np.std(np.subtract(a, b)) if paired else np.std(a) + np.std(b)) > 0:
        test = (stats.ttest_rel(a, b) if paired else stats.ttest_ind(a, b, equal_var=False))
        ci = test.confidence_interval(0.95)
        assert (d["low"], d["high"]) == pytest.approx((ci.low, ci.high), abs=1e-6)
      excludes = d["low"] > 0 or d["high"] < 0
      verdict = row[f"verdict_for_{cand}"]
      assert (verdict != "within noise") == excludes, (metric, d, verdict)
      if excludes:
        good = (d["low"] > 0) == ("fd_textures" not in metric)
        assert verdict == ("better" if good else "worse"), (metric, d, verdict)
  assert out["command"].startswith("python -m experiments.asyncpatch.latent_table2 ")
  table = open(tmp_path / "t2.md").read()
  assert "| fd_textures |" in table and "| square psnr |" in table

