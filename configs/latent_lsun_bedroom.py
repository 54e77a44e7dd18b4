"""Latent AsyncPatch on LSUN bedroom (AsyncPatch Sec. 5.2, App. E): the ~620M backbone of Table 6
on the 64x64x3 latents of the Table 7 autoencoder (configs/vqae_lsun_bedroom.py), unconditional,
parameters FSDP-sharded. Train the autoencoder, then on a TPU pod slice:
  python -m asyncpatch_jax.main --config=configs/latent_lsun_bedroom.py --workdir=gs://bucket/ldm_lsun \
      --config.latent.autoencoder_workdir=gs://bucket/vqae_lsun --config.data.data_dir=gs://bucket/tfds
"""

from asyncpatch_jax.config import base_config


def get_config():
  config = base_config.get_base_config()
  config.data.dataset = "lsun_bedroom"
  config.latent.autoencoder_workdir = "gs://bucket/vqae_lsun"
  config.model.update(out_channels=3, base_channels=256, channel_mult=(1, 2, 3, 4),
                      num_res_blocks=(4, 4, 4, 4), num_middle_blocks=3,
                      attention_resolutions=(16, 8), head_dim=64, time_embed_dim=512,
                      num_classes=0, dropout=0.0, dtype="bfloat16")
  config.loss.bias = -3.0
  config.optim.update(learning_rate=1e-4, warmup_steps=10_000, decay="constant")
  config.train.update(batch_size=512, num_steps=400_000, fsdp=8, log_every=1000,
                      checkpoint_every=10_000, keep_checkpoints=3, sample_every=50_000)
  config.sample.update(num_steps=250, eta=0.25, guidance=0.0, num_images=64, batch_size=64)
  config.evaluate.at_end = ()
  return base_config.finalize(config)
