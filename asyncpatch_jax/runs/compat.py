"""Which saved runs a config may resume or load: the config-compatibility policy.

A checkpoint's `meta` records the model config, the image shape and the full config of
the run that wrote it. Loading refuses another model (any differing `model` key or image
shape) and lists the differing keys; a training run also refuses changed training
settings (the learning-rate schedule, data, loss: everything but FREE_TO_CHANGE) unless
`train.allow_schedule_change` is set.
"""

from __future__ import annotations

from typing import Any

from absl import logging

from asyncpatch_jax.config import base_config
from asyncpatch_jax.runtime import checks

# Settings a resumed training run may change freely: they do not change what the
# remaining steps compute (logging, checkpointing, sampling and evaluation, the mesh
# layout, where the data lives). Anything else (optim.*, train.num_steps,
# train.batch_size, seed, data, timesteps, loss, ...) changes the run's trajectory.
FREE_TO_CHANGE = ("sample.", "evaluate.", "train.log_every", "train.checkpoint_every",
                  "train.keep_checkpoints", "train.sample_every", "train.progress_bar",
                  "train.fsdp", "train.allow_schedule_change", "train.lock_timeout",
                  "train.skip_memory_check", "model.remat",
                  "data.data_dir",
                  "uncertainty.head_workdir", "uncertainty.model_workdir",
                  "uncertainty.policy", "uncertainty.budget", "uncertainty.speedup",
                  "uncertainty.overlap", "uncertainty.quantile", "uncertainty.look_ahead",
                  "uncertainty.sub_steps", "uncertainty.grid", "uncertainty.ipr_order",
                  "uncertainty.debug")



def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(d, dict):
    out = {}
    for k, v in d.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


def config_differences(saved: dict, current: dict) -> list[str]:
  """'key: saved -> current' for every leaf that differs (sorted)."""
  a, b = _flatten(saved), _flatten(current)
  return [f"{k}: {a.get(k, '<missing>')!r} -> {b.get(k, '<missing>')!r}"
          for k in sorted(set(a) | set(b)) if a.get(k, "<missing>") != b.get(k, "<missing>")]


# Model settings that change memory, not the function: a run may load or resume under another.
MEMORY_ONLY = ("remat",)
# Where a model's settings sit in a checkpoint's meta['model']: at the top (a diffusion
# model) or under 'frozen.model.' (the model an uncertainty head was trained on).
_MODEL_PREFIXES = ("", "frozen.model.")


def model_differences(saved: dict, current: dict) -> list[str]:
  """`config_differences` of two checkpoints' meta['model'], with the rule for keys added
  since a run was saved: a model key the saved side lacks whose current value is its
  default in base_config (the value every run had before the key existed: a run saved
  before `model.name` is a UNet) is not a difference. Memory-only settings (MEMORY_ONLY)
  never are."""
  defaults = _flatten(base_config.get_base_config().model.to_dict())
  a, b = _flatten(saved), _flatten(current)
  keep = []
  for diff in config_differences(saved, current):
    key = diff.split(":")[0]
    for prefix in _MODEL_PREFIXES:
      name = key[len(prefix):] if key.startswith(prefix) else None
      if name in MEMORY_ONLY or (name in defaults and key not in a
                                 and b.get(key) == defaults[name]):
        break
    else:
      keep.append(diff)
  return keep


def trajectory_differences(saved: dict, current: dict) -> list[str]:
  """The config differences that change what training computes (all but FREE_TO_CHANGE).

  A key that only one side has was added or removed by a newer version of this code,
  not changed by the user, and is not counted.
  """
  return [d for d in config_differences(saved, current)
          if "'<missing>'" not in d
          and not any(d.startswith(p) if p.endswith(".") else d.split(":")[0] == p
                      for p in FREE_TO_CHANGE)]



def check(workdir, step: int, saved: dict, meta: dict, *, training: bool,
          changed_config_name: str) -> bool:
  """Raises InputError if `saved` (a checkpoint's meta) cannot be resumed or loaded as `meta`.

  Returns True when a training run resumes changed training settings that
  train.allow_schedule_change accepts (the run then records its config as
  `changed_config_name`), else False.
  """
  diffs = model_differences(saved["model"], meta["model"])
  if saved["image_shape"] != meta["image_shape"]:
    diffs.append(f"image_shape: {saved['image_shape']} -> {meta['image_shape']}")
  if diffs:
    raise checks.InputError(
        f"workdir {str(workdir)!r} holds a checkpoint (step {step}) of a different model; "
        "refusing to resume it. Differing keys (checkpoint -> this run):\n  "
        + "\n  ".join(diffs) + "\nUse another --workdir, or the checkpoint's config "
        f"(--config={workdir / 'config.json'}).")
  if not training:
    return False
  changed = trajectory_differences(saved["config"], meta["config"])
  if not changed:
    return False
  allowed = bool(meta["config"].get("train", {}).get("allow_schedule_change", False))
  listed = "; ".join(changed)
  if not allowed:
    raise checks.InputError(
        f"workdir {str(workdir)!r}: resuming step {step} with changed training settings "
        f"({listed}) would change the learning-rate schedule, data or loss mid-run; "
        f"refusing. Rerun with the checkpoint's settings (--config={workdir / 'config.json'}"
        "), or accept the change with --config.train.allow_schedule_change=True (the "
        f"workdir then keeps its config.json and records this run's as "
        f"{changed_config_name}).")
  logging.warning("resuming step %d with changed training settings (%s), accepted by "
                  "train.allow_schedule_change; config.json keeps the original config, this "
                  "run's is %s.", step, listed, changed_config_name)
  return True
