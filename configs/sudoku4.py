"""Unconditional model of 4x4 Digit Sudoku (32x32 grids, 2x2 boxes, digits 1..4; IPR Sec. 4.2).

The 4x4 variant of the MNIST-Sudoku benchmark for CPU budgets (data/sudoku.py,
grid_size=4; HARD-style givens 0..5 of 16). Each 8x8 cell gets its own uniform time
(`patchwise` over the cells), as SRM trains its per-cell noise levels, so clue cells at
t = 0 beside generated ones at t = 1 are in the training distribution.

  python -m asyncpatch_jax.main --config=configs/sudoku4.py --workdir=/tmp/asyncpatch_sudoku4
  python -m asyncpatch_jax.main --config=configs/sudoku4.py:cpu --workdir=/tmp/asyncpatch_sudoku4_cpu

`:cpu` is the tiny variant that experiments/ipr/ipr_benchmarks.py trains on a 2-core CPU.
"""

from asyncpatch_jax.config import base_config
from asyncpatch_jax.runtime import checks


def get_config(variant: str = ""):
  config = base_config.get_base_config()
  config.data.dataset = "sudoku"
  config.data.options = {"grid_size": 4}
  # 32 -> 16 -> 8 -> 4: attention at 4x4 is one token per cell (the rule is about cells).
  config.model.update(out_channels=1, base_channels=64, channel_mult=(1, 2, 2, 2),
                      num_res_blocks=(2, 2, 2, 2), attention_resolutions=(8, 4),
                      time_embed_dim=128, num_classes=0, num_groups=16)
  config.timesteps.update(sampler="patchwise", patch_sizes=(8,))
  config.train.update(batch_size=64, num_steps=50_000, checkpoint_every=2000)
  config.sample.update(guidance=0.0, grid=(4, 4))
  config.evaluate.at_end = ()
  if variant == "cpu":
    # 0.38M parameters; 0.65-1.5 s a step at batch 16 on the shared 2-core machine (load 10-16),
    # so 1200 steps fit the 25-minute budget of experiments/ipr/ipr_benchmarks.py.
    config.model.update(base_channels=16, num_res_blocks=(1, 1, 1, 1),
                        attention_resolutions=(4,), head_dim=16, time_embed_dim=32,
                        num_groups=8)
    config.optim.update(learning_rate=2e-3, warmup_steps=100)
    config.train.update(batch_size=16, num_steps=1200, checkpoint_every=100, log_every=50,
                        ema_decay=0.995)
    config.sample.num_images = 16
  elif variant:
    raise checks.InputError(f"configs/sudoku4.py: unknown variant {variant!r}; use '' or 'cpu'.")
  return base_config.finalize(config)
