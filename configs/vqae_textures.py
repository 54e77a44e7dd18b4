"""Mask-conditioned, localized VQ autoencoder on the embedded 32x32 textures (AsyncPatch App. F).

Table 7's architecture at small widths so that it trains on a CPU (f = 4: 32x32x3 ->
8x8x3 latents, halo 3 pixels); the latent diffusion config configs/latent_textures.py
names its workdir:
  python -m asyncpatch_jax.main --config=configs/vqae_textures.py --workdir=/tmp/vqae_textures
"""

from asyncpatch_jax.config import base_config


def get_config():
  config = base_config.get_autoencoder_base_config()
  config.data.dataset = "textures"
  config.autoencoder.update(base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=1,
                            codebook_size=512, encoder_kernels=(3, 1, 1), mask_embed_dim=32,
                            head_dim=32, dead_after=50)
  config.optim.update(learning_rate=1e-3, warmup_steps=100, decay="cosine", grad_clip=1.0)
  config.train.update(batch_size=16, num_steps=2000, log_every=100, checkpoint_every=500)
  config.evaluate.reconstruct_images = 256
  return base_config.finalize(config)
