"""Unconditional model of 72x72 Digit-Sudoku grids (the MNIST-Sudoku benchmark of SRM/IPR).

  python -m asyncpatch_jax.main --config=configs/sudoku.py --workdir=/tmp/asyncpatch_sudoku
"""

from asyncpatch_jax.config import base_config


def get_config():
  config = base_config.get_base_config()
  config.data.dataset = "sudoku"
  config.model.update(out_channels=1, base_channels=48, channel_mult=(1, 2, 2, 2),
                      num_res_blocks=(2, 2, 2, 2), attention_resolutions=(9,),
                      time_embed_dim=96, num_classes=0, num_groups=16)
  config.timesteps.patch_sizes = (8, 24, 72)
  config.train.update(batch_size=32, num_steps=50_000, checkpoint_every=2000)
  config.sample.guidance = 0.0
  config.evaluate.at_end = ()
  return base_config.finalize(config)
