"""Class-conditional model of Counting Polygons (IPR Sec. 4.3, App. C.3): N polygons asked by label.

  python -m asyncpatch_jax.main --config=configs/polygons.py --workdir=/tmp/asyncpatch_polygons
  python -m asyncpatch_jax.main --config=configs/polygons.py:cpu --workdir=/tmp/asyncpatch_polygons_cpu

The paper's size: 128x128 images of 1..9 polygons, one uniform time per 8x8 patch
(`patchwise`: the 256 patches of SRM's model). `:cpu` is the tiny variant that
experiments/ipr/ipr_benchmarks.py trains on a 2-core CPU: 32x32 images of 1..4 polygons of
circumradius 3.5..4.8 pixels (the smallest the reader tells apart), 4x4 patches (64
regions, as Even Pixels). The label is the number of polygons (data/polygons.py; classes
0..max, 0 never drawn), dropped with p = 0.1 for classifier-free guidance.
"""

from asyncpatch_jax.config import base_config
from asyncpatch_jax.runtime import checks


def get_config(variant: str = ""):
  config = base_config.get_base_config()
  config.data.dataset = "polygons"
  config.model.update(out_channels=3, base_channels=64, channel_mult=(1, 2, 2, 4),
                      num_res_blocks=(2, 2, 2, 2), attention_resolutions=(16,),
                      time_embed_dim=128, num_classes=10, num_groups=16)
  config.timesteps.update(sampler="patchwise", patch_sizes=(8,))
  config.train.update(batch_size=64, num_steps=100_000, checkpoint_every=2000)
  config.sample.update(guidance=2.0, grid=(16, 16))
  config.evaluate.at_end = ()
  if variant == "cpu":
    config.data.options = {"image_size": 32, "max_polygons": 4, "radius": (0.11, 0.15)}
    config.model.update(base_channels=16, channel_mult=(1, 2, 2), num_res_blocks=(1, 1, 1),
                        attention_resolutions=(8,), head_dim=16, time_embed_dim=32,
                        num_classes=5, num_groups=8)
    config.timesteps.update(patch_sizes=(4,))
    config.optim.update(learning_rate=2e-3, warmup_steps=100)
    # 0.28M parameters; 1.7-2.1 steps/s at batch 16 on the shared 2-core CPU (load 8-10), so
    # 2000 steps take about 16-20 min.
    config.train.update(batch_size=16, num_steps=2000, checkpoint_every=100, log_every=50,
                        ema_decay=0.995)
    config.sample.update(num_images=20, grid=(8, 8))
  elif variant:
    raise checks.InputError(f"configs/polygons.py: unknown variant {variant!r}; use '' or 'cpu'.")
  return base_config.finalize(config)
