"""Unconditional model of Even Pixels (IPR App. C.4): 32x32 two-colour balanced images.

  python -m asyncpatch_jax.main --config=configs/even_pixels.py --workdir=/tmp/asyncpatch_even
  python -m asyncpatch_jax.main --config=configs/even_pixels.py:cpu --workdir=/tmp/asyncpatch_even_cpu

`:cpu` is the tiny variant that experiments/ipr/ipr_benchmarks.py trains on a 2-core CPU:
each 4x4 patch gets its own uniform time (`patchwise`, the SRM / IPR paper's 4x4 patches).
"""

from asyncpatch_jax.config import base_config
from asyncpatch_jax.runtime import checks


def get_config(variant: str = ""):
  config = base_config.get_base_config()
  config.data.dataset = "even_pixels"
  config.model.update(out_channels=3, base_channels=48, channel_mult=(1, 2, 2),
                      num_res_blocks=(2, 2, 2), attention_resolutions=(8,),
                      time_embed_dim=96, num_classes=0, num_groups=16)
  config.train.update(batch_size=64, num_steps=20_000, checkpoint_every=2000)
  config.sample.guidance = 0.0
  config.evaluate.at_end = ()
  if variant == "cpu":
    config.model.update(base_channels=16, num_res_blocks=(1, 1, 1), head_dim=16,
                        time_embed_dim=32, num_groups=8)
    config.timesteps.update(sampler="patchwise", patch_sizes=(4,))
    config.optim.update(learning_rate=2e-3, warmup_steps=100)
    # 0.28M parameters; 1000 steps of batch 16 fit a 25-minute budget on the shared CPU.
    config.train.update(batch_size=16, num_steps=1000, checkpoint_every=100, log_every=50,
                        ema_decay=0.995)
    config.sample.update(num_images=16, grid=(8, 8))
  elif variant:
    raise checks.InputError(f"configs/even_pixels.py: unknown variant {variant!r}; use '' or 'cpu'.")
  return base_config.finalize(config)
