"""`-h` / `--help` (main.help_text): the modes, the sampling tasks and every config key with its
default and one line of meaning, the meanings read from base_config.py's own comments.

The reference for the keys and defaults is the configs themselves (`_leaves` walks
get_base_config() and get_autoencoder_base_config()), not describe.describe_keys.
"""

import os
import re
import subprocess
import sys

import ml_collections
import pytest

from asyncpatch_jax.config import base_config
from asyncpatch_jax.config import describe
from asyncpatch_jax import main
from asyncpatch_jax.modes import cli as cli_lib
from asyncpatch_jax.modes import sample_mode
from fixtures import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = (base_config.get_base_config, base_config.get_autoencoder_base_config)


def _leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict:
  """{dotted key: default} of every key of `config`; an empty dict (data.options) is one key."""
  out = {}
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict) and list(value.keys()):
      out.update(_leaves(value, f"{prefix}{name}."))
    else:
      out[prefix + name] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) \
          else value
  return out


def _not_shown(text: str, config: ml_collections.ConfigDict) -> list[str]:
  """The `key=default` of every key of `config` that `text` has no line for (with a meaning)."""
  return [f"{key}={default!r}" for key, default in _leaves(config).items()
          if not re.search(rf"^  {re.escape(f'{key}={default!r}')} {{2,}}\S", text, re.M)]


def _cli(*args: str) -> subprocess.CompletedProcess:
  return cli.run(*args, timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize("args", [("-h",), ("--help",), ("--mode=sample", "--config=nope.py", "-h")])
def test_help_exits_0_with_the_modes_and_every_task(args):
  res = _cli(*args)        # no --workdir: help needs none
  assert res.returncode == 0, res.stderr
  assert res.stdout == main.help_text() + "\n"
  for name in ("train", "sample", "evaluate", *sample_mode.TASKS):
    assert re.search(rf"^  {name} {{2,}}\S", res.stdout, re.M), name
  assert not _not_shown(res.stdout, base_config.get_base_config())


@pytest.mark.slow
def test_help_does_not_load_jax():
  code = ("import runpy, sys\n"
          "sys.argv = ['main', '--help']\n"
          "try:\n"
          "  runpy.run_module('asyncpatch_jax.main', run_name='__main__')\n"
          "except SystemExit as e:\n"
          "  print('exit', e.code, 'jax' in sys.modules, file=sys.stderr)\n")
  res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), timeout=120)
  assert res.stderr.split()[-3:] == ["exit", "0", "False"], res.stderr


@pytest.mark.parametrize("make", CONFIGS, ids=lambda f: f.__name__)
def test_help_lists_every_key_with_its_default_and_a_meaning(make):
  text = main.help_text()
  assert not _not_shown(text, make())
  assert "asyncpatch_jax/config/base_config.py" in text and "--config.section.key=value" in text


@pytest.mark.parametrize("make", CONFIGS, ids=lambda f: f.__name__)
def test_every_key_has_a_meaning_from_base_config_comments(make):
  rows = describe.describe_keys(make)
  assert [key for key, _, _ in rows] == list(dict.fromkeys(key for key, _, _ in rows))
  assert {key: default for key, default, _ in rows} == _leaves(make())
  assert [key for key, _, meaning in rows if not meaning.strip()] == []


def test_help_lists_the_tasks_of_sample_mode():
  assert cli_lib._sample_tasks() == sample_mode.TASKS  # pylint: disable=protected-access
  assert all(meaning.strip() for meaning in sample_mode.TASKS.values())


def test_a_key_missing_from_help_is_caught(monkeypatch):
  original = describe.describe_keys
  monkeypatch.setattr(describe, "describe_keys",
                      lambda make=base_config.get_base_config: [
                          row for row in original(make) if row[0] != "train.ema_decay"])
  assert _not_shown(main.help_text(), base_config.get_base_config()) == ["train.ema_decay=0.999"]
  monkeypatch.setattr(describe, "describe_keys",
                      lambda make=base_config.get_base_config: [
                          (k, d, "" if k == "seed" else m) for k, d, m in original(make)])
  assert _not_shown(main.help_text(), base_config.get_base_config()) == ["seed=0"]


def test_comments_are_paired_with_their_keys(tmp_path, monkeypatch):
  planted = tmp_path / "planted_config.py"
  planted.write_text(
      "def get_base_config():\n"
      "  config.seed = 0  # the seed\n"
      "  config.a = dict(\n"
      "      # A heading, not a meaning.\n"
      "      x=(1,\n"
      "         2),  # two lines of value,\n"
      "              # and two of comment\n"
      "      # another heading\n"
      "      y=3,\n"
      "  )\n"
      "  config.a.update(y=4)  # y changed\n")
  monkeypatch.setattr(describe, "_SOURCE", str(planted))
  comments = describe._key_comments("get_base_config")  # pylint: disable=protected-access
  assert comments == {"seed": (2, "the seed"),
                      "a.x": (6, "two lines of value, and two of comment"),
                      "a.y": (11, "y changed")}


def test_an_override_of_a_moved_key_says_where_it_went():
  """config.eval joined config.evaluate: the old flags name the new keys in one line."""
  error = KeyError("'eval'")
  for old, new in (("eval.num_samples", "evaluate.classifier_samples"),
                   ("eval.classifier_steps", "evaluate.classifier_steps")):
    text = cli_lib.flag_error(error, ["main", f"--config.{old}=3"])
    assert text.startswith(f"--config.{old}: this key moved: use --config.{new}"), text
    assert "\n" not in text
  other = cli_lib.flag_error(KeyError("'evall'"), ["main", "--config.evall.x=3"])
  assert "the config has no key 'evall'" in other
