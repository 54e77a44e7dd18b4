"""The paper's autoencoder for ImageNet 256 (AsyncPatch App. F, Table 7): 256x256x3 -> 64x64x3.

Base 128, multipliers (1, 2, 4), 2 residual blocks per scale, RMSNorm, no attention,
3 latent channels, codebook 8192 (latent diffusion's f = 4 VQ model), encoder kernels
(3, 3, 1): halo 13 pixels. 55.1M parameters (tests/test_vqae.py counts them through
jax.eval_shape). Loss: L1 + VQ (beta 0.25) + PatchGAN hinge with the adaptive weight
(0.75); add LPIPS with --config.autoencoder.lpips_weight=1.0
--config.autoencoder.lpips_weights=<file>. On an accelerator, with a prepared TFDS dir:
  python -m asyncpatch_jax.main --config=configs/vqae_imagenet256.py --workdir=/ckpt/vqae_in256 \
      --config.data.data_dir=/data/tfds
"""

from asyncpatch_jax.config import base_config


def get_config():
  config = base_config.get_autoencoder_base_config()
  config.data.dataset = "imagenet256"
  config.autoencoder.update(disc_weight=0.75, disc_start=0, dead_after=1000)
  # base_learning_rate 4.5e-6 times the batch size, as latent diffusion scales it.
  config.optim.update(learning_rate=4.5e-6 * 64, warmup_steps=0, decay="constant",
                      grad_clip=1e9)
  config.train.update(batch_size=64, num_steps=400_000, log_every=1000, checkpoint_every=10_000)
  config.evaluate.reconstruct_images = 1000
  return base_config.finalize(config)
