"""Every command in the documentation's `sh` blocks runs (shortened by documented smoke flags).

The documentation is README.md, docs/*.md, ROADMAP.md and the README.md of every folder
under experiments/ and tools/ (fixtures/readme.py). pip and pytest commands are what
.ci/run executes (the quick loop's `-m "not slow"` is collected here); every other command
is run here from the repository root with its outputs redirected to a temporary directory
and the smoke flags below appended (later absl flags override earlier ones), so a
documented command that stops working fails this test. A command that matches no rule
fails it too. The experiments in fixtures/readme.py's RUN_ELSEWHERE are run, as the
documentation writes them, by the test that checks their full tiny run (not twice).
Commands shown in other blocks (they need a GPU, a TPU pod, torch or real data) are
checked against the files, flags and config keys they name.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from asyncpatch_jax import base_config
from asyncpatch_jax.data import datasets
from asyncpatch_jax.data import image_io
from fixtures.readme import RUN_ELSEWHERE
from fixtures.readme import block_commands
from fixtures.readme import code_blocks
from fixtures.readme import readme_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README_WORKDIR = "/tmp/asyncpatch_default"

# The README's model, one level smaller (compile time); the sample commands get the same
# model overrides, or they would rightly refuse the workdir's checkpoint.
MODEL_SMOKE = ["--config.model.channel_mult=(1,)", "--config.model.num_res_blocks=(1,)",
               "--config.model.attention_resolutions=()"]
TRAIN_SMOKE = MODEL_SMOKE + ["--config.train.num_steps=3", "--config.train.batch_size=16",
               "--config.train.checkpoint_every=3", "--config.eval.num_samples=8",
               "--config.eval.classifier_steps=40", "--config.sample.num_images=4",
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
SMOKE = {
    "experiments/adaptive_sampling.py": ["--num_samples=8", "--batch_size=8", "--budgets=4,6",
                                         "--classifier_steps=5", "--panel_budget=6"],
    "experiments/bench_adaptive.py": ["--config=test", "--steps=6", "--repeats=1", "--batch=8"],
    "experiments/bench_metrics.py": ["--prdc_n=200", "--dim=32", "--repaint=8,2,2",
                                     "--feature_batch=1", "--repeats=1", "--feature_nets=digits",
                                     "--config=configs/test.py", "--compare_steps=8"],
    "experiments/timestep_statistics.py": ["--num_images=1024"],
    "experiments/latent_textures.py": ["--runs=", "--tiny", "--ae_steps=1", "--latent_steps=1",
                                       "--pixel_steps=1", "--num_images=2", "--num_steps=2",
                                       "--families=square"],
    "experiments/bench_latent.py": ["--tiny", "--batch=2", "--repeats=1", "--calls=1"],
    "experiments/pifs_tables.py": [],
    "experiments/blume_capel.py": ["--num_seeds=2", "--phase_diagram=false",
                                   "--num_seeds_check=8"],
    "experiments/bench_model.py": ["--configs=test", "--repeats=1"],
    "experiments/bench_train.py": ["--configs=test", "--dtypes=float32", "--steps=1",
                                   "--batch=test:8"],
    "experiments/ipr_digits.py": ["--num_samples=8", "--num_rounds=2", "--num_steps=4",
                                  "--classifier_steps=5"],
    "experiments/jacobian_regimes.py": ["--num_seeds=1", "--stride=250", "--power_iters=3",
                                        "--block_iters=3", "--lyap_vectors=2",
                                        "--lyap_iters=2", "--q_samples=1"],
}


def _script_key(path, table):
  """The key of `table` naming the same script as `path` (matched on the file name)."""
  return next((k for k in table if os.path.basename(k) == os.path.basename(path)), None)


def _smoke(cmd):
  return SMOKE[_script_key(cmd[1], SMOKE)]


def _kind(cmd):
  if cmd[0] in ("pip", "pytest"):
    return "ci"
  if cmd[:3] == ["python", "-m", "asyncpatch_jax.main"]:
    if "--mode=sample" in cmd:
      return "sample"
    if "--mode=evaluate" in cmd:
      return "evaluate"
    return "head" if "--config=configs/uncertainty_digits.py" in cmd else "train"
  if cmd[0] == "python" and len(cmd) > 1 and _script_key(cmd[1], RUN_ELSEWHERE):
    return "elsewhere"
  if cmd[0] == "python" and len(cmd) > 1 and _script_key(cmd[1], SMOKE):
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
  n = int(flags["eval.num_samples"])
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
      _run(cmd, tmp, workdir, _smoke(cmd))
    else:
      continue
    ran += 1
  assert ran >= 4


EXPERIMENTS = [c for c in COMMANDS if _kind(c) == "experiment"]


@pytest.mark.parametrize("cmd", EXPERIMENTS, ids=[" ".join(c[1:2]) for c in EXPERIMENTS])
def test_experiment_command_runs(cmd, tmp_path):
  _run(cmd, str(tmp_path), str(tmp_path / "workdir"), _smoke(cmd))
  outs = [a for a in cmd if a.startswith("--out")]
  assert outs and os.listdir(tmp_path / "out")


def test_readme_python_blocks_run_and_keep_what_they_promise():
  """The library snippets (docs/api.md), run as one script on one device (as a user's machine has)."""
  code = "\n".join(body for _, body in code_blocks("python"))
  assert "refiner.refine" in code and "block_norms" in code and "spin.make_schedule" in code
  check = """
import numpy as np
out, x0, x = np.asarray(out), np.asarray(x0), np.asarray(x)
assert out.shape == (8, 4, 4, 1)
assert (out[:, :, :2] == 1).all()                        # known pixels bit-identical
np.testing.assert_array_equal(x[:, :2, :2], x0[:, :2, :2])  # condition region 0 untouched
assert not np.array_equal(x, x0)
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


# The shell blocks that are shown but not run: they need a GPU, a TPU pod, torch,
# TensorFlow or real data, or run for many minutes.
SHOWN_LANGUAGES = ("text", "", "bash", "shell", "console")
# absl's own flags, accepted by every script.
ABSL_FLAGS = {"help", "helpfull", "helpshort", "verbosity", "v", "logtostderr", "alsologtostderr",
              "flagfile", "log_dir", "stderrthreshold", "only_check_args"}
SHOWN = [(path, cmd) for path, body in code_blocks(*SHOWN_LANGUAGES)
         for cmd in block_commands(body)]


def _defined_flags(script):
  text = open(os.path.join(ROOT, script)).read()
  names = set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", text))
  return names | {"no" + n for n in names} | ABSL_FLAGS


def _has_key(config, key):
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def _extras():
  text = open(os.path.join(ROOT, "setup.py")).read()
  block = text[text.index("EXTRAS_REQUIRE = {"):]
  return set(re.findall(r"^    \"(\w+)\": \[", block, flags=re.M))


def _markers():
  text = open(os.path.join(ROOT, "pytest.ini")).read()
  return set(re.findall(r"^    (\w+):", text, flags=re.M))


def _shown_problems(cmd):
  """What is wrong with a shown command: a missing file, an unknown flag, key or extra."""
  while cmd and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", cmd[0]) or cmd[0] == "taskset"):
    cmd = cmd[3:] if cmd[0] == "taskset" else cmd[1:]
  cmd = [a for a in cmd if a != "&"]
  if not cmd:
    return []
  if cmd[0] in ("python", "python3") and cmd[1:3] == ["-m", "asyncpatch_jax.main"]:
    flags = [a[2:].split("=", 1) for a in cmd[3:] if a.startswith("--")]
    config_path = dict(f for f in flags if len(f) == 2).get("config")
    problems = []
    if config_path and not os.path.isfile(os.path.join(ROOT, config_path)):
      return [f"no config file {config_path}"]
    config = (base_config.load_config_file(os.path.join(ROOT, config_path)) if config_path
              else base_config.get_base_config())
    main_flags = _defined_flags("asyncpatch_jax/main.py") | {"config"}
    for name, *_ in flags:
      if name.startswith("config."):
        if not _has_key(config, name[len("config."):]):
          problems.append(f"--{name}: no such config key")
      elif name not in main_flags:
        problems.append(f"--{name}: not a flag of asyncpatch_jax.main")
    return problems
  if cmd[0] in ("python", "python3") and cmd[1].endswith(".py"):
    if not os.path.isfile(os.path.join(ROOT, cmd[1])):
      return [f"no script {cmd[1]}"]
    defined = _defined_flags(cmd[1])
    return [f"--{name}: not a flag of {cmd[1]}" for name in
            (a[2:].split("=", 1)[0] for a in cmd[2:] if a.startswith("--")) if name not in defined]
  if cmd[:2] == ["pip", "install"]:
    extras = [e for a in cmd[2:] if a.startswith(".[")
              for e in a[2:].rstrip("]").split(",")]
    return [f"no extra [{e}] in setup.py" for e in extras if e not in _extras()]
  if cmd[0] == "pytest":
    expr = cmd[cmd.index("-m") + 1] if "-m" in cmd else ""
    words = set(re.findall(r"\w+", expr)) - {"not", "and", "or"}
    return [f"marker {w} is not declared in pytest.ini" for w in words - _markers()]
  if cmd[0].endswith(".sh") or cmd[0].startswith(("launch/", "tools/", "./")):
    path = os.path.join(ROOT, cmd[0])
    if not os.path.isfile(path):
      return [f"no script {cmd[0]}"]
    res = subprocess.run(["bash", "-n", path], capture_output=True, text=True)
    return [] if res.returncode == 0 else [f"{cmd[0]}: {res.stderr.strip()}"]
  return []   # other tools (tfds, gcloud, ...) and lines that are not commands


def test_shown_commands_name_real_files_flags_and_keys():
  """Commands the tests cannot run still name existing scripts, flags, config keys, extras."""
  assert SHOWN, "no shown commands found"
  problems = [(path, " ".join(cmd), p) for path, cmd in SHOWN for p in _shown_problems(cmd)]
  assert not problems, problems


def test_shown_command_checks_catch_mistakes():
  """The check above fails on a wrong script, flag, config key, extra or marker."""
  wrong = [["python", "experiments/no_such_script.py"],
           ["python", "experiments/bench_train.py", "--no_such_flag=1"],
           ["python", "-m", "asyncpatch_jax.main", "--config=configs/default.py",
            "--config.train.no_such_key=1"],
           ["python", "-m", "asyncpatch_jax.main", "--no_such_flag"],
           ["pip", "install", "-e", ".[no_such_extra]"],
           ["pytest", "-m", "not no_such_marker"],
           ["launch/no_such_launcher.sh"]]
  assert all(_shown_problems(c) for c in wrong), [c for c in wrong if not _shown_problems(c)]
  assert not _shown_problems(["python", "experiments/bench_train.py", "--out=x.json"])


PYTEST_COMMANDS = [c for c in COMMANDS if c[0] == "pytest"]


@pytest.mark.parametrize("cmd", PYTEST_COMMANDS, ids=[" ".join(c) for c in PYTEST_COMMANDS])
def test_documented_pytest_commands_collect(cmd):
  """The documented test commands, collected on two files (the whole run is .ci/run's)."""
  args = list(cmd[1:])
  if "-n" in args:
    args[args.index("-n") + 1] = "0"
  res = subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only", "-q",
                        "tests/test_help.py", "tests/test_run_lock.py"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=300)
  assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
  summary = res.stdout.strip().splitlines()[-1]
  assert "collected" in summary and not summary.startswith("0"), summary
  if "-m" in args:
    assert "deselected" in summary, summary     # the quick loop leaves the slow tests out


def _anchors(path):
  """GitHub's anchors of a Markdown file's headings."""
  text = re.sub(r"^```.*?^```", "", open(path).read(), flags=re.S | re.M)
  return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
          for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_relative_links_resolve():
  """Every relative link of the documentation names an existing file (and heading)."""
  from fixtures.readme import doc_files
  broken = []
  for rel in doc_files():
    text = re.sub(r"^```.*?^```", "", open(os.path.join(ROOT, rel)).read(), flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z]+:", target):
        continue
      path, _, anchor = target.partition("#")
      full = os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), path)) if path else \
          os.path.join(ROOT, rel)
      if not os.path.exists(full):
        broken.append((rel, target, "no such file"))
      elif anchor and full.endswith(".md") and anchor not in _anchors(full):
        broken.append((rel, target, "no such heading"))
  assert not broken, broken
