"""The two benchmark scripts end to end on the tiny config (experiments/asyncpatch/
sampler_ablation.py, inpainting_benchmark.py), run as experiments/asyncpatch/README.md writes
them with --tiny (the test config, 2 training steps, 4 sampler steps, the square family)."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

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
  # --tiny: the workdirs go to <dir of --out>/tiny_workdirs, where inpainting_benchmark.py
  # --tiny finds the asyncpatch model.
  _run(readme_command("experiments/asyncpatch/sampler_ablation.py"),
       f"--out={tmp_path}/ablation.json")
  ablation = json.load(open(tmp_path / "ablation.json"))
  model = ablation["models"]["asyncpatch"]
  assert list(ablation["models"]) == ["asyncpatch"] and model["train_steps"] == 2
  assert model["workdir"] == str(tmp_path / "tiny_workdirs" / "asyncpatch")
  gen, inp = model["generation"], model["inpainting"]["square"]
  assert set(gen) == {"fd_digits", "precision_digits", "recall_digits", "density_digits",
                      "coverage_digits"} and np.isfinite(gen["fd_digits"])
  assert inp["network_evals"] == 4 and np.isfinite(inp["psnr"])
  assert os.path.exists(tmp_path / "ablation.md") and os.path.exists(tmp_path / "ablation.png")
  assert ablation["command"].startswith("python -m experiments.asyncpatch.sampler_ablation ")

  # The README's --repaint=50,5,5, made tiny.
  _run(readme_command("experiments/asyncpatch/inpainting_benchmark.py"),
       f"--out={tmp_path}/inpainting.json", "--repaint=4,2,2")
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
