"""A run's saved `config.json` as an ml_collections config file (`path:argument` form).

The command line turns `--config=DIR/config.json` into `--config=<this file>:DIR/config.json`
(and, in `--mode=sample`, a missing --config into the workdir's own config.json), so
`--config.key=value` overrides apply on top of a saved config exactly as on configs/*.py.
"""

from asyncpatch_jax import base_config


def get_config(path: str):
  """The config saved at `path` (local or gs://), locked, with this version's keys."""
  return base_config.load_config_json(path)
