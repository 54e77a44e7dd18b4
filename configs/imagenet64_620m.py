"""The paper's ~620M backbone on ImageNet 64x64 (AsyncPatch Table 6), parameters FSDP-sharded.

On a TPU pod slice (see launch/tpu_pod.sh):
  python -m asyncpatch_jax.main --config=configs/imagenet64_620m.py --workdir=gs://bucket/run \
      --config.data.data_dir=gs://bucket/tfds
"""

from asyncpatch_jax.config import base_config


def get_config():
  config = base_config.get_base_config()
  config.data.dataset = "imagenet64"
  config.model.update(out_channels=3, base_channels=256, channel_mult=(1, 2, 3, 4),
                      num_res_blocks=(4, 4, 4, 4), num_middle_blocks=3,
                      attention_resolutions=(16, 8), head_dim=64, time_embed_dim=512,
                      num_classes=1000, dropout=0.0, dtype="bfloat16")
  config.loss.bias = -3.0
  config.optim.update(learning_rate=1e-4, warmup_steps=10_000, decay="constant")
  config.train.update(batch_size=512, num_steps=1_000_000, fsdp=8, log_every=1000,
                      checkpoint_every=10_000, keep_checkpoints=3, sample_every=50_000)
  config.sample.update(num_steps=250, eta=0.25, guidance=0.0, num_images=64, batch_size=64)
  config.evaluate.at_end = ()
  return base_config.finalize(config)
