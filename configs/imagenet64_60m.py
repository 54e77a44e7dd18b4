"""The paper's ~60M backbone on ImageNet 64x64 (AsyncPatch Table 6, App. E ablations).

Needs imagenet_resized/64x64 prepared in a TFDS data_dir (docs/scaling.md, "Real datasets"):
  python -m asyncpatch_jax.main --config=configs/imagenet64_60m.py --workdir=gs://bucket/run \
      --config.data.data_dir=/path/to/tfds
Paper: 1e6 steps at batch 512, Adam, grad clipping, EMA 0.999, DDIM 250 steps, eta 0.25.
"""

from asyncpatch_jax.config import base_config


def get_config():
  config = base_config.get_base_config()
  config.data.dataset = "imagenet64"
  config.model.update(out_channels=3, base_channels=128, channel_mult=(1, 2, 3, 3),
                      num_res_blocks=(1, 2, 2, 2), num_middle_blocks=1,
                      attention_resolutions=(16, 8), head_dim=64, time_embed_dim=256,
                      num_classes=1000, dropout=0.0, dtype="bfloat16")
  config.loss.bias = -3.0
  config.optim.update(learning_rate=1e-4, warmup_steps=10_000, decay="constant")
  config.train.update(batch_size=512, num_steps=1_000_000, log_every=1000,
                      checkpoint_every=10_000, keep_checkpoints=3, sample_every=50_000)
  config.sample.update(num_steps=250, eta=0.25, guidance=0.0, num_images=64, batch_size=64)
  config.evaluate.at_end = ()
  return base_config.finalize(config)
