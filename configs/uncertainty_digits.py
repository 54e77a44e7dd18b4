"""An uncertainty head (AsyncPatch Sec. 5.5) on the main job's trained digits model.

The model's parameters are frozen; the head trains on the model's own data with its
timestep sampler and label dropout, in its own workdir:
  python -m asyncpatch_jax.main --config=configs/uncertainty_digits.py --workdir=/tmp/asyncpatch_head \
      --config.uncertainty.model_workdir=/tmp/asyncpatch_default
Then sample with it (--workdir is the model, the head comes from head_workdir):
  python -m asyncpatch_jax.main --mode=sample --config=configs/default.py \
      --workdir=/tmp/asyncpatch_default --config.sample.task=adaptive \
      --config.uncertainty.head_workdir=/tmp/asyncpatch_head
"""

from asyncpatch_jax.config import base_config


def get_config():
  config = base_config.get_base_config()
  config.trainer = "head"
  config.uncertainty.model_workdir = "/tmp/asyncpatch_default"
  config.uncertainty.update(channels=16, num_layers=3, time_features=16)
  config.optim.update(learning_rate=2e-3, warmup_steps=50)
  config.train.update(batch_size=64, num_steps=600, ema_decay=0.99, log_every=50,
                      checkpoint_every=200)
  return base_config.finalize(config)
