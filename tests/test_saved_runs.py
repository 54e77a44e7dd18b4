"""Runs saved by earlier code still load, sample and evaluate, writing the same files.

tests/fixtures/saved_runs holds four small workdirs (a pixel model, an uncertainty head
on it, an autoencoder and a latent model on it) written on 2026-12-06, before the
library's modules were regrouped, and what `--mode=sample` and `--mode=evaluate` wrote
from them then (tests/fixtures/make_saved_runs.py). Today's command line must write the
same files with bitwise the same arrays and PNGs, and the same scores (to 1e-7 relative: the
float64 linear algebra behind them differs in the last bits between CPUs).
"""

import json
import os
import shutil

import numpy as np
import pytest

from asyncpatch_jax.config import base_config
from asyncpatch_jax.config import rules
from asyncpatch_jax.modes import train_mode
from asyncpatch_jax.runs import loader
from asyncpatch_jax.runtime import checks
from fixtures import make_saved_runs
from fixtures import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED = os.path.join(ROOT, "tests", "fixtures", "saved_runs")


def _copy(tmp_path) -> str:
  """The saved runs under tmp_path, their "{runs}" paths filled in."""
  runs = str(tmp_path / "runs")
  shutil.copytree(SAVED, runs, ignore=shutil.ignore_patterns("expected"))
  for name in ("head", "latent"):
    path = os.path.join(runs, name, "config.json")
    text = open(path).read()
    open(path, "w").write(text.replace("{runs}", runs))
  return runs


def _untimed(d):
  """`d` without its wall-clock entries (keys that name seconds) and the bootstrap intervals
  that evaluate.json gained after the fixtures were saved (`*_interval`, tested in
  tests/test_evaluators.py); every value the saved runs wrote must be unchanged."""
  if isinstance(d, dict):
    return {k: _untimed(v) for k, v in d.items()
            if "seconds" not in k and not k.endswith("_interval")}
  return d


def _same_values(got, want, path="") -> None:
  """Equal structure and values; a float score to 1e-7 relative. The sampled arrays and PNGs
  are compared bitwise; the scores computed from them in float64 (the Frechet distance's
  matrix square root) go through LAPACK, whose kernels differ in the last bits from one CPU
  to another (an Intel machine wrote the fixtures; an AMD one gives fd 2e-9 apart)."""
  if isinstance(want, dict):
    assert isinstance(got, dict) and sorted(got) == sorted(want), (path, got, want)
    for k in want:
      _same_values(got[k], want[k], f"{path}.{k}")
  elif isinstance(want, list):
    assert isinstance(got, list) and len(got) == len(want), (path, got, want)
    for i, (g, w) in enumerate(zip(got, want)):
      _same_values(g, w, f"{path}[{i}]")
  elif isinstance(want, float):
    assert got == pytest.approx(want, rel=1e-7, abs=1e-12), (path, got, want)
  else:
    assert got == want, (path, got, want)


def _same_json(got: str, want: str, runs: str, out: str) -> None:
  want_text = open(want).read().replace("{runs}/expected", out).replace("{runs}", runs)
  _same_values(_untimed(json.loads(open(got).read())), _untimed(json.loads(want_text)))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n, _ in make_saved_runs.output_commands("", "")])
def test_a_saved_run_samples_and_evaluates_as_it_did(name, tmp_path):
  runs = _copy(tmp_path)
  out = str(tmp_path / "out")
  args = dict(make_saved_runs.output_commands(runs, out))[name]
  res = cli.run(*args)
  assert res.returncode == 0, res.stderr[-3000:]
  want = os.path.join(SAVED, "expected", name)
  got = os.path.join(out, name)
  if name.endswith(".json"):
    _same_json(got, want, runs, out)
    assert sorted(os.listdir(out)) == sorted(
        p for p in os.listdir(os.path.join(SAVED, "expected")) if p.startswith(name[:-5]))
    return
  assert sorted(os.listdir(got)) == sorted(os.listdir(want))
  for file in os.listdir(want):
    if file.endswith(".json"):
      _same_json(os.path.join(got, file), os.path.join(want, file), runs, out)
    elif file.endswith(".npz"):
      a, b = np.load(os.path.join(got, file)), np.load(os.path.join(want, file))
      assert sorted(a) == sorted(b)
      for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    else:
      assert open(os.path.join(got, file), "rb").read() == \
          open(os.path.join(want, file), "rb").read(), file


@pytest.mark.parametrize("name, trainer", [("pixel", "diffusion"), ("head", "head"),
                                           ("autoencoder", "autoencoder"),
                                           ("latent", "diffusion")])
def test_a_saved_config_without_trainer_gets_it_inferred(name, trainer):
  path = os.path.join(SAVED, name, "config.json")
  assert "trainer" not in json.load(open(path))
  assert base_config.load_config_json(path).trainer == trainer
  assert train_mode.trainer_of(loader.read_config(os.path.join(SAVED, name))) == trainer


def test_the_trainer_key_picks_the_trainer_and_a_forgotten_head_trainer_is_one_line():
  assert tuple(train_mode.TRAINERS) == base_config.TRAINERS == rules.RULES["trainer"].names
  config = base_config.get_base_config()
  assert train_mode.trainer_of(config) == "diffusion"
  config.uncertainty.model_workdir = "/some/model"
  with pytest.raises(checks.InputError, match="set --config.trainer=head"):
    train_mode.trainer_of(config)
  config.trainer = "head"
  assert train_mode.trainer_of(config) == "head"
  assert train_mode.trainer_of(base_config.get_autoencoder_base_config()) == "autoencoder"


@pytest.mark.parametrize("name, moved", [
    ("pixel", {"classifier_samples": 0, "classifier_steps": 50}),
    ("autoencoder", {"reconstruct_images": 8}),
    ("head", {"classifier_samples": 512, "classifier_steps": 600})])
def test_a_saved_config_with_the_old_eval_section_has_it_moved_into_evaluate(name, moved):
  saved = json.load(open(os.path.join(SAVED, name, "config.json")))
  assert "eval" in saved
  config = base_config.load_config_json(os.path.join(SAVED, name, "config.json"))
  assert "eval" not in config
  assert {k: config.evaluate[k] for k in moved} == moved
  for key, value in saved.get("evaluate", {}).items():     # the other settings kept
    assert config.evaluate[key] == (tuple(value) if isinstance(value, list) else value), key


@pytest.mark.slow
def test_the_end_of_training_and_mode_evaluate_run_the_same_evaluator(tmp_path):
  """The digit classifier through --mode=evaluate and through the trainer's end of run, on
  the same saved run and settings: the same scores, bitwise."""
  from asyncpatch_jax.training import train  # pylint: disable=g-import-not-at-top
  runs = _copy(tmp_path)
  workdir = os.path.join(runs, "pixel")
  settings = {"evaluate.at_end": ("digit_classifier",),
              "evaluate.evaluators": ("digit_classifier",),
              "evaluate.classifier_samples": 6, "evaluate.classifier_steps": 5,
              "sample.batch_size": 4, "sample.num_steps": 3, "train.progress_bar": False}
  out = str(tmp_path / "evaluate.json")
  res = cli.run("--mode=evaluate", f"--workdir={workdir}", f"--config.evaluate.out={out}",
                *(f"--config.{k}={v}" for k, v in settings.items()))
  assert res.returncode == 0, res.stderr[-3000:]
  from_mode = json.load(open(out))
  config = loader.read_config(workdir)
  config.unlock()
  for key, value in settings.items():
    section, name = key.split(".")
    config[section][name] = value
  setup, state = train.load_trained(workdir, config)
  from etils import epath  # pylint: disable=g-import-not-at-top
  end_of_run = train._evaluate(setup.generator, state, config, setup, epath.Path(workdir))  # pylint: disable=protected-access
  keys = ("unconditional_confident_fraction", "conditional_label_accuracy",
          "classifier_held_out_accuracy", "num_samples", "sampler_steps")
  assert {k: from_mode[k] for k in keys} == {k: end_of_run[k] for k in keys}
  assert from_mode["num_samples"] == 6 and not os.path.exists(tmp_path / "evaluate.png")
