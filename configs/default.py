"""The main job: class-conditional AsyncPatch model on the embedded 16x16 digits.

Trains and samples on a 2-core CPU in under 10 minutes with no download:
  python -m asyncpatch_jax.main --config=configs/default.py --workdir=/tmp/asyncpatch_default
"""

from asyncpatch_jax import base_config


def get_config():
  config = base_config.get_base_config()
  config.data.dataset = "digits"
  config.model.update(out_channels=1, base_channels=32, channel_mult=(1, 2, 2),
                      num_res_blocks=(1, 1, 1), attention_resolutions=(4,),
                      time_embed_dim=64, num_classes=10)
  config.train.update(batch_size=128, num_steps=2000, log_every=100, checkpoint_every=500)
  return base_config.finalize(config)
