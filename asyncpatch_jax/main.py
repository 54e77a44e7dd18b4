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

import json
import logging as std_logging
import signal
import sys

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

from asyncpatch_jax.config import rules
from asyncpatch_jax.modes import cli
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import storage

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Config file (configs/<name>.py) or a run's saved config.json; in "
    "--mode=sample and --mode=evaluate the default is <workdir>/config.json.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory (or gs:// URL) for checkpoints, metrics and samples.")
_MODES = {
    "train": "train (resuming the workdir), then sample grids and run the evaluators of "
             "config.evaluate.at_end into <workdir>/eval.json (config.train)",
    "sample": "sample from the workdir's latest checkpoint (config.sample; the tasks below)",
    "evaluate": "run the evaluators of config.evaluate.evaluators on the workdir, writing "
                "<workdir>/evaluate.json",
}
flags.DEFINE_enum("mode", "train", list(_MODES),
                  "; ".join(f"{mode}: {meaning}" for mode, meaning in _MODES.items()) + ".")
flags.mark_flags_as_required(["workdir"])

def help_text(width: int = 100) -> str:
  """What -h and --help print (modes/cli.help_text)."""
  return cli.help_text(__doc__, {"--config": FLAGS["config"].help,
                                 "--workdir": FLAGS["workdir"].help,
                                 "--mode": "one of the modes below (default: train)"},
                       _MODES, width)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a JSON --config and every error as one line (exit code 1).

  -h or --help prints help_text() and exits 0, whatever else the command line holds.
  """
  if any(arg in cli.HELP_ARGS for arg in argv[1:]):
    print(help_text())
    sys.exit(0)
  try:
    return FLAGS(cli.with_config(argv))
  except checks.InputError as e:
    sys.exit(f"error: {e}")
  except Exception as e:  # pylint: disable=broad-except
    # absl and ml_collections raise flags.Error, AttributeError, KeyError, TypeError, ...
    sys.exit(f"error: {cli.flag_error(e, argv)}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS["verbosity"].present:
    logging.get_absl_handler().addFilter(cli.OwnInfoOnly())
  std_logging.getLogger("jax._src.xla_bridge").addFilter(cli.NoBackendProbeNoise())
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
    print(cli.describe_devices(), file=sys.stderr, flush=True)
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
