"""Denoising networks. `build_model(config.model)` maps a config to the typed module:
`model.name` picks the UNet (models/unet.py) or the DiT (models/dit.py)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.models import blocks
from asyncpatch_jax.models.dit import DiT
from asyncpatch_jax.models.unet import UNet

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


REMAT = blocks.REMAT


def _dtype(model_config):
  dtype = model_config.get("dtype", "float32")
  if dtype not in _DTYPES:
    raise checks.InputError(f"model.dtype={dtype!r}; expected one of {sorted(_DTYPES)}.")
  return _DTYPES[dtype]


def _remat(model_config) -> str:
  remat = model_config.get("remat", "none")
  checks.check_choice(remat, REMAT, "model.remat")
  return remat


def build_unet(model_config) -> UNet:
  """The UNet described by a `config.model` ConfigDict (see configs/)."""
  if model_config.get("clean_context", False):
    raise checks.InputError(
        "model.clean_context is a DiT option (clean tokens attend only to clean tokens); the "
        "UNet has no tokens: set model.name='dit' (configs/dit.py) or model.clean_context=False.")
  return UNet(
      out_channels=model_config.out_channels,
      base_channels=model_config.base_channels,
      channel_mult=tuple(model_config.channel_mult),
      num_res_blocks=tuple(model_config.num_res_blocks),
      num_middle_blocks=model_config.num_middle_blocks,
      attention_resolutions=tuple(model_config.attention_resolutions),
      head_dim=model_config.head_dim,
      time_embed_dim=model_config.time_embed_dim,
      num_classes=model_config.num_classes,
      dropout=model_config.dropout,
      norm=model_config.norm,
      num_groups=model_config.num_groups,
      dtype=_dtype(model_config),
      remat=_remat(model_config),
  )


def build_dit(model_config) -> DiT:
  """The DiT described by a `config.model` ConfigDict with name='dit' (configs/dit.py)."""
  return DiT(
      patch_size=model_config.patch_size,
      hidden_size=model_config.hidden_size,
      depth=model_config.depth,
      num_heads=model_config.num_heads,
      mlp_ratio=float(model_config.mlp_ratio),
      out_channels=model_config.out_channels,
      num_classes=model_config.num_classes,
      modulation=model_config.modulation,
      dtype=_dtype(model_config),
      remat=_remat(model_config),
      clean_context=bool(model_config.get("clean_context", False)),
  )


# config.model.name -> builder. A saved config without `name` is a UNet (written before the
# DiT existed).
MODELS = {"unet": build_unet, "dit": build_dit}


def build_model(model_config) -> UNet | DiT:
  """The network `config.model` describes (model.name: 'unet' or 'dit')."""
  name = model_config.get("name", "unet")
  checks.check_choice(name, tuple(MODELS), "model.name")
  return MODELS[name](model_config)


def patch_size(model) -> int:
  """The side of the model's tokens: the DiT's p; 1 (every pixel its own) for the UNet."""
  return model.patch_size if isinstance(model, DiT) else 1


def example_inputs(model, image_shape, batch: int = 1):
  """Zero inputs (z, t, y) of the right shapes for `model.init` / `jax.eval_shape`."""
  z = jnp.zeros((batch, *image_shape), jnp.float32)
  y = jnp.zeros((batch,), jnp.int32) if model.num_classes else None
  return z, jnp.zeros((batch,), jnp.float32), y


def init_params(model, key: jax.Array, image_shape, *, out_shardings=None):
  """`model.init(...)["params"]` for images `[H, W, C]`, compiled once.

  On CPU the one-off initialisation program is compiled without backend
  optimisation (its random initialisers are slow to optimise, ~4x the compile time,
  and run once).
  """
  z, t, y = example_inputs(model, image_shape)
  init = jax.jit(lambda k: model.init(k, z, t, y)["params"], out_shardings=out_shardings)
  options = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  return init.lower(key).compile(compiler_options=options)(key)


@dataclasses.dataclass(frozen=True)
class NullLabelVelocity:
  """`(params, z [B, H, W, C], t [B] or [B, H, W]) -> v_hat` of a UNet or DiT, unconditional.

  For analysis and experiments: `jax.tree_util.Partial(NullLabelVelocity(model), params)`
  is a velocity function whose parameters are traced leaves (one compilation serves
  every parameter value) and which is hashable by the module's fields. A
  class-conditional model gets its null label (the CFG unconditional branch).
  """
  model: UNet | DiT

  def __call__(self, params, z, t):
    y = None
    if self.model.num_classes:
      y = jnp.full(z.shape[:1], self.model.null_label, jnp.int32)
    return self.model.apply({"params": params}, z, t, y)


__all__ = ["MODELS", "REMAT", "DiT", "NullLabelVelocity", "UNet", "build_dit", "build_model",
           "build_unet", "example_inputs", "init_params", "patch_size"]
