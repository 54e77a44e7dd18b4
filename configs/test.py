"""A seconds-long config for tests and smoke runs (digits, a few steps, tiny UNet).

  python -m asyncpatch_jax.main --config=configs/test.py --workdir=/tmp/asyncpatch_test
"""

from asyncpatch_jax.config import base_config


def get_config():
  config = base_config.get_base_config()
  config.data.dataset = "digits"
  # One level, no attention: half the compile time of a two-level UNet (the full
  # architecture is tested in tests/test_unet.py).
  config.model.update(out_channels=1, base_channels=16, channel_mult=(1,),
                      num_res_blocks=(1,), attention_resolutions=(), head_dim=16,
                      time_embed_dim=32, num_classes=10, num_groups=8)
  config.train.update(batch_size=16, num_steps=24, log_every=4, checkpoint_every=12,
                      keep_checkpoints=2, progress_bar=False)
  config.optim.warmup_steps = 2
  config.sample.update(num_steps=4, num_images=16, batch_size=16)
  config.evaluate.update(classifier_samples=32, classifier_steps=50)
  return base_config.finalize(config)
