"""experiments/asyncpatch/latent_table2.py end to end with --tiny, as the AsyncPatch README writes
it: the five models over 2 seeds, their equal-cost step counts, the timesteps each trained with,
and the seed statistics and verdicts recomputed here with scipy (paired t for the
latent pair, Welch for the rest). Then adaptive_sampling.py on its tiny textures DiT with an
uncertainty head: the policies on the textures, scored with fd_textures."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats

from fixtures.readme import readme_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Both tests read one tiny run: keep them on one xdist worker (pytest.ini: --dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("latent_table2")]


def _python(*args):
  res = subprocess.run([sys.executable, *args], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                       capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-4000:]


@pytest.fixture(scope="module")
def table2(tmp_path_factory):
  """The README's command with --tiny: its output folder."""
  tmp_path = tmp_path_factory.mktemp("table2")
  cmd = readme_command("experiments/asyncpatch/latent_table2.py")
  _python(*cmd[1:], "--tiny", f"--out={tmp_path}/t2.json")
  return tmp_path


def test_latent_table2_tiny(table2):
  tmp_path = table2
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



def test_adaptive_policies_on_the_textures_dit(table2, tmp_path):
  """adaptive_sampling.py --tiny on the tiny textures DiT (seed 0) with a 2-step head: every row
  is scored with the textures' features, the comparisons carry fd_textures intervals and the
  rule's verdicts, and the digits' confident share is absent (the textures have no classes)."""
  model, head = table2 / "tiny_table2_workdirs" / "dit_flops_s0", tmp_path / "head"
  _python("-m", "asyncpatch_jax.main", "--config=configs/uncertainty_digits.py",
          f"--workdir={head}", f"--config.uncertainty.model_workdir={model}",
          "--config.train.num_steps=2", "--config.train.batch_size=16",
          "--config.uncertainty.channels=8")
  _python("-m", "experiments.asyncpatch.adaptive_sampling", f"--workdir={model}",
          f"--head_workdir={head}", f"--out={tmp_path}/adaptive.json", "--tiny")
  out = json.load(open(tmp_path / "adaptive.json"))
  s = out["settings"]
  assert (s["dataset"], s["model"], s["budgets"]) == ("textures", "dit", [4, 6])
  assert s["real_images"] == "textures test split (64)" and "fd_textures" in s["features"]
  rows = {(r["schedule"], r["budget"]): r for r in out["rows"]}
  for (name, budget), r in rows.items():
    assert {"fd_textures", "precision_textures", "coverage_textures"} <= set(r), name
    assert "confident_fraction" not in r and not any("digits" in k for k in r)
    if name.startswith("synchronous"):
      assert r["mean_steps_per_pixel"] == r["network_evaluations"] == budget
  assert out["comparison_at_equal_budget"]
  for c in out["comparison_at_equal_budget"]:
    r, sync = rows[c["schedule"], c["budget"]], rows["synchronous", c["budget"]]
    assert c["fd_textures_minus_synchronous"] == pytest.approx(
        r["fd_textures"] - sync["fd_textures"], abs=1e-9)
    # The first sampling seed's Frechet distance is the row's (two code paths).
    per_seed = c["fd_textures_per_seed"]
    assert per_seed["synchronous"]["values"][0] == pytest.approx(sync["fd_textures"], rel=1e-9)
    assert per_seed[c["schedule"]]["values"][0] == pytest.approx(r["fd_textures"], rel=1e-9)
    assert per_seed["synchronous"]["mean"] == pytest.approx(
        np.mean(per_seed["synchronous"]["values"]), abs=1e-9)
    d, pooled = c["fd_textures_difference"], c["fd_textures_pooled"]
    assert d["estimate"] == pytest.approx(pooled["policy"] - pooled["synchronous"], abs=1e-9)
    rule = "worse" if d["low"] > 0 else "better" if d["high"] < 0 else "within noise"
    assert c["verdict"] == rule, c
    assert "confident_difference" not in c and c["pooled_samples"] == 16
  table = open(tmp_path / "adaptive.md").read().splitlines()
  assert "| fd_textures |" in table[0] and "confident" not in table[0]
