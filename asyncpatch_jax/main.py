r"""Command line: train (default), sample from a workdir, or evaluate it.

  python -m asyncpatch_jax.main --config=configs/default.py --workdir=DIR [--config.key=value ...]
  python -m asyncpatch_jax.main --mode=sample --workdir=DIR \
      --config.sample.task=inpaint --config.sample.image=in.png --config.sample.mask=mask.png
  python -m asyncpatch_jax.main --mode=evaluate --workdir=DIR [--config.evaluate.num_samples=N]
  python -m asyncpatch_jax.main --help    # also -h: this text, the modes, tasks and config keys

`--config` also takes a run's saved `config.json`; in `--mode=sample` and `--mode=evaluate`
it defaults to the workdir's own `config.json`, and `--config.key=value` overrides apply on
top.

Exit codes: 0 done; 1 an error, printed as one line `error: ...` (bad flags or config,
bad input files, a damaged workdir, a failed write, a diverging loss), before anything
expensive where it can be known then; 130 stopped by SIGINT (Ctrl-C) after saving a
checkpoint; 143 stopped by SIGTERM (preemption) after saving a checkpoint. Rerunning
the same command resumes. Logs: warnings, errors and this package's own info lines
(restoring, training from step k); --verbosity=0 (or higher) shows every library's too.
"""

import ast
import json
import logging as std_logging
import os
import re
import signal
import sys
import textwrap

# Ctrl-C or SIGTERM during start-up waits until the libraries are loaded (the block is lifted
# in main()): jaxlib interrupted while it loads can crash with SIGSEGV, and the signal then
# arrives at a point where the run stops cleanly (exit 130 for Ctrl-C).
_START_UP_SIGNALS = {signal.SIGINT, signal.SIGTERM}
if __name__ == "__main__":
  signal.pthread_sigmask(signal.SIG_BLOCK, _START_UP_SIGNALS)

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from asyncpatch_jax.config import base_config
from asyncpatch_jax.config import describe
from asyncpatch_jax.config import rules
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import storage

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<name>.py) or a run's saved config.json; in "
    "--mode=sample and --mode=evaluate the default is <workdir>/config.json.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (or gs:// URL) for checkpoints, metrics and samples.")
_MODES = {
    "train": "train (resuming the workdir), then sample grids and evaluate (config.train, "
             "config.eval)",
    "sample": "sample from the workdir's latest checkpoint (config.sample; the tasks below)",
    "evaluate": "score the workdir's samples and inpaintings, writing <workdir>/evaluate.json "
                "(config.evaluate)",
}
flags.DEFINE_enum("mode", "train", list(_MODES),
                  "; ".join(f"{mode}: {meaning}" for mode, meaning in _MODES.items()) + ".")
flags.mark_flags_as_required(["workdir"])

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SAVED_CONFIG = os.path.join(_PACKAGE_DIR, "config", "base_config.py")  # its get_config(path)
_HELP_ARGS = ("-h", "--help", "-help", "-?")   # absl's own --help lists only the flags


def _sample_tasks() -> dict[str, str]:
  """sample_mode.TASKS ({task: meaning}), read from its source: importing it would load jax."""
  with open(os.path.join(_PACKAGE_DIR, "modes", "sample_mode.py"), encoding="utf-8") as f:
    tree = ast.parse(f.read())
  node = next(n for n in tree.body if isinstance(n, ast.Assign)
              and [getattr(t, "id", None) for t in n.targets] == ["TASKS"])
  return ast.literal_eval(node.value)


def _table(rows, width: int, column: int) -> list[str]:
  """One `  name  meaning` entry per row, the meanings from `column` on, wrapped at `width`."""
  return ["\n".join(textwrap.wrap(f"  {name:<{column - 4}}  {meaning}", width,
                                  subsequent_indent=" " * column, break_long_words=False,
                                  break_on_hyphens=False)) for name, meaning in rows]


def help_text(width: int = 100) -> str:
  """What -h and --help print: the usage, flags, modes, sampling tasks and every config key.

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
      __doc__.strip(), "", "Flags:",
      *_table([("--config", FLAGS["config"].help), ("--workdir", FLAGS["workdir"].help),
               ("--mode", "one of the modes below (default: train)")], width, 14),
      "", "Modes (--mode=MODE):", *_table(_MODES.items(), width, 14),
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


def _with_config(argv: list[str]) -> list[str]:
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


def _flag_error(e: BaseException, argv: list[str]) -> str:
  """One line for a failed flag parse (a config typo keeps ml_collections' "did you mean")."""
  inner = e.args[0] if e.args else e
  if isinstance(e, (AttributeError, KeyError)):
    text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
    m = re.match(r"""^['"]?([^'"\n]+)['"]?\s*(.*)$""", str(text), re.S)
    key, hint = (m.group(1), _one_line(m.group(2))) if m else (str(text), "")
    override = next((a.split("=", 1)[0] for a in argv if a.startswith(("--config.", "-config."))
                     and key in a.split("=", 1)[0].split(".")), None)
    where = f"{override}: " if override else ""
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


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a JSON --config and every error as one line (exit code 1).

  -h or --help prints help_text() and exits 0, whatever else the command line holds.
  """
  if any(arg in _HELP_ARGS for arg in argv[1:]):
    print(help_text())
    sys.exit(0)
  try:
    return FLAGS(_with_config(argv))
  except checks.InputError as e:
    sys.exit(f"error: {e}")
  except Exception as e:  # pylint: disable=broad-except
    # absl and ml_collections raise flags.Error, AttributeError, KeyError, TypeError, ...
    sys.exit(f"error: {_flag_error(e, argv)}")


class _OwnInfoOnly(std_logging.Filter):
  """Below WARNING, only this package's own records (e.g. 'Restoring checkpoint of step k').

  The default when --verbosity is not given: orbax's and jax's info lines (hundreds per
  run) stay out, the run's own few lines stay in.
  """

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno >= std_logging.WARNING or record.pathname.startswith(_PACKAGE_DIR)


class _NoBackendProbeNoise(std_logging.Filter):
  """Drops jax's INFO record about backends it probed and skipped (e.g. 'tpu' on a CPU machine)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not (record.levelno <= std_logging.INFO
                and str(record.msg).startswith("Unable to initialize backend"))


def _describe_devices() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  local = jax.local_devices()
  kinds = sorted({d.device_kind for d in local})
  return (f"jax {jax.__version__}, backend {jax.default_backend()}: {len(local)} local "
          f"device{'s' * (len(local) != 1)} ({', '.join(kinds)}), {jax.device_count()} in total, "
          f"process {jax.process_index()} of {jax.process_count()}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.get_absl_handler().addFilter(_OwnInfoOnly())
  std_logging.getLogger("jax._src.xla_bridge").addFilter(_NoBackendProbeNoise())
  try:
    config = FLAGS.config
    if config is None:
      raise checks.InputError("--config is required for training: e.g. "
                              "--config=configs/default.py, or --config=<workdir>/config.json "
                              "to continue a run with its saved settings.")
    # Every key's value, judged alone, before anything is built or read from the workdir.
    rules.validate(config)
    # pylint: disable=g-import-not-at-top
    from asyncpatch_jax.modes import evaluate_mode
    from asyncpatch_jax.modes import sample_mode
    from asyncpatch_jax.modes import train_mode
    from asyncpatch_jax.runtime import sharding
    # pylint: enable=g-import-not-at-top
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _START_UP_SIGNALS)
    # XLA:CPU fixes its host devices when its backend starts: the library's CPU default
    # (the batch sharded over two host devices per core) is decided before that.
    sample = config.get("sample")
    sharding.configure_cpu_devices(
        config.train.batch_size if FLAGS.mode == "train" and "train" in config else None,
        other_batch_sizes=[sample.batch_size] if sample is not None and "batch_size" in sample
        else [])
    sharding.maybe_initialize_distributed()
    print(_describe_devices(), file=sys.stderr, flush=True)
    if FLAGS.mode == "train":
      summary = train_mode.train_and_evaluate(config, FLAGS.workdir)
    elif FLAGS.mode == "evaluate":
      summary = evaluate_mode.evaluate_workdir(config, FLAGS.workdir)
    else:
      summary = sample_mode.sample_from_workdir(config, FLAGS.workdir)
  except (checks.InputError, FloatingPointError, storage.WriteError) as e:
    # The library's own input errors, a failed write and a diverging loss end with the
    # message alone; anything else (a bug, a failing dependency) keeps its traceback.
    sys.exit(f"error: {e}")
  except KeyboardInterrupt:
    # Ctrl-C outside the training loop (which saves and stops by itself).
    sys.stderr.write("\ninterrupted.\n")
    sys.exit(130)
  summary.pop("state", None)
  summary.pop("frozen", None)
  print(json.dumps(summary, indent=2, default=str))
  if summary.get("preempted"):
    # 128 + the signal (130 SIGINT, 143 SIGTERM): schedulers restart the job, which resumes.
    sys.exit(train_mode.exit_code(summary))


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
