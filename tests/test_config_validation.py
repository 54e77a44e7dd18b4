"""Every config key has a rule (rules.RULES) that accepts its default and refuses a
wrong type and an out-of-range value in one line naming the key; main.py applies the rules
in every mode before anything is built or read from the workdir.

The keys are walked from the built configs (get_base_config(), get_autoencoder_base_config()
and configs/*.py), not from RULES; the bad values are derived from each rule's kind.
"""

import glob
import json
import math
import os
import subprocess

import ml_collections
import pytest

from asyncpatch_jax.config import base_config
from asyncpatch_jax.config import rules
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.config.rules import (Bool, Choice, ClassLabel, Int, Ints, Names, Number,
                                        Numbers, Options, Text)
from fixtures import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAKERS = (base_config.get_base_config, base_config.get_autoencoder_base_config)
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
# Keys that other branches are declaring: their rules are in RULES, unused until then.
ANNOUNCED = {"train.skip_memory_check"}


def _leaves(config, prefix: str = "") -> dict:
  """{dotted key: value} of `config`; a section is walked unless it has a rule (data.options)."""
  out = {}
  for name, value in config.items():
    key = prefix + name
    if isinstance(value, ml_collections.ConfigDict) and key not in rules.RULES:
      out.update(_leaves(value, key + "."))
    else:
      out[key] = value
  return out


KEYS = [(make.__name__, key) for make in MAKERS for key in _leaves(make())]


def _with(make_name: str, key: str, value) -> ml_collections.ConfigDict:
  """The base config with `key` set to `value`, of any type (as a config file or JSON can)."""
  d = getattr(base_config, make_name)().to_dict()
  *sections, name = key.split(".")
  node = d
  for s in sections:
    node = node[s]
  node[name] = value
  return ml_collections.ConfigDict(d, type_safe=False)


def _a_valid(rule) -> tuple:
  """A valid tuple for a sequence rule (Ints), to break one thing at a time."""
  n = max(rule.lengths) if rule.lengths is not None else max(rule.min_length, 1)
  return (max(rule.low, 1) | (1 if rule.odd else 0),) * n


def wrong_types(rule) -> list:
  """Values of another type than the rule's kind (a bool is not an int, a str not a tuple)."""
  if isinstance(rule, Int):
    return ["x", 2.0, True, None, (rule.low,)]
  if isinstance(rule, Number):
    return ["x", True, None, (0.5,)]
  if isinstance(rule, Choice):
    return [3, None, True, (rule.names[0],)]
  if isinstance(rule, Bool):
    return [1, 0, "True", None]
  if isinstance(rule, Text):
    return [3, None, True, ("a.png",)]
  if isinstance(rule, Ints):
    valid = _a_valid(rule)
    return ["abc", 3, None, tuple(float(v) for v in valid), tuple(str(v) for v in valid),
            (True,) * len(valid)]
  if isinstance(rule, Numbers):
    return [0.5, "ab", None, ("a",) * rule.length, (True,) * rule.length]
  if isinstance(rule, Names):
    return [rule.names[0], 3, None, (3,)]
  if isinstance(rule, ClassLabel):
    return [1.5, True, None, ("auto",)]
  if isinstance(rule, Options):
    return ["x", 3, None, [("a", 1)]]
  raise AssertionError(f"no wrong-type values for the rule kind {type(rule).__name__}")


def out_of_range(rule) -> list[tuple[object, str]]:
  """(value, a part of the message) of values of the right type but outside the rule."""
  if isinstance(rule, Int):
    bad = [(rule.low - 1, "")]
    return bad + ([(rule.high + 1, "")] if rule.high is not None else [])
  if isinstance(rule, Number):
    bad = [(math.inf, ""), (math.nan, "")]
    if rule.low is not None:
      bad.append((rule.low if rule.low_open else rule.low - 1, ""))
    if rule.high is not None:
      bad.append((rule.high if rule.high_open else rule.high + 1, ""))
    return bad
  if isinstance(rule, (Choice, ClassLabel)):
    name = rule.names[0]
    bad = [(name + "x", f"Did you mean {name!r}"), ("", "")]
    return bad + ([("-1", ""), (-1, "")] if isinstance(rule, ClassLabel) else [])
  if isinstance(rule, Ints):
    valid = _a_valid(rule)
    bad = [((rule.low - 1,) + valid[1:], "")]
    if rule.lengths is not None:
      bad.append((valid + (valid[0],), ""))
    elif rule.min_length:
      bad.append(((), ""))
    if rule.odd:
      bad.append(((2,) + valid[1:], ""))
    return bad
  if isinstance(rule, Numbers):
    return [((0.0,) * (rule.length + 1), ""), ((math.inf,) * rule.length, "")]
  if isinstance(rule, Names):
    name = rule.names[0]
    bad = [((name, name + "x"), f"Unknown: {name + 'x'!r}. Did you mean {name!r}")]
    return bad + ([((), "")] if rule.min_length else [])
  if isinstance(rule, (Bool, Text, Options)):
    return []          # every value of the type is valid
  raise AssertionError(f"no out-of-range values for the rule kind {type(rule).__name__}")


def _refused(make_name: str, key: str, value) -> str:
  with pytest.raises(checks.InputError) as e:
    rules.validate(_with(make_name, key, value))
  message = str(e.value)
  assert message.startswith(f"{key}="), (key, value, message)
  assert "; expected " in message and "\n" not in message, (key, value, message)
  return message


@pytest.mark.parametrize("make", MAKERS, ids=lambda m: m.__name__)
def test_every_key_has_a_rule_that_accepts_its_default(make):
  leaves = _leaves(make())
  missing = sorted(set(leaves) - set(rules.RULES))
  assert not missing, f"keys without a rule in rules.RULES: {missing}"
  for key, default in leaves.items():
    assert rules.RULES[key].accepts(default), (key, default)
  rules.validate(make())


def test_every_rule_names_a_key():
  """A rule for a key no config declares (a typo) would check nothing."""
  declared = {key for make in MAKERS for key in _leaves(make())}
  assert set(rules.RULES) - declared <= ANNOUNCED, set(rules.RULES) - declared


@pytest.mark.parametrize("make_name,key", KEYS, ids=[f"{m[4:-7]}:{k}" for m, k in KEYS])
def test_a_wrong_type_or_an_out_of_range_value_is_one_line_naming_the_key(make_name, key):
  rule = rules.RULES[key]
  for value in wrong_types(rule):
    _refused(make_name, key, value)
  for value, part in out_of_range(rule):
    assert part in _refused(make_name, key, value), (key, value)


def test_messages_say_what_is_expected():
  cases = {
      ("sample.eta", 2.0): "sample.eta=2.0; expected a number in [0, 1].",
      ("optim.learning_rate", -0.001): "optim.learning_rate=-0.001; expected a number > 0.",
      ("train.batch_size", True): "train.batch_size=True; expected a positive integer.",
      ("train.progress_bar", 1): "train.progress_bar=1; expected True or False.",
      ("sample.grid", (2, 0)): "sample.grid=(2, 0); expected a tuple of 2 positive integers.",
      ("sample.box", (1,)): "sample.box=(1,); expected () or a tuple of 2 integers >= 0.",
      ("evaluate.num_samples", 1): "evaluate.num_samples=1; expected an integer >= 2.",
      ("timesteps.sampler", "perlinn"):
          "timesteps.sampler='perlinn'; expected one of 'global', 'independent', 'patchwise', "
          "'perlin', 'asyncpatch'. Did you mean 'perlin'?",
      ("data.dataset", "digitz"): "data.dataset='digitz'; expected one of "
          + ", ".join(repr(n) for n in rules.datasets.DATASETS) + ". Did you mean 'digits'?",
      ("data.options", "x"): "data.options='x'; expected a dict of keyword arguments, e.g. "
                             "{'grid_size': 4}.",
  }
  for (key, value), message in cases.items():
    assert _refused("get_base_config", key, value) == message
  assert _refused("get_autoencoder_base_config", "autoencoder.encoder_kernels", (3, 2, 1)) == (
      "autoencoder.encoder_kernels=(3, 2, 1); expected a non-empty tuple of positive odd "
      "integers.")
  # A free-form dict is one value: its entries are the dataset's business (one line).
  rules.validate(_with("get_base_config", "data.options", {"grid_size": 4}))
  with pytest.raises(checks.InputError, match=r"^data=3; expected a section"):
    rules.validate(_with("get_base_config", "data", 3))


def test_the_name_lists_match_the_modules_that_define_them():
  from asyncpatch_jax.modes import sample_mode  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax import models  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.data import masks  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.data import training_masks  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.diffusion import timesteps  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.evaluation import inpainting_eval  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.evaluation.evaluators import common as evaluators  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.evaluation.evaluators import generation  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.models import dit  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.models import vqae  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.training import autoencoder_losses as ae_losses  # pylint: disable=g-import-not-at-top
  b = rules
  assert b.TIMESTEP_SAMPLERS == timesteps.SAMPLER_NAMES
  assert b.SAMPLE_TASKS == tuple(sample_mode.TASKS)
  assert b.ADAPTIVE_POLICIES == sample_mode.ADAPTIVE_POLICIES
  assert b.IPR_ORDERS == sample_mode.IPR_ORDERS
  assert b.DTYPES == tuple(models._DTYPES) == tuple(vqae._DTYPES)  # pylint: disable=protected-access
  assert b.MASK_FAMILIES == masks.FAMILIES
  assert b.TRAINING_MASK_FAMILIES == training_masks.OWN_FAMILIES + masks.FAMILIES
  assert b.INPAINT_METHODS == inpainting_eval.METHODS
  assert b.REFERENCE_SPLITS == generation.REFERENCE_SPLITS
  assert b.EVALUATORS == tuple(evaluators.EVALUATORS)
  assert b.BETA_CONVENTIONS == ae_losses.BETA_CONVENTIONS
  assert b.MODEL_NAMES == tuple(models.MODELS)
  assert b.REMAT == models.REMAT
  assert b.MODULATIONS == dit.MODULATIONS
  assert b.CLEAN_FAMILIES == timesteps.CLEAN_FAMILIES


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_every_config_file_passes(path):
  config = base_config.load_config_file(path)
  leaves = _leaves(config)
  assert not set(leaves) - set(rules.RULES), set(leaves) - set(rules.RULES)
  rules.validate(config)


def test_a_saved_config_json_with_a_wrong_type_is_refused(tmp_path):
  """ml_collections lets a bool into an int key and None into any key; JSON can hold both."""
  for section, values, message in (
      ("train", {"batch_size": True}, "train.batch_size=True; expected a positive integer."),
      ("sample", {"eta": None}, "sample.eta=None; expected a number in [0, 1]."),
      ("model", {"channel_mult": ["1", "2"]}, "model.channel_mult=('1', '2'); expected a "
                                               "non-empty tuple of positive integers.")):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({section: values}))
    with pytest.raises(checks.InputError) as e:
      rules.validate(base_config.load_config_json(str(path)))
    assert str(e.value) == message


def _cli(*args: str) -> subprocess.CompletedProcess:
  return cli.run(*args, timeout=120)


@pytest.mark.slow
def test_the_command_line_refuses_bad_values_first_in_every_mode(tmp_path):
  """One `error:` line naming the key, exit 1, no traceback, before jax starts or the
  workdir is read: the sample and evaluate workdirs do not exist, so any later check would
  fail differently (no checkpoint)."""
  workdir = str(tmp_path / "never")
  saved = tmp_path / "config.json"
  saved.write_text(json.dumps({"evaluate": {"num_samples": True}}))
  cases = [
      (("--mode=train", "--config.train.batch_size=0"),
       "error: train.batch_size=0; expected a positive integer."),
      (("--mode=train", "--config.train.batch_size=abc"),          # parsed by ml_collections
       "error: flag --config.train.batch_size=abc: invalid literal for int()"),
      (("--mode=sample", "--config.sample.eta=2"),
       "error: sample.eta=2.0; expected a number in [0, 1]."),
      (("--mode=sample", "--config.sample.grid=(a,b)"),
       "error: sample.grid=('(a,b)',); expected a tuple of 2 positive integers."),
      (("--mode=evaluate", "--config.evaluate.num_samples=-1"),
       "error: evaluate.num_samples=-1; expected an integer >= 2."),
      (("--mode=evaluate", f"--config={saved}"),
       "error: evaluate.num_samples=True; expected an integer >= 2."),
  ]
  for args, message in cases:
    own = any(a.startswith("--config=") for a in args)
    res = _cli(*(() if own else ("--config=configs/test.py",)), f"--workdir={workdir}", *args)
    last = res.stderr.rstrip("\n").split("\n")[-1]
    assert res.returncode == 1, (args, res.stderr[-2000:])
    assert last.startswith(message), (args, last)
    assert "Traceback" not in res.stderr, (args, res.stderr[-2000:])
    assert "backend cpu" not in res.stderr, (args, res.stderr)     # before jax started
  assert not os.path.exists(workdir)
