"""Issue 15's experiments end to end on a tiny model (experiments/growing_images/
schedule_study.py, experiments/asyncpatch/texture_synthesis.py): the JSON holds every field
the README tables read, and bad input stops with one line before anything trains."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from asyncpatch_jax.data import image_io
from fixtures.readme import readme_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEDULE_STUDY = "experiments/growing_images/schedule_study.py"
TEXTURE_SYNTHESIS = "experiments/asyncpatch/texture_synthesis.py"


def _run(script, *args, ok=True, readme=False):
  """`script` --tiny --noprogress `args`; with readme=True, the README's command made tiny."""
  env = dict(os.environ, PYTHONPATH=ROOT)
  cmd = (readme_command(script)[1:] if readme
         else ["-m", script[:-len(".py")].replace("/", ".")])
  res = subprocess.run([sys.executable, *cmd, "--tiny", "--noprogress", *args], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=900)
  if ok:
    assert res.returncode == 0, res.stderr[-4000:]
  return res


ROW_FIELDS = ("K", "steps_per_stripe", "steps_per_pixel", "steps_per_pixel_max",
              "network_evaluations", "psnr", "psnr_se", "ssim", "ssim_se", "seconds")


@pytest.mark.slow
def test_schedule_study_then_texture_synthesis_tiny(tmp_path):
  model = str(tmp_path / "model")
  # The README's command with the --tiny values of the flags it sets (later flags win).
  assert readme_command("experiments/growing_images/schedule_study.py")[4:] == [
      "--num_images=200", "--steps_per_stripe=6", "--total_steps=36"]
  _run(SCHEDULE_STUDY, "--num_images=24", "--steps_per_stripe=2", "--total_steps=4",
       f"--out={tmp_path}/ss/schedule_study.json", f"--workdir={model}", readme=True)
  res = json.load(open(tmp_path / "ss" / "schedule_study.json"))
  names = res["features"]["metric_names"]
  assert res["features"]["name"] == "textures" and names["frechet"] == "fd_textures"
  t, total = res["settings"]["steps_per_stripe"], res["settings"]["total_steps"]
  for table in ("per_stripe", "fixed_total"):
    for kind in ("progressive", "interleaved"):
      rows = res["tables"][table][kind]
      assert [r["K"] for r in rows] == ([1, 2] if kind == "progressive" else [2])
      for r in rows:
        for f in ROW_FIELDS + tuple(names.values()) + tuple(f"{n}_se" for n in names.values()):
          assert f in r and np.isfinite(r[f]), (table, kind, f)
        per = t if table == "per_stripe" else total // r["K"]
        # Every hidden pixel moves in exactly the stated steps (counted from the schedule).
        assert r["steps_per_pixel"] == r["steps_per_pixel_max"] == per == r["steps_per_stripe"]
        assert r["network_evaluations"] == r["K"] * per
        if r["K"] > 1:
          for f in ("d_psnr", "d_psnr_se", "d_ssim", f"d_{names['frechet']}",
                    f"d_{names['frechet']}_se"):
            assert np.isfinite(r[f]), f
      v = res["verdict"][table][kind]
      assert set(v["directions"]) == {"psnr", "ssim", *names.values()}
      assert isinstance(v["agrees_with_paper"], bool)
  # The lab's prediction next to interleaved (Growing Images Sec. 4.3, Fig. 4): progressive
  # L->R keeps a bias, interleaved and parallel reach m* (float32 precision).
  lab = res["lab"]["2"]
  assert lab["progressive_lr"] > 0.05 and lab["interleaved"] < 1e-4 and lab["parallel"] < 1e-4
  assert {"fd_textures", "precision_textures", "images"} <= set(res["reference"])
  assert res["wall_seconds"] > 0
  assert res["command"].startswith("python -m experiments.growing_images.schedule_study ")
  for f in ("schedule_study.md", "metrics_vs_K.png", "examples_per_stripe.png",
            "examples_fixed_total.png"):
    assert os.path.exists(tmp_path / "ss" / f), f

  # The README's command (its two exemplar files as the user's images), made tiny.
  command = readme_command("experiments/asyncpatch/texture_synthesis.py")
  users = [a[len("--image="):] for a in command if a.startswith("--image=")]
  assert len(users) == 2 and all(os.path.isfile(os.path.join(ROOT, u)) for u in users)
  _run(TEXTURE_SYNTHESIS, f"--out={tmp_path}/ts/texture_synthesis.json",
       f"--workdir={model}", readme=True)
  res = json.load(open(tmp_path / "ts" / "texture_synthesis.json"))
  assert [r["w"] for r in res["weights"]] == [0.0, 2.0]
  for r in res["weights"]:
    for f in ("patch_swd", "colour_w1", "seam_ratio", "seam_l1", "seed_spread"):
      for g in (f, f"{f}_se", f"d_{f}", f"d_{f}_se"):
        assert np.isfinite(r[g]), g
  assert res["weights"][0]["d_patch_swd"] == 0.0                 # w = 0 against itself
  abl = res["guidance_t_ablation"]                               # w = 2 at t_g 0.6 and 0.9
  assert [(r["w"], r["guidance_t"]) for r in abl] == [(2.0, 0.6), (2.0, 0.9)]
  assert abl[0]["patch_swd"] == res["weights"][1]["patch_swd"]
  assert all(np.isfinite(r["patch_swd"]) and np.isfinite(r["d_seam_l1_se"]) for r in abl)
  for f in ("top_vs_bottom_patch_swd", "top_vs_bottom_colour_w1", "real_seam_ratio",
            "real_seam_l1", "other_texture_patch_swd"):
    assert np.isfinite(res["reference"][f]) and np.isfinite(res["reference"][f + "_se"])
  assert res["num_exemplars"] == 7 and len(res["per_source"]) == 7      # one per source image
  assert len(res["user_images"]) == 2
  assert all(len(u["patch_swd"]) == 2 for u in res["user_images"])
  for f in ("texture_synthesis.md", "grid_textures.png", "grid_user.png", "statistics_vs_w.png"):
    assert os.path.exists(tmp_path / "ts" / f), f


@pytest.mark.slow
def test_bad_input_is_refused_in_one_line(tmp_path):
  small = tmp_path / "small.png"
  image_io.save_png(np.zeros((20, 48, 3), np.uint8), str(small))
  cases = [(TEXTURE_SYNTHESIS, ["--weights=0,-1"], "input guidance weight w=-1.0; expected "
            "a number >= 0"),
           (TEXTURE_SYNTHESIS, [f"--image={small}"], "is 48x20 (WxH), smaller than the "
            "model's 32x32"),
           (SCHEDULE_STUDY, ["--stripes=1,17"], "num_stripes=17 is larger than the masked "
            "width")]
  for script, args, message in cases:
    res = _run(script, f"--out={tmp_path}/x/out.json", f"--workdir={tmp_path}/never", *args,
               ok=False)
    assert res.returncode == 1 and message in res.stderr, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    assert not os.path.exists(tmp_path / "never")                  # refused before training
