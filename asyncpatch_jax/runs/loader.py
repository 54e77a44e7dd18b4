"""Opens a trained run for sampling, evaluation and analysis: `load_run(workdir)`.

A workdir (a local folder or a gs:// URL) holds everything needed: `config.json`, and
checkpoints whose meta records the image shape. `load_run` returns the config, the
model, its EMA parameters and, for a latent run, the frozen autoencoder's codec; with
`head_workdir`, also the uncertainty head trained on it. Only the parameters are read
from the checkpoint (an orbax partial restore), so this module imports no optimizer,
no trainer and no dataset. A run whose parts do not match (another model in the
checkpoint, a head trained on another model, an autoencoder of another architecture) is
refused with the differing keys listed (runs/compat.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from asyncpatch_jax import models
from asyncpatch_jax.models import uncertainty_head
from asyncpatch_jax.models import vqae
from asyncpatch_jax.runs import checkpointing
from asyncpatch_jax.runs import compat
from asyncpatch_jax.runs import latent_codec
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import storage

# The autoencoder settings that define its parameters (a checkpoint of other values is refused).
ARCHITECTURE_KEYS = ("image_channels", "base_channels", "channel_mult", "num_res_blocks",
                     "latent_channels", "codebook_size", "encoder_kernels",
                     "attention_resolutions", "head_dim", "mask_embed_dim", "dtype")
LATENT_STATS = "latent_stats.json"
HEAD_KEYS = ("channels", "num_layers", "time_features", "logvar_min", "logvar_max")


@dataclasses.dataclass(frozen=True)
class Head:
  """A trained uncertainty head (AsyncPatch Sec. 5.5): module, EMA parameters, its config."""
  module: uncertainty_head.UncertaintyHead
  params: Any
  config: ml_collections.ConfigDict
  workdir: epath.Path


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """What a user of a trained diffusion model needs.

  image_shape: the model's input [H, W, C] (the latent [H/f, W/f, D] of a latent run);
  pixel_shape: the images' [H, W, C]; params: the EMA parameters of checkpoint `step`;
  codec: the frozen autoencoder of a latent run, else None; head: see `load_run`.
  """
  workdir: epath.Path
  config: ml_collections.ConfigDict
  model: models.UNet
  params: Any
  step: int
  image_shape: tuple[int, int, int]
  pixel_shape: tuple[int, int, int]
  codec: latent_codec.LatentCodec | None = None
  head: Head | None = None


def _json(obj):
  return json.loads(json.dumps(obj, default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def read_config(workdir, what: str = "a model") -> ml_collections.ConfigDict:
  """The config.json of a workdir (InputError naming the command to train there if absent)."""
  path = storage.check_bucket(workdir, "workdir")
  if not (path / "config.json").is_file():
    raise checks.InputError(f"workdir {str(workdir)!r} has no config.json; train {what} there "
                            "first (python -m asyncpatch_jax.main --config=configs/<name>.py "
                            f"--workdir={workdir}).")
  return ml_collections.ConfigDict(json.loads((path / "config.json").read_text()))


def saved_image_shape(workdir) -> tuple[int, int, int]:
  """The [H, W, C] recorded in the workdir's latest checkpoint; InputError if it has none."""
  meta = checkpointing.saved_meta(workdir)
  if meta is None:
    raise checks.InputError(f"workdir {str(workdir)!r} has no checkpoints; train first "
                            "(python -m asyncpatch_jax.main --config=... --workdir=...).")
  return tuple(meta["image_shape"])


def check_model(model, config, image_shape, num_classes=None) -> None:
  """InputError if `model`'s output channels or classes do not fit the data."""
  if model.out_channels != image_shape[-1]:
    raise checks.InputError(f"model.out_channels={model.out_channels} but dataset "
                            f"{config.data.dataset!r} has {image_shape[-1]} channels; set "
                            f"--config.model.out_channels={image_shape[-1]}.")
  if num_classes is not None and model.num_classes and model.num_classes != (num_classes or 0):
    raise checks.InputError(f"model.num_classes={model.num_classes} but dataset "
                            f"{config.data.dataset!r} has {num_classes or 'no'} classes; "
                            f"set --config.model.num_classes={num_classes or 0}.")


def _restore(ckpt: checkpointing.Checkpointer, fields: dict, workdir) -> dict:
  restored = ckpt.restore(fields, partial=True)
  if restored is None:
    raise checks.InputError(f"workdir {str(workdir)!r} has no checkpoint to sample from.")
  return restored


def _step_field():
  return jax.ShapeDtypeStruct((), jnp.int32)


def open_run(workdir, config: ml_collections.ConfigDict | None = None) -> TrainedRun:
  """A trained workdir's config, shapes, model and codec, before its parameters are read.

  For checking a task's inputs against the model before anything is restored or compiled;
  `load_run(..., run=opened)` then reads the parameters. Its params are None, step -1.
  """
  path = storage.check_bucket(workdir, "workdir")
  config = read_config(workdir) if config is None else config
  pixel_shape = saved_image_shape(path)
  image_shape, codec = pixel_shape, None
  latent = config.get("latent")
  if latent is not None and latent.autoencoder_workdir:
    # Latent AsyncPatch (Sec. 5.2): the UNet diffuses a frozen autoencoder's latents.
    codec = load_codec(latent.autoencoder_workdir, pixel_shape, latent.scale, config.model)
    image_shape = codec.latent_shape
  model = models.build_model(config.model)
  check_model(model, config, image_shape)
  return TrainedRun(workdir=path, config=config, model=model, params=None, step=-1,
                    image_shape=tuple(image_shape), pixel_shape=tuple(pixel_shape), codec=codec)


def load_run(workdir, config: ml_collections.ConfigDict | None = None, *,
             head_workdir=None, run: TrainedRun | None = None) -> TrainedRun:
  """The latest checkpoint of a trained diffusion workdir, ready to sample.

  config: the run's config; None reads `workdir/config.json`. A config of another model
  is refused with the differing keys listed. head_workdir: a trained uncertainty head
  for this model (checked to be trained on exactly these parameters). run: the
  `open_run` of this workdir, when the caller has it.
  """
  run = open_run(workdir, config) if run is None else run
  model, image_shape = run.model, run.image_shape
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), *models.example_inputs(model, image_shape))["params"])
  ckpt = checkpointing.Checkpointer(run.workdir, run.config, run.pixel_shape, every=1,
                                    keep=None, read_only=True)
  try:
    ckpt.check_compatible(training=False)
    restored = _restore(ckpt, {"ema_params": abstract, "step": _step_field()}, workdir)
  finally:
    ckpt.close()
  run = dataclasses.replace(run, params=restored["ema_params"],
                            step=int(jax.device_get(restored["step"])))
  if head_workdir:
    run = dataclasses.replace(run, head=load_head(head_workdir, run))
  return run


# ---- the uncertainty head ------------------------------------------------------------------

def fingerprint(params) -> str:
  """SHA-256 of a parameter tree: every leaf's path, dtype, shape and bytes, in tree order."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    arr = np.asarray(jax.device_get(leaf))
    digest.update(f"{jax.tree_util.keystr(path)}|{arr.dtype}|{arr.shape}|".encode())
    digest.update(np.ascontiguousarray(arr).tobytes())
  return digest.hexdigest()


def frozen_identity(model_config, image_shape, frozen_params, step: int) -> dict:
  """What a head checkpoint records about the model it belongs to."""
  return {"model": model_config.to_dict(), "image_shape": list(image_shape),
          "params": "ema_params", "step": int(step), "fingerprint": fingerprint(frozen_params)}


def head_meta_model(uncertainty_config, identity: dict) -> dict:
  """A head checkpoint's meta['model']: the head's architecture and the frozen model's identity.

  compat then refuses a head workdir whose head architecture or frozen model differ,
  listing the differing keys ('frozen.fingerprint: ... -> ...').
  """
  return _json({"head": {k: uncertainty_config[k] for k in HEAD_KEYS}, "frozen": identity})


def load_head(head_workdir, run: TrainedRun) -> Head:
  """The trained head of `head_workdir`, checked against `run`'s model.

  Raises InputError, listing the differences, if the head was trained on another model
  (model config, image shape, step or parameters).
  """
  config = read_config(head_workdir, "the head")
  if "uncertainty" not in config:
    raise checks.InputError(f"workdir {str(head_workdir)!r} does not hold an uncertainty head "
                            "(its config has no 'uncertainty' section).")
  head = uncertainty_head.build_head(config.uncertainty)
  identity = frozen_identity(run.config.model, run.image_shape, run.params, run.step)
  ckpt = checkpointing.Checkpointer(head_workdir, config, run.image_shape, every=1, keep=None,
                                    read_only=True,
                                    model=head_meta_model(config.uncertainty, identity))
  try:
    step = ckpt.latest_step()
    if step is None:
      raise checks.InputError(f"workdir {str(head_workdir)!r} has no head checkpoint; train it "
                              "first.")
    saved = ckpt.saved_meta(step)["model"]
    was, now = (m["frozen"]["model"].get("name", "unet") for m in (saved, ckpt.meta["model"]))
    if was != now:
      raise checks.InputError(
          f"the uncertainty head in {str(head_workdir)!r} was trained on a {was}; this model "
          f"is a {now}. Train a head for this model (configs/uncertainty_digits.py with "
          "--config.uncertainty.model_workdir=<this workdir>).")
    diffs = compat.model_differences({"frozen": saved["frozen"]},
                                     {"frozen": ckpt.meta["model"]["frozen"]})
    if diffs:
      raise checks.InputError(
          f"the uncertainty head in {str(head_workdir)!r} (step {step}) was trained on another "
          "model; refusing to use it. Differences (head's model -> this model):\n  "
          + "\n  ".join(diffs) + "\nTrain a head for this model (configs/uncertainty_digits.py "
          "with --config.uncertainty.model_workdir=<this workdir>).")
    ckpt.check_compatible(training=False)
    abstract = jax.eval_shape(lambda: head.init(
        jax.random.key(0), *uncertainty_head.example_inputs(run.image_shape))["params"])
    restored = _restore(ckpt, {"ema_params": abstract}, head_workdir)
  finally:
    ckpt.close()
  return Head(module=head, params=restored["ema_params"], config=config,
              workdir=storage.path(head_workdir))


# ---- the autoencoder of a latent run -------------------------------------------------------

def architecture(ae_config) -> dict[str, Any]:
  """The architecture keys of `config.autoencoder` (what a checkpoint must match)."""
  return json.loads(json.dumps({k: ae_config[k] for k in ARCHITECTURE_KEYS}, default=list))


def load_autoencoder(workdir, ae_config=None) -> tuple[vqae.VQAutoencoder, Any, dict]:
  """(ae, params, meta) of the latest checkpoint of a trained autoencoder workdir.

  ae_config: a `config.autoencoder` to load with; None builds the one saved with the
  checkpoint. A config whose architecture (codebook size, latent width, ...) differs
  from the checkpoint's is refused with the differing keys listed.
  meta: {"image_shape", "config", "step", "latent_stats" (None if absent)}.
  """
  saved = checkpointing.saved_meta(workdir)
  if saved is None:
    raise checks.InputError(f"autoencoder workdir {str(workdir)!r} has no checkpoints; train the "
                            "autoencoder there first (python -m asyncpatch_jax.main "
                            f"--config=configs/vqae_textures.py --workdir={workdir}).")
  config = ml_collections.ConfigDict(saved["config"])
  if "autoencoder" not in config:
    raise checks.InputError(f"workdir {str(workdir)!r} holds a checkpoint of a diffusion model, "
                            "not an autoencoder (its config has no `autoencoder` section).")
  if ae_config is not None:
    diffs = compat.config_differences(saved["model"], architecture(ae_config))
    if diffs:
      raise checks.InputError(
          f"autoencoder workdir {str(workdir)!r} was trained with another architecture; "
          "differing keys (checkpoint -> requested):\n  " + "\n  ".join(diffs))
  image_shape = tuple(saved["image_shape"])
  ae = vqae.build_autoencoder(config.autoencoder)
  ae.latent_shape(image_shape)                       # checks H, W, C
  abstract = jax.eval_shape(
      lambda: vqae.init_variables(ae, jax.random.key(0), image_shape)["params"])
  ckpt = checkpointing.Checkpointer(workdir, config, image_shape, every=1, keep=None,
                                    model=architecture(config.autoencoder), read_only=True)
  try:
    ckpt.check_compatible(training=False)
    restored = _restore(ckpt, {"params": abstract, "step": _step_field()}, workdir)
  finally:
    ckpt.close()
  stats_path = storage.path(workdir) / LATENT_STATS
  stats = json.loads(stats_path.read_text()) if stats_path.exists() else None
  return ae, restored["params"], {"image_shape": image_shape, "config": config,
                                  "latent_stats": stats,
                                  "step": int(jax.device_get(restored["step"]))}


def load_codec(workdir, pixel_shape, scale: float = 0.0,
               model_config=None) -> latent_codec.LatentCodec:
  """The codec of a trained autoencoder workdir for images of `pixel_shape` [H, W, C].

  scale: 0 reads 1 / std from the workdir's latent_stats.json (written at the end of
  the autoencoder's training). model_config: the UNet's `config.model`, checked
  against the latent shape (channels, divisibility).
  """
  if not workdir:
    raise checks.InputError("latent.autoencoder_workdir is empty; name a trained autoencoder "
                            "workdir (configs/vqae_*.py).")
  ae, params, meta = load_autoencoder(workdir)
  pixel_shape = tuple(int(s) for s in pixel_shape)
  if pixel_shape[-1] != ae.image_channels:
    raise checks.InputError(f"the images have {pixel_shape[-1]} channels but the autoencoder in "
                            f"{str(workdir)!r} was trained on {ae.image_channels}.")
  latent_shape = ae.latent_shape(pixel_shape)
  if model_config is not None:
    if model_config.out_channels != ae.latent_channels:
      raise checks.InputError(
          f"model.out_channels={model_config.out_channels} but the autoencoder's latent has "
          f"{ae.latent_channels} channels; set --config.model.out_channels={ae.latent_channels}.")
    down = 2 ** (len(model_config.channel_mult) - 1)
    if latent_shape[0] % down or latent_shape[1] % down:
      raise checks.InputError(
          f"the latent is {latent_shape[0]}x{latent_shape[1]} (images {pixel_shape[0]}x"
          f"{pixel_shape[1]} / f={ae.factor}), not divisible by the UNet's downsampling {down} "
          f"({len(model_config.channel_mult)} levels); use fewer UNet levels or larger images.")
  if not scale:
    stats = meta["latent_stats"]
    if stats is None or not stats.get("std"):
      raise checks.InputError(
          f"autoencoder workdir {str(workdir)!r} has no latent_stats.json (written when its "
          "training finishes); finish the training or set --config.latent.scale.")
    scale = 1.0 / stats["std"]
  if not np.isfinite(scale) or scale <= 0:
    raise checks.InputError(f"latent.scale={scale}; expected a positive number (0 = from the "
                            "autoencoder's latent statistics).")
  return latent_codec.LatentCodec(ae, jax.device_get(params), scale, pixel_shape)
