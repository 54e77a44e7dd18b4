"""DiT with per-token noise levels (models/dit.py) on the library's datasets.

  python -m asyncpatch_jax.main --config=configs/dit.py --workdir=/tmp/dit_digits
  python -m asyncpatch_jax.main --config=configs/dit.py:textures --workdir=/tmp/dit_textures
  python -m asyncpatch_jax.main --config=configs/dit.py:latent_textures --workdir=/tmp/dit_latent \
      --config.latent.autoencoder_workdir=/tmp/vqae_textures
  python -m asyncpatch_jax.main --config=configs/dit.py:imagenet256,XL/2 --workdir=gs://...

The argument is `<data>[,<size>][,clean]`. <data> takes the data, optimiser, training and sampling
settings of the UNet config of the same data (digits: configs/default.py, textures:
configs/textures.py, latent_textures: configs/latent_textures.py, imagenet256:
configs/latent_imagenet256.py) and replaces its network by a DiT. <size> is one of the
DiT paper's models, S/B/L/XL with patch 2, 4 or 8 (e.g. `B/4`; Table 1 of Peebles & Xie:
depth, width and heads in models/dit.SIZES); without it, each data's small CPU DiT:
  digits            width 96, 4 blocks, 4 heads, adaLN-single, patch 2 (16x16: 64 tokens),
                    928 steps: the training FLOPs of configs/default.py's UNet;
  textures          width 128, 6 blocks, 4 heads, adaLN-single, patch 4 (32x32: 64 tokens);
  latent_textures   the same on the autoencoder's 8x8 tokens with patch 1 (a DiT token is
                    a VQ token).
`clean` makes it a clean-context DiT (model.clean_context: clean tokens attend only to clean
tokens), trained with clean sets on half of its images (timesteps.clean_fraction 0.5) and
sampled with the cached sampler that computes only the noisy tokens (sample.clean_cache;
models/dit_cache.py), e.g. configs/dit.py:digits,clean. Its train step costs what the
unmasked DiT's does, so the same step counts give the same training FLOPs.
"""

import pathlib

from asyncpatch_jax.config import base_config
from asyncpatch_jax.runtime import checks

_UNET_CONFIGS = {"digits": "default", "textures": "textures",
                 "latent_textures": "latent_textures", "imagenet256": "latent_imagenet256"}
# The DiT paper's Table 1 (models/dit.SIZES, checked equal by tests/test_dit.py): the
# config file keeps its own copy so that reading a config does not load jax.
SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PATCHES = (2, 4, 8)
_SMALL = {"textures": 4, "latent_textures": 1}


def _unet_config(data: str):
  return base_config.load_config_file(
      str(pathlib.Path(__file__).with_name(f"{_UNET_CONFIGS[data]}.py")))


def get_config(spec: str = "digits"):
  data, *options = spec.split(",")
  clean = "clean" in options
  options = [o for o in options if o != "clean"]
  if len(options) > 1:
    raise checks.InputError(f"configs/dit.py:{spec}: expected <data>[,<size>][,clean] "
                            "(e.g. configs/dit.py:digits,clean).")
  size = options[0] if options else ""
  if data not in _UNET_CONFIGS:
    raise checks.InputError(f"configs/dit.py:{spec}: unknown data {data!r}; use one of "
                            f"{sorted(_UNET_CONFIGS)} (e.g. configs/dit.py:textures,B/4).")
  config = _unet_config(data)
  config.model.name = "dit"
  if size:
    name, _, patch = size.partition("/")
    if name not in SIZES or not patch.isdigit() or int(patch) not in PATCHES:
      raise checks.InputError(f"configs/dit.py:{spec}: unknown DiT size {size!r}; use "
                              f"<{'|'.join(SIZES)}>/<{'|'.join(map(str, PATCHES))}>, e.g. XL/2.")
    depth, hidden, heads = SIZES[name]
    config.model.update(depth=depth, hidden_size=hidden, num_heads=heads,
                        patch_size=int(patch), modulation="adaln_zero")
  elif data == "digits":
    # The UNet's training FLOPs (XLA cost analysis of the train step, batch 64): 13.46 G a
    # step for configs/default.py's UNet, 14.50 G for this DiT; 928 steps match its 1000.
    config.model.update(depth=4, hidden_size=96, num_heads=4, patch_size=2,
                        modulation="adaln_single")
    config.train.num_steps = 928
  elif data in _SMALL:
    config.model.update(depth=6, hidden_size=128, num_heads=4, patch_size=_SMALL[data],
                        modulation="adaln_single")
  else:
    raise checks.InputError(f"configs/dit.py:{spec}: give a DiT size for {data} "
                            "(e.g. configs/dit.py:imagenet256,XL/2).")
  if data == "imagenet256":
    config.optim.update(learning_rate=1e-4, warmup_steps=0, decay="constant")  # DiT's
  if clean:
    config.model.clean_context = True
    config.timesteps.clean_fraction = 0.5
    config.sample.clean_cache = True
  return base_config.finalize(config)
