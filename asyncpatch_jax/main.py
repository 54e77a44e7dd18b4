"""Command line: train (default) or sample from a workdir.

  python -m asyncpatch_jax.main --config=configs/default.py --workdir=DIR [--config.key=value ...]
  python -m asyncpatch_jax.main --mode=sample --config=configs/default.py --workdir=DIR \
      --config.sample.task=inpaint --config.sample.image=in.png --config.sample.mask=mask.png
"""

import json
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from asyncpatch_jax import checks

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (configs/<name>.py).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and samples.")
flags.DEFINE_enum("mode", "train", ["train", "sample"],
                  "train: train (resuming the workdir), then sample and evaluate; "
                  "sample: sample from the workdir's latest checkpoint (config.sample).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  try:
    if FLAGS.mode == "train":
      from asyncpatch_jax.training import train  # pylint: disable=g-import-not-at-top
      summary = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    else:
      from asyncpatch_jax import sample_mode  # pylint: disable=g-import-not-at-top
      summary = sample_mode.sample_from_workdir(FLAGS.config, FLAGS.workdir)
  except (checks.InputError, FloatingPointError) as e:
    # The library's own input errors and a diverging loss end with the message alone;
    # anything else (a bug, a failing dependency) keeps its traceback.
    sys.exit(f"error: {e}")
  summary.pop("state", None)
  print(json.dumps(summary, indent=2, default=str))
  if summary.get("preempted"):
    sys.exit(143)  # 128 + SIGTERM: schedulers restart the job, which resumes


if __name__ == "__main__":
  app.run(main)
