"""The two benchmark scripts end to end on the tiny config (experiments/sampler_ablation.py, inpainting_benchmark.py)."""

import json
import os
import subprocess
import sys

import numpy as np

from asyncpatch_jax.diffusion import repaint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num_steps=4", "--batch=16", "--classifier_steps=5", "--families=square"]


def _run(script, *args):
  env = dict(os.environ, PYTHONPATH=ROOT)
  res = subprocess.run([sys.executable, os.path.join(ROOT, "experiments", script), *args],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-4000:]


def test_sampler_ablation_then_inpainting_benchmark(tmp_path):
  root = str(tmp_path / "workdirs")
  _run("sampler_ablation.py", f"--out={tmp_path}/ablation.json", "--config=configs/test.py",
       f"--workdir_root={root}", "--samplers=asyncpatch", "--train_steps=2", "--num_samples=20",
       "--num_inpaint=20", *TINY)
  ablation = json.load(open(tmp_path / "ablation.json"))
  model = ablation["models"]["asyncpatch"]
  assert model["train_steps"] == 2
  gen, inp = model["generation"], model["inpainting"]["square"]
  assert set(gen) == {"fd_digits", "precision_digits", "recall_digits", "density_digits",
                      "coverage_digits"} and np.isfinite(gen["fd_digits"])
  assert inp["network_evals"] == 4 and np.isfinite(inp["psnr"])
  assert os.path.exists(tmp_path / "ablation.md") and os.path.exists(tmp_path / "ablation.png")

  _run("inpainting_benchmark.py", f"--out={tmp_path}/inpainting.json",
       f"--workdirs=asyncpatch:{root}/asyncpatch", "--num_inpaint=20", "--repaint=4,2,2",
       "--num_stripes=2", *TINY)
  bench = json.load(open(tmp_path / "inpainting.json"))["models"]["asyncpatch"]
  evals = {m: bench[m]["square"]["network_evals"] for m in bench}
  # Network evaluations per image: 4 steps; twice that with input guidance (two passes a
  # step); 2 stripes x 2 steps; RePaint (4, 2, 2): 4 steps down + one jump of 2 back.
  assert evals == {"asyncpatch": 4, "asyncpatch_input_guidance": 8, "progressive": 4,
                   "repaint": repaint.num_model_steps(repaint.jump_schedule(4, 2, 2))}
  assert evals["repaint"] == 6
  # AsyncPatch Eq. 4 is the same computation in both scripts (same model, masks, key).
  assert abs(bench["asyncpatch"]["square"]["psnr"] - inp["psnr"]) < 1e-5
  assert os.path.exists(tmp_path / "inpainting.md")
