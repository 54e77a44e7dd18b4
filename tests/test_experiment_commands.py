"""The experiment scripts and the commands that document them (experiments/, tools/).

Static checks, no runs (tests/test_readme.py runs every `sh` command with --tiny): every
script has a documented command in its group's README; every command shown there, in any
block (`text` ones need an accelerator, torch or real data), names a script that exists and
flags that script defines; every script shares experiments/common.py (the root, configs,
train-or-resume, loading a trained run, --tiny, results) instead of its own copy.
"""

import glob
import os
import re

import pytest

from experiments import common
from fixtures.readme import block_commands
from fixtures.readme import code_blocks
from fixtures.readme import doc_files
from fixtures.readme import script_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GROUPS = sorted(os.path.basename(os.path.dirname(p))
                for p in glob.glob(os.path.join(ROOT, "experiments", "*", "README.md")))
# Files of a group that are not scripts (no command of their own).
NOT_SCRIPTS = {"__init__.py", "torch_unet.py", "torch_dit.py", "mfu.py", "dit_steps.py"}
ABSL_FLAGS = {"help", "helpfull", "helpshort", "flagfile"}


def _scripts():
  found = []
  for group in GROUPS:
    for path in sorted(glob.glob(os.path.join(ROOT, "experiments", group, "*.py"))):
      if os.path.basename(path) not in NOT_SCRIPTS:
        found.append(os.path.relpath(path, ROOT))
  return found + ["tools/convert_weights.py"]


def _source(script):
  with open(os.path.join(ROOT, script)) as f:
    return f.read()


def _defined_flags(script):
  text = _source(script)
  names = set(re.findall(r"flags\.DEFINE_\w+\(\s*\"(\w+)\"", text))
  if "common.define_tiny(" in text:
    names.add("tiny")
  return names


def _shown_commands():
  """(file, command) of every command in every block of the experiments' and tools' READMEs."""
  files = [f for f in doc_files() if f.startswith(("experiments/", "tools/"))]
  out = []
  for rel, body in code_blocks("sh", "text", "", files=files):
    for cmd in block_commands(body):
      if cmd[:1] == ["taskset"]:
        cmd = cmd[3:]                                    # taskset -c N python ...
      if cmd[:1] == ["python"]:
        out.append((rel, cmd))
  return out


def test_groups_and_tools_have_readmes():
  assert GROUPS == ["asyncpatch", "benchmarks", "growing_images", "ipr", "pifs"]
  for path in ("experiments/README.md", "tools/README.md"):
    assert os.path.isfile(os.path.join(ROOT, path)), path


@pytest.mark.parametrize("script", _scripts())
def test_every_script_has_a_documented_command(script):
  readme = os.path.join(os.path.dirname(script), "README.md")
  assert any(script_of(cmd) == script for rel, cmd in _shown_commands() if rel == readme), (
      f"{readme} shows no command running {script}")


def test_every_shown_command_names_a_script_and_its_flags():
  commands = _shown_commands()
  assert len(commands) >= 30, commands
  for rel, cmd in commands:
    script = script_of(cmd)
    assert script is not None, (rel, cmd)
    if "<" in script:                                     # python -m experiments.<group>.<script>
      continue
    assert os.path.isfile(os.path.join(ROOT, script)), (rel, " ".join(cmd))
    if not script.startswith(("experiments/", "tools/")):
      continue                                            # the main CLI: tests/test_readme.py
    defined = _defined_flags(script)
    for arg in cmd[3 if cmd[1] == "-m" else 2:]:
      assert arg.startswith("--"), (rel, " ".join(cmd), arg)
      name = arg[2:].split("=", 1)[0]
      assert (name in defined or name in ABSL_FLAGS
              or (name.startswith("no") and name[2:] in defined)), (
          f"{rel}: {script} has no flag --{name} ({' '.join(cmd)})")


@pytest.mark.parametrize("script", [s for s in _scripts() if s.startswith("experiments/")])
def test_scripts_share_common(script):
  """One way each: the root, configs, train-or-resume, loading a run, --tiny, the entry point."""
  text = _source(script)
  assert "from experiments import common" in text
  assert "common.run(main" in text and "app.run(" not in text
  assert "common.define_tiny(" in text and 'DEFINE_bool("tiny"' not in text
  assert not re.search(r"^ROOT = ", text, flags=re.M)
  assert "os.path.dirname(os.path.dirname(os.path.abspath(__file__)))" not in text
  for private in ("load_trained(", "train_and_evaluate(", "load_config_file(",
                  "load_config_json(", "spec_from_file_location(", "load_autoencoder(",
                  "load_head(", "sys.path.insert("):
    assert private not in text, f"{script} calls {private} (use experiments/common.py)"


def test_documented_commands_run_as_modules():
  """Every experiment command is `python -m experiments.<group>.<script>` (common imports)."""
  for rel, cmd in _shown_commands():
    script = script_of(cmd)
    if script and script.startswith("experiments/"):
      assert cmd[1] == "-m", (rel, " ".join(cmd))


def test_load_config_names_files_and_variants():
  by_name, by_path = common.load_config("default"), common.load_config("configs/default.py")
  assert by_name.to_dict() == by_path.to_dict()
  assert by_name.train.num_steps == 1000
  cpu = common.load_config("sudoku4:cpu")
  assert cpu.to_dict() == common.load_config("configs/sudoku4.py:cpu").to_dict()
  assert cpu.to_dict() != common.load_config("sudoku4").to_dict()
  assert common.load_config(os.path.join(ROOT, "configs", "test.py")).train.num_steps == 24
