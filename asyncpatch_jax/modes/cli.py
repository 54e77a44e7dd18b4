"""The command line's plumbing (main.py stays a page): --help, the --config flag's forms,
one-line flag errors, the log filters and the device line.

Nothing here loads jax at import time: `--help` and bad flags answer at once.
"""

import ast
import logging as std_logging
import os
import re
import textwrap

from asyncpatch_jax.config import base_config
from asyncpatch_jax.config import describe
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import storage

_MODES_DIR = os.path.dirname(os.path.abspath(__file__))
_PACKAGE_DIR = os.path.dirname(_MODES_DIR)
_SAVED_CONFIG = os.path.join(_PACKAGE_DIR, "config", "base_config.py")  # its get_config(path)
HELP_ARGS = ("-h", "--help", "-help", "-?")   # absl's own --help lists only the flags


def _sample_tasks() -> dict[str, str]:
  """sample_mode.TASKS ({task: meaning}), read from its source: importing it would load jax."""
  with open(os.path.join(_MODES_DIR, "sample_mode.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  node = next(n for n in tree.body if isinstance(n, ast.Assign)
              and [getattr(t, "id", None) for t in n.targets] == ["TASKS"])
  return ast.literal_eval(node.value)


def _table(rows, width: int, column: int) -> list[str]:
  """One `  name  meaning` entry per row, the meanings from `column` on, wrapped at `width`."""
  return ["\n".join(textwrap.wrap(f"  {name:<{column - 4}}  {meaning}", width,
                                  subsequent_indent=" " * column, break_long_words=False,
                                  break_on_hyphens=False)) for name, meaning in rows]



def help_text(usage: str, flag_help: dict[str, str], modes: dict[str, str],
              width: int = 100) -> str:
  """What -h and --help print: the usage, flags, modes, sampling tasks and every config key.

  usage: the command's docstring; flag_help: {flag: help}; modes: {mode: meaning}.
  Every key comes with its default and meaning from describe.describe_keys (the
  comments of base_config.py), the tasks from sample_mode.TASKS; nothing loads jax.
  """
  def para(text):
    return textwrap.fill(text, width)

  base = describe.describe_keys()
  seen = {(key, repr(default)) for key, default, _ in base}
  autoencoder = describe.describe_keys(base_config.get_autoencoder_base_config)
  sections = ", ".join(dict.fromkeys(key.split(".")[0] for key, _, _ in autoencoder))
  autoencoder = [row for row in autoencoder if (row[0], repr(row[1])) not in seen]
  return "\n".join([
      usage.strip(), "", "Flags:", *_table(flag_help.items(), width, 14),
      "", "Modes (--mode=MODE):", *_table(modes.items(), width, 14),
      "", "Sampling tasks (--mode=sample --config.sample.task=TASK):",
      *_table(_sample_tasks().items(), width, 20),
      "", para("Config keys and their defaults, declared and documented in "
               "asyncpatch_jax/config/base_config.py (every configs/*.py starts from them; a run's "
               "config.json holds the values it used). Override one with "
               "--config.section.key=value, e.g. --config.train.num_steps=500 "
               "--config.sample.task=inpaint."),
      *_table([(f"{key}={default!r}", meaning) for key, default, meaning in base], width, 40),
      "", para("Autoencoder configs (configs/vqae_*.py, from "
               f"base_config.get_autoencoder_base_config()) have the sections {sections}; "
               "their keys have the defaults above except these:"),
      *_table([(f"{key}={default!r}", meaning) for key, default, meaning in autoencoder],
              width, 40),
  ])



def _flag_value(argv: list[str], name: str) -> tuple[int, str | None]:
  """(index, value) of --name=value or --name value in argv; (-1, None) if absent."""
  for i, arg in enumerate(argv[1:], 1):
    if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
      return i, argv[i + 1]
    for prefix in (f"--{name}=", f"-{name}="):
      if arg.startswith(prefix):
        return i, arg[len(prefix):]
  return -1, None


def with_config(argv: list[str]) -> list[str]:
  """argv with a JSON --config (or sample mode's default) in ml_collections' path:arg form.

  Raises InputError for a config file that does not exist (local paths).
  """
  argv = list(argv)
  i, value = _flag_value(argv, "config")
  if value is None:
    _, mode = _flag_value(argv, "mode")
    _, workdir = _flag_value(argv, "workdir")
    if mode not in ("sample", "evaluate") or not workdir:
      return argv
    value = os.fspath(storage.path(workdir, "workdir") / "config.json")
    if "://" not in value and not os.path.isfile(value):
      raise checks.InputError(
          f"--mode={mode} without --config reads the workdir's config.json, but {value} does "
          "not exist; train in that workdir first, or pass --config=configs/<name>.py.")
    argv.insert(1, f"--config={_SAVED_CONFIG}:{value}")
    return argv
  path = value.split(":", 1)[0] if "://" not in value else value
  if "://" not in value and not os.path.isfile(path):
    raise checks.InputError(f"config file {path!r} does not exist; the configs are in configs/ "
                            "at the repository root (e.g. configs/default.py), and a run's "
                            "saved config is <workdir>/config.json.")
  if value.endswith(".json"):
    new = f"--config={_SAVED_CONFIG}:{value}"
    if argv[i].startswith("-") and "=" in argv[i]:
      argv[i] = new
    else:
      argv[i:i + 2] = [new]
  return argv



def _one_line(text: str) -> str:
  return " ".join(str(text).split())


def flag_error(e: BaseException, argv: list[str]) -> str:
  """One line for a failed flag parse (a config typo keeps ml_collections' "did you mean")."""
  inner = e.args[0] if e.args else e
  if isinstance(e, (AttributeError, KeyError)):
    text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
    m = re.match(r"""^['"]?([^'"\n]+)['"]?\s*(.*)$""", str(text), re.S)
    key, hint = (m.group(1), _one_line(m.group(2))) if m else (str(text), "")
    override = next((a.split("=", 1)[0] for a in argv if a.startswith(("--config.", "-config."))
                     and key in a.split("=", 1)[0].split(".")), None)
    where = f"{override}: " if override else ""
    moved = base_config.MOVED_KEYS.get((override or "").removeprefix("--config.")
                                       .removeprefix("-config."))
    if moved:
      return f"{where}this key moved: use --config.{moved}."
    return (f"{where}the config has no key {key!r}.{' ' + hint if hint else ''} Every key is "
            "declared in asyncpatch_jax/config/base_config.py.")
  text = str(e)
  found = re.findall(r"asyncpatch_jax\.checks\.InputError: (.*)", text)
  if found:        # an InputError raised while loading the config, wrapped by ml_collections
    return _one_line(found[-1])
  lines = [l.strip() for l in text.splitlines() if l.strip()]
  if len(lines) > 1 and any(l.startswith("Traceback") for l in lines):
    return _one_line(f"{lines[0]} {lines[-1]}")
  return _one_line(text)



class OwnInfoOnly(std_logging.Filter):
  """Below WARNING, only this package's own records (e.g. 'Restoring checkpoint of step k').

  The default when --verbosity is not given: orbax's and jax's info lines (hundreds per
  run) stay out, the run's own few lines stay in.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


class NoBackendProbeNoise(std_logging.Filter):
  """Drops jax's INFO record about backends it probed and skipped (e.g. 'tpu' on a CPU machine)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.levelno <= std_logging.INFO
                and str(record.msg).startswith("Unable to initialize backend"))


def describe_devices() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  local = jax.local_devices()
  kinds = sorted({d.device_kind for d in local})
  return (f"jax {jax.__version__}, backend {jax.default_backend()}: {len(local)} local "
          f"device{'s' * (len(local) != 1)} ({', '.join(kinds)}), {jax.device_count()} in total, "
          f"process {jax.process_index()} of {jax.process_count()}")
