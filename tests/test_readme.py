"""Every command in the documentation's `sh` blocks runs (shortened by documented smoke flags).

The documentation is README.md, docs/*.md, ROADMAP.md and the READMEs of experiments/ and
tools/ (fixtures/readme.py); its `python` blocks (docs/api.md) run as one script. pip and
pytest commands are what .ci/run executes; every other command is run here from the
repository root with its outputs redirected to a temporary directory and smoke flags
appended (later absl flags override earlier ones): the main job's overrides below, and
`--tiny` for an experiment (with the few values its documented command sets that --tiny
cannot shrink), so a documented command that stops working fails this test. A command that
matches no rule, or names a script that does not exist, fails it too. The experiments in
fixtures/readme.py's RUN_ELSEWHERE are run, as documented, by the test that checks their
full tiny run (not twice).
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from asyncpatch_jax.config import base_config
from asyncpatch_jax.data import datasets
from asyncpatch_jax.data import image_io
from fixtures.readme import RUN_ELSEWHERE
from fixtures.readme import code_blocks
from fixtures.readme import readme_commands
from fixtures.readme import script_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_WORKDIR = "/tmp/asyncpatch_default"

# The README's model, one level smaller (compile time); the sample commands get the same
# model overrides, or they would rightly refuse the workdir's checkpoint.
MODEL_SMOKE = ["--config.model.channel_mult=(1,)", "--config.model.num_res_blocks=(1,)",
               "--config.model.attention_resolutions=()"]
TRAIN_SMOKE = MODEL_SMOKE + ["--config.train.num_steps=3", "--config.train.batch_size=16",
               "--config.train.checkpoint_every=3", "--config.evaluate.classifier_samples=8",
               "--config.evaluate.classifier_steps=40", "--config.sample.num_images=4",
               "--config.sample.batch_size=4", "--config.sample.num_steps=4"]
SAMPLE_SMOKE = MODEL_SMOKE + ["--config.sample.num_steps=4", "--config.sample.num_images=4",
                "--config.sample.batch_size=4"]
EVALUATE_SMOKE = ["--config.sample.num_steps=4", "--config.evaluate.num_samples=16",
                  "--config.evaluate.batch_size=16", "--config.evaluate.num_inpaint=8",
                  "--config.evaluate.feature_steps=5", "--config.evaluate.mask_families=('square',)"]
# The uncertainty head of the README (configs/uncertainty_digits.py), trained on the
# shortened main job's model, and its workdir.
README_HEAD_WORKDIR = "/tmp/asyncpatch_head"
HEAD_SMOKE = ["--config.train.num_steps=2", "--config.train.batch_size=16",
              "--config.uncertainty.channels=8"]
# Every experiment runs with --tiny (experiments/common.py: its values are defaults, so a
# flag the documented command sets wins); these are the flags a documented command sets
# that the smoke run must override (later flags win), by script.
TINY_OVERRIDES = {
    # --runs='': the runs go next to --out (the temporary directory), not /tmp.
    "experiments/asyncpatch/latent_textures.py": ["--runs=", "--pixel_steps=1"],
    "experiments/ipr/ipr_digits.py": ["--num_rounds=2", "--num_steps=4"],
    "experiments/benchmarks/bench_adaptive.py": ["--repeats=1"],
    "experiments/benchmarks/bench_host_devices.py": ["--variants=1,2"],
}


def _tiny(cmd):
  return ["--tiny", *TINY_OVERRIDES.get(script_of(cmd), [])]


def _kind(cmd):
  if cmd[0] in ("pip", "pytest"):
    return "ci"
  if cmd[:3] == ["python", "-m", "asyncpatch_jax.main"]:
    if "--mode=sample" in cmd:
      return "sample"
    if "--mode=evaluate" in cmd:
      return "evaluate"
    return "head" if "--config=configs/uncertainty_digits.py" in cmd else "train"
  script = script_of(cmd)
  if script is None or not os.path.isfile(os.path.join(ROOT, script)):
    return "unknown"
  if script in RUN_ELSEWHERE:
    return "elsewhere"
  if script.startswith("experiments/"):
    return "workdir" if any(a.startswith("--workdir=") for a in cmd) else "experiment"
  return "unknown"


COMMANDS = [c for i, c in enumerate(readme_commands()) if c not in readme_commands()[:i]]


def test_every_readme_command_is_covered():
  kinds = [_kind(c) for c in COMMANDS]
  assert "unknown" not in kinds, [c for c, k in zip(COMMANDS, kinds) if k == "unknown"]
  assert ["pip", "install", "-e", ".[test]"] in COMMANDS
  assert ["pytest", "-n", "2"] in COMMANDS
  assert "pytest -n 2" in open(os.path.join(ROOT, ".ci", "run")).read()
  assert kinds.count("train") == 1
  # A command run by another test: that test builds it with fixtures.readme.readme_command.
  for script, test_file in RUN_ELSEWHERE.items():
    assert f'readme_command("{script}")' in open(os.path.join(ROOT, test_file)).read(), script


def _run(cmd, tmp, workdir, extra):
  args = []
  for a in cmd[1:]:
    a = a.replace(README_WORKDIR, workdir).replace(README_HEAD_WORKDIR,
                                                   os.path.join(tmp, "head"))
    if a.startswith("--out="):
      a = "--out=" + os.path.join(tmp, "out", os.path.basename(a[len("--out="):]))
    a = re.sub(r"=(digit|mask)\.png$", lambda m: f"={os.path.join(tmp, m.group(1))}.png", a)
    args.append(a)
  if "--out" in args:
    i = args.index("--out")
    args[i + 1] = os.path.join(tmp, "out", os.path.basename(args[i + 1]))
  env = dict(os.environ, PYTHONPATH=ROOT)
  res = subprocess.run([sys.executable, *args, *extra], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
  assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
  return res


def _check_smoke_eval(result):
  """The shortened main job's eval.json: what it scored and how.

  Its model trained 3 steps, so the sample scores are only checked to be shares of the
  8 samples; the in-project classifier (40 steps here) must classify the held-out digits
  far above chance (0.1; it reaches ~0.88 at 40 steps, 0.97 at the main job's 600).
  """
  flags = dict(a[len("--config."):].split("=", 1) for a in TRAIN_SMOKE)
  n = int(flags["evaluate.classifier_samples"])
  assert (result["step"], result["dataset"], result["num_samples"], result["sampler_steps"]) == (
      int(flags["train.num_steps"]), "digits", n, int(flags["sample.num_steps"]))
  defaults = base_config.get_base_config().sample
  assert (result["eta"], result["guidance"]) == (defaults.eta, defaults.guidance)
  for key in ("unconditional_confident_fraction", "conditional_label_accuracy"):
    assert 0.0 <= result[key] <= 1.0 and (result[key] * n) % 1 == 0, (key, result[key])
  held_out = len(datasets.get_dataset("digits", "test"))
  acc = result["classifier_held_out_accuracy"]
  assert abs(acc * held_out - round(acc * held_out)) < 1e-6, acc     # a share of the test split
  assert acc > 0.6, acc


def test_readme_main_job_numbers_are_the_stored_runs_eval_json():
  """README's main-job table states what results/default_run/eval.json (the full run) holds."""
  text = open(os.path.join(ROOT, "README.md")).read()
  result = json.load(open(os.path.join(ROOT, "results", "default_run", "eval.json")))
  rows = dict(re.findall(r"`eval\.json` `(\w+)` \((\d+) samples", text))
  values = dict(re.findall(r"`eval\.json` `(\w+)`[^|]*\| \*\*([0-9.]+)\*\*", text))
  assert rows == {"unconditional_confident_fraction": str(result["num_samples"]),
                  "conditional_label_accuracy": str(result["num_samples"])}
  assert values == {k: f"{result[k]:.3f}" for k in rows}
  held_out = re.search(r"digit classifier, held-out accuracy[^|]*\| ([0-9.]+)", text).group(1)
  assert held_out == f"{result['classifier_held_out_accuracy']:.3f}"
  assert result["step"] == base_config.load_config_file(
      os.path.join(ROOT, "configs", "default.py")).train.num_steps


@pytest.mark.slow
def test_main_job_sample_mode_and_trained_model_analysis(tmp_path):
  """The main job (shortened), then every command that uses its workdir."""
  tmp, workdir = str(tmp_path), str(tmp_path / "workdir")
  rng = np.random.default_rng(0)
  image_io.save_png(rng.integers(0, 256, (16, 16, 1), dtype=np.uint8), f"{tmp}/digit.png")
  mask = np.zeros((16, 16, 1), np.uint8)
  mask[:, :8] = 255
  image_io.save_png(mask, f"{tmp}/mask.png")
  ran = 0
  for cmd in COMMANDS:
    kind = _kind(cmd)
    if kind == "train":
      _run(cmd, tmp, workdir, TRAIN_SMOKE)
      for name in ("samples", "samples_conditional", "inpainting", "autoregressive"):
        assert os.path.exists(f"{workdir}/samples/final/{name}.png")
      _check_smoke_eval(json.load(open(f"{workdir}/eval.json")))
    elif kind == "head":
      _run(cmd, tmp, workdir, HEAD_SMOKE)
    elif kind == "sample":
      _run(cmd, tmp, workdir, SAMPLE_SMOKE)
    elif kind == "evaluate":
      _run(cmd, tmp, workdir, EVALUATE_SMOKE)
      result = json.load(open(f"{workdir}/evaluate.json"))
      assert result["generation"]["num_samples"] == 16 and "fd_digits" in result["generation"]
      assert set(result["inpainting"]["families"]) == {"square"}
    elif kind == "workdir":
      _run(cmd, tmp, workdir, _tiny(cmd))
    else:
      continue
    ran += 1
  assert ran >= 4


EXPERIMENTS = [c for c in COMMANDS if _kind(c) == "experiment"]


@pytest.mark.slow
@pytest.mark.parametrize("cmd", EXPERIMENTS, ids=[" ".join(c[1:4]) for c in EXPERIMENTS])
def test_experiment_command_runs(cmd, tmp_path):
  _run(cmd, str(tmp_path), str(tmp_path / "workdir"), _tiny(cmd))
  outs = [a for a in cmd if a.startswith("--out")]
  assert outs and os.listdir(tmp_path / "out")


def test_readme_python_blocks_run_and_keep_what_they_promise():
  """The library snippets (docs/api.md), run as one script on one device (as a user's machine has)."""
  code = "\n".join(body for _, body in code_blocks("python"))
  assert "refiner.refine" in code and "block_norms" in code and "spin.make_schedule" in code
  assert "gen.generate" in code and "common.run" in code and "polygons_metrics" in code
  check = """
import numpy as np
out, x0, x = np.asarray(out), np.asarray(x0), np.asarray(x)
assert out.shape == (8, 4, 4, 1)
assert (out[:, :, :2] == 1).all()                        # known pixels bit-identical
np.testing.assert_array_equal(x[:, :2, :2], x0[:, :2, :2])  # condition region 0 untouched
assert not np.array_equal(x, x0)
# A trained run: the known half of each inpainting comes back exactly; eight samples scored.
inpainted = np.asarray(inpainted)
assert inpainted.shape == (4, h, w, c) and (inpainted[:, :, :w // 2] == 0).all()
assert not (inpainted[:, :, w // 2:] == 0).all()
assert evaluated["num_samples"] == 8 and 0 <= evaluated["conditional_label_accuracy"] <= 1
# Counting Polygons: the reader is exact on the data.
np.testing.assert_array_equal(poly_counts, poly_labels)
assert poly_scores == {"count_accuracy": 1.0, "mean_count_error": 0.0, "vertex_uniformity": 1.0}
# Metrics, masks and RePaint: the numbers the section promises.
assert np.isfinite(fd) and fd > 0 and set(scores) == {"precision", "recall", "density", "coverage"}
assert thin.shape == (4, 16, 16) and set(np.unique(thin)) <= {0.0, 1.0}
assert ts[:3].tolist() == [249, 248, 247] and ts[-1] == -1 and repaint.num_model_steps(ts) == 2410
painted = np.asarray(painted)
assert (painted[square == 1] == 1).all() and not (painted[square == 0] == 1).all()
# Jacobian tools: block norms of the Gaussian DDIM step are f_t(lambda_k), zero across patches.
norms = np.asarray(norms)
np.testing.assert_allclose(np.diag(norms), f, rtol=1e-5)
assert np.abs(norms - np.diag(np.diag(norms))).max() < 1e-6 and (f > 1).any() and (f < 1).any()
# Spin model: progressive L->R leaves a bias, parallel and interleaved reach m* (float32).
bias = {k: np.asarray(v) for k, v in bias.items()}
assert bias["progressive_lr"].min() > 0.5, bias
assert bias["parallel"].max() < 1e-4 and bias["interleaved"].max() < 1e-4, bias
assert abs(float(m_star[-1]) - 0.36) < 0.01                # the far block, Growing Images Fig. 2
print("ok")
"""
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="")
  res = subprocess.run([sys.executable, "-c", code + check], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]

