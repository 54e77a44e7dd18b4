"""Latent AsyncPatch on the embedded 32x32 textures (AsyncPatch Sec. 5.2): the UNet diffuses the
8x8x3 latents of the localized autoencoder of configs/vqae_textures.py, each token with its
own noise level. Train the autoencoder first, then:
  python -m asyncpatch_jax.main --config=configs/vqae_textures.py --workdir=/tmp/vqae_textures
  python -m asyncpatch_jax.main --config=configs/latent_textures.py --workdir=/tmp/latent_textures \
      --config.latent.autoencoder_workdir=/tmp/vqae_textures
"""

from asyncpatch_jax.config import base_config


def get_config():
  config = base_config.get_base_config()
  config.data.dataset = "textures"
  config.latent.autoencoder_workdir = "/tmp/vqae_textures"
  config.model.update(out_channels=3, base_channels=48, channel_mult=(1, 2), num_res_blocks=(2, 2),
                      num_middle_blocks=1, attention_resolutions=(4,), head_dim=32,
                      time_embed_dim=96, num_classes=0, num_groups=16)
  config.optim.update(learning_rate=1e-3, warmup_steps=100)
  config.train.update(batch_size=64, num_steps=4000, ema_decay=0.999, log_every=100,
                      checkpoint_every=1000)
  config.sample.update(guidance=0.0, input_guidance=0.0, num_images=64, batch_size=64)
  config.evaluate.at_end = ()
  return base_config.finalize(config)
