"""Unconditional model of 32x32 crops of scikit-image's bundled textures (texture synthesis).

  python -m asyncpatch_jax.main --config=configs/textures.py --workdir=/tmp/asyncpatch_textures
"""

from asyncpatch_jax.config import base_config


def get_config():
  config = base_config.get_base_config()
  config.data.dataset = "textures"
  config.model.update(out_channels=3, base_channels=48, channel_mult=(1, 2, 2),
                      num_res_blocks=(2, 2, 2), attention_resolutions=(8,),
                      time_embed_dim=96, num_classes=0, num_groups=16)
  config.train.update(batch_size=64, num_steps=20_000, checkpoint_every=2000)
  config.sample.update(guidance=0.0, input_guidance=2.0)
  config.evaluate.at_end = ()
  return base_config.finalize(config)
