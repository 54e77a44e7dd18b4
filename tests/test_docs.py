"""The documentation's other checks: shown commands, the test commands, relative links.

tests/test_readme.py runs every command of an `sh` block. The commands of other blocks
(`text`: they need a GPU, a TPU pod, torch, TensorFlow or real data) are checked here
against what they name: a command line of `asyncpatch_jax.main` against its flags and the
config's keys (in every documentation file), and in README.md, docs/ and ROADMAP.md also
scripts and their flags, pip extras, pytest markers and launch scripts (the experiments' and
tools' own commands are checked by tests/test_experiment_commands.py). The documented test
commands are collected on two files (the whole run is .ci/run's), and every relative link
names an existing file and heading.
"""

import os
import re
import subprocess
import sys

import pytest

from asyncpatch_jax.config import base_config
from fixtures.readme import block_commands
from fixtures.readme import code_blocks
from fixtures.readme import doc_files
from fixtures.readme import readme_commands
from fixtures.readme import script_of

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHOWN_LANGUAGES = ("text", "", "bash", "shell", "console")
# absl's own flags, accepted by every script.
ABSL_FLAGS = {"help", "helpfull", "helpshort", "verbosity", "v", "logtostderr", "alsologtostderr",
              "flagfile", "log_dir", "stderrthreshold", "only_check_args"}
SHOWN = [(path, cmd) for path, body in code_blocks(*SHOWN_LANGUAGES)
         for cmd in block_commands(body)]


def _defined_flags(script):
  text = open(os.path.join(ROOT, script)).read()
  names = set(re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", text))
  if "define_tiny(" in text:
    names.add("tiny")
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


def _main_problems(args):
  """What is wrong with the arguments of `python -m asyncpatch_jax.main`."""
  flags = [a[2:].split("=", 1) for a in args if a.startswith("--")]
  config_path = dict(f for f in flags if len(f) == 2).get("config")
  if config_path and "<" in config_path:
    return []
  variant = ""
  if config_path and ":" in config_path:                # configs/x.py:cpu: get_config("cpu")
    config_path, _, variant = config_path.partition(":")
  if config_path and not os.path.isfile(os.path.join(ROOT, config_path)):
    return [f"no config file {config_path}"]
  config = (base_config.load_config_file(os.path.join(ROOT, config_path), variant)
            if config_path else base_config.get_base_config())
  main_flags = _defined_flags("asyncpatch_jax/main.py") | {"config"}
  problems = []
  for name, *_ in flags:
    if name.startswith("config."):
      if not _has_key(config, name[len("config."):]):
        problems.append(f"--{name}: no such config key")
    elif name not in main_flags:
      problems.append(f"--{name}: not a flag of asyncpatch_jax.main")
  return problems


def _shown_problems(cmd, scripts=True):
  """What is wrong with a shown command: a missing file, an unknown flag, key, extra or marker.

  With scripts=False only the main command line is checked (the experiments' and tools'
  scripts have their own test).
  """
  while cmd and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", cmd[0]) or cmd[0] == "taskset"):
    cmd = cmd[3:] if cmd[0] == "taskset" else cmd[1:]
  cmd = [a for a in cmd if a != "&"]
  if cmd[:1] == ["python3"]:
    cmd = ["python", *cmd[1:]]
  if not cmd:
    return []
  if cmd[:3] == ["python", "-m", "asyncpatch_jax.main"]:
    return _main_problems(cmd[3:])
  if not scripts:
    return []
  script = script_of(cmd)
  if script is not None:
    if "<" in script:
      return []                                           # python -m experiments.<group>.<script>
    if not os.path.isfile(os.path.join(ROOT, script)):
      return [f"no script {script}"]
    defined = _defined_flags(script)
    args = cmd[3:] if cmd[1] == "-m" else cmd[2:]
    return [f"--{name}: not a flag of {script}" for name in
            (a[2:].split("=", 1)[0] for a in args if a.startswith("--")) if name not in defined]
  if cmd[:2] == ["pip", "install"]:
    extras = [e for a in cmd[2:] if a.startswith(".[") for e in a[2:].rstrip("]").split(",")]
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
  problems = [(path, " ".join(cmd), p) for path, cmd in SHOWN
              for p in _shown_problems(cmd, scripts=not path.startswith(("experiments/", "tools/")))]
  assert not problems, problems


def test_shown_command_checks_catch_mistakes():
  """The check above fails on a wrong script, flag, config key, extra, marker or launcher."""
  wrong = [["python", "experiments/no_such_script.py"],
           ["python", "-m", "experiments.no_such_module"],
           ["python", "asyncpatch_jax/main.py", "--no_such_flag=1"],
           ["python", "-m", "asyncpatch_jax.main", "--config=configs/default.py",
            "--config.train.no_such_key=1"],
           ["python", "-m", "asyncpatch_jax.main", "--config=configs/no_such_config.py"],
           ["python", "-m", "asyncpatch_jax.main", "--no_such_flag"],
           ["pip", "install", "-e", ".[no_such_extra]"],
           ["pytest", "-m", "not no_such_marker"],
           ["launch/no_such_launcher.sh"]]
  assert all(_shown_problems(c) for c in wrong), [c for c in wrong if not _shown_problems(c)]
  assert not _shown_problems(["XLA_FLAGS=--x", "python", "-m", "asyncpatch_jax.main",
                              "--config=configs/vqae_textures.py", "--workdir=/tmp/w",
                              "--config.autoencoder.disc_weight=0", "&"])


PYTEST_COMMANDS = [c for i, c in enumerate(readme_commands())
                   if c[0] == "pytest" and c not in readme_commands()[:i]]


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


def _without_code(path):
  return re.sub(r"^```.*?^```", "", open(path).read(), flags=re.S | re.M)


def _anchors(path):
  """GitHub's anchors of a Markdown file's headings."""
  return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
          for h in re.findall(r"^#+ (.*)$", _without_code(path), flags=re.M)}


def test_relative_links_resolve():
  """Every relative link of the documentation names an existing file (and heading)."""
  broken = []
  for rel in doc_files():
    for target in re.findall(r"\]\(([^)\s]+)\)", _without_code(os.path.join(ROOT, rel))):
      if re.match(r"[a-z]+:", target):
        continue
      path, _, anchor = target.partition("#")
      full = (os.path.normpath(os.path.join(ROOT, os.path.dirname(rel), path)) if path
              else os.path.join(ROOT, rel))
      if not os.path.exists(full):
        broken.append((rel, target, "no such file"))
      elif anchor and full.endswith(".md") and anchor not in _anchors(full):
        broken.append((rel, target, "no such heading"))
  assert not broken, broken


# Citations of files that are not in the repository: the design notes and the papers' texts
# live beside it, not in it (docs/conventions.md holds the conventions; papers are cited by
# name and equation, e.g. "AsyncPatch Eq. 4").
OUTSIDE = re.compile(r"shared/|\bSPEC\b|SPEC\.md|papers/")


def test_no_file_cites_the_design_notes_or_paper_files():
  cited = []
  for folder in ("asyncpatch_jax", "configs", "experiments", "tools", "launch", "tests"):
    for dirpath, _, names in os.walk(os.path.join(ROOT, folder)):
      for name in names:
        path = os.path.join(dirpath, name)
        if not name.endswith((".py", ".sh", ".md")) or path == os.path.abspath(__file__):
          continue
        for i, line in enumerate(open(path, errors="replace"), 1):
          if OUTSIDE.search(line):
            cited.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
  for rel in doc_files():
    cited += [f"{rel}: {m}" for m in OUTSIDE.findall(open(os.path.join(ROOT, rel)).read())]
  assert not cited, "\n".join(cited)
