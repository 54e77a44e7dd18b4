"""Which values each config key accepts: one rule per key, applied before anything runs.

`validate(config)` runs at the start of every mode (main.py), before anything is built or
read from the workdir.
"""

from __future__ import annotations

import abc
import dataclasses
import numbers
import math

import ml_collections

from asyncpatch_jax.data import datasets
from asyncpatch_jax.runtime import checks

# ---- Valid values: one rule per key -------------------------------------------------------
# `validate(config)` applies them at the start of every mode (main.py), before anything is
# built or read from the workdir. A rule judges the value alone; what depends on other keys
# or on the data (sample.grid must divide the image, evaluate.k < evaluate.num_samples, the
# dataset's channels, ...) is checked where it is read. tests/test_config_validation.py
# requires a rule for every key of both base configs that accepts its default, and checks
# the name lists below against the modules that define them (importing those here would
# load jax, and --help must not).


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_sequence(value) -> bool:
  return isinstance(value, (tuple, list))


class Rule(abc.ABC):
  """What a key accepts: `accepts(value)`, `expected()` (the words after "expected") and
  `hint(value)` (a sentence after them, e.g. the close matches of a misspelt name)."""

  @abc.abstractmethod
  def accepts(self, value) -> bool:
    """True when `value` is valid for the key."""

  @abc.abstractmethod
  def expected(self) -> str:
    """What the key accepts, in words."""

  def hint(self, value) -> str:  # pylint: disable=unused-argument
    return ""


def _ints_noun(low: int, odd: bool = False) -> str:
  kind = "odd integers" if odd else "integers"
  return {1: f"positive {kind}", 0: f"{kind} >= 0"}.get(low, f"{kind} >= {low}")


@dataclasses.dataclass(frozen=True)
class Int(Rule):
  """An integer (not a bool, not a float) in [low, high]."""
  low: int = 1
  high: int | None = None

  def accepts(self, value) -> bool:
    return _is_int(value) and value >= self.low and (self.high is None or value <= self.high)

  def expected(self) -> str:
    if self.high is not None:
      return f"an integer in [{self.low}, {self.high}]"
    return {1: "a positive integer", 0: "an integer >= 0"}.get(self.low,
                                                                 f"an integer >= {self.low}")


@dataclasses.dataclass(frozen=True)
class Number(Rule):
  """A finite number (an int or a float, not a bool) in the interval (checks.check_range's)."""
  low: float | None = None
  high: float | None = None
  low_open: bool = False
  high_open: bool = False

  def accepts(self, value) -> bool:
    if not _is_number(value) or not math.isfinite(value):
      return False
    if self.low is not None and not (value > self.low if self.low_open else value >= self.low):
      return False
    return self.high is None or (value < self.high if self.high_open else value <= self.high)

  def expected(self) -> str:
    where = checks.interval(self.low, self.high, low_open=self.low_open,
                            high_open=self.high_open)
    return f"a number {where}" if where else "a finite number"


@dataclasses.dataclass(frozen=True)
class Choice(Rule):
  """One of `names` (a string); the error names the close matches."""
  names: tuple[str, ...]

  def accepts(self, value) -> bool:
    return isinstance(value, str) and value in self.names

  def expected(self) -> str:
    return "one of " + ", ".join(repr(n) for n in self.names)

  def hint(self, value) -> str:
    return checks.did_you_mean(value, self.names) if isinstance(value, str) else ""


@dataclasses.dataclass(frozen=True)
class Bool(Rule):
  """True or False (not 0 or 1)."""

  def accepts(self, value) -> bool:
    return isinstance(value, bool)

  def expected(self) -> str:
    return "True or False"


@dataclasses.dataclass(frozen=True)
class Text(Rule):
  """A string, e.g. a path or URL ('' = none)."""
  meaning: str = "a path, or '' for none"

  def accepts(self, value) -> bool:
    return isinstance(value, str)

  def expected(self) -> str:
    return f"a string ({self.meaning})"


@dataclasses.dataclass(frozen=True)
class Ints(Rule):
  """A tuple of integers >= low (odd if `odd`), of one of `lengths` or at least min_length."""
  low: int = 1
  lengths: tuple[int, ...] | None = None
  min_length: int = 0
  odd: bool = False

  def accepts(self, value) -> bool:
    return (_is_sequence(value) and all(_is_int(v) and v >= self.low and
                                        (not self.odd or v % 2 == 1) for v in value)
            and (len(value) in self.lengths if self.lengths is not None
                 else len(value) >= self.min_length))

  def expected(self) -> str:
    noun = _ints_noun(self.low, self.odd)
    if self.lengths is not None:
      return " or ".join("()" if n == 0 else f"a tuple of {n} {noun}" for n in self.lengths)
    return f"a {'non-empty ' if self.min_length else ''}tuple of {noun}"


@dataclasses.dataclass(frozen=True)
class Numbers(Rule):
  """A tuple of `length` finite numbers."""
  length: int

  def accepts(self, value) -> bool:
    return (_is_sequence(value) and len(value) == self.length
            and all(_is_number(v) and math.isfinite(v) for v in value))

  def expected(self) -> str:
    return f"a tuple of {self.length} numbers"


@dataclasses.dataclass(frozen=True)
class Names(Rule):
  """A tuple of names from `names` (at least min_length of them)."""
  names: tuple[str, ...]
  min_length: int = 0

  def accepts(self, value) -> bool:
    return (_is_sequence(value) and len(value) >= self.min_length
            and all(isinstance(v, str) and v in self.names for v in value))

  def expected(self) -> str:
    return (f"a {'non-empty ' if self.min_length else ''}tuple of names from "
            + ", ".join(repr(n) for n in self.names))

  def hint(self, value) -> str:
    unknown = [v for v in value if v not in self.names] if _is_sequence(value) else []
    if not unknown or not isinstance(unknown[0], str):
      return ""
    return f" Unknown: {unknown[0]!r}.{checks.did_you_mean(unknown[0], self.names)}"


@dataclasses.dataclass(frozen=True)
class ClassLabel(Rule):
  """'auto', 'cycle', 'null' or a class id (an integer >= 0, also as a string)."""
  names: tuple[str, ...] = ("auto", "cycle", "null")

  def accepts(self, value) -> bool:
    if isinstance(value, str):
      return value in self.names or (value.isascii() and value.isdigit())
    return _is_int(value) and value >= 0

  def expected(self) -> str:
    return ", ".join(repr(n) for n in self.names) + " or a class id (an integer >= 0)"

  def hint(self, value) -> str:
    return checks.did_you_mean(value, self.names) if isinstance(value, str) else ""


@dataclasses.dataclass(frozen=True)
class Options(Rule):
  """A dict of keyword arguments (free-form: its keys are not config keys)."""

  def accepts(self, value) -> bool:
    return isinstance(value, (dict, ml_collections.ConfigDict)) and all(
        isinstance(k, str) for k in value.keys())

  def expected(self) -> str:
    return "a dict of keyword arguments, e.g. {'grid_size': 4}"


# The names some rules list, defined in modules that load jax (the tests compare them).
TIMESTEP_SAMPLERS = ("global", "independent", "patchwise", "perlin",
                     "asyncpatch")                               # timesteps.SAMPLER_NAMES
SAMPLE_TASKS = ("generate", "inpaint", "outpaint", "autoregressive", "progressive",
                "interleaved", "ipr", "adaptive", "ordered")     # sample_mode.TASKS
ADAPTIVE_POLICIES = ("uncertainty_accelerated", "look_ahead", "dual_loop")  # sample_mode's
IPR_ORDERS = ("raster", "uncertainty")                           # sample_mode.IPR_ORDERS
DTYPES = ("float32", "bfloat16")                                 # models._DTYPES, vqae._DTYPES
MODEL_NAMES = ("unet", "dit")                                    # models.MODELS
REMAT = ("none", "block", "full")                                # models.REMAT
MODULATIONS = ("adaln_zero", "adaln_single")                     # dit.MODULATIONS
CLEAN_FAMILIES = ("inpaint", "autoregressive", "random")        # timesteps.CLEAN_FAMILIES
MASK_FAMILIES = ("thin", "medium", "thick", "wide", "square", "extrema",
                 "left_half")                                    # data/masks.FAMILIES
TRAINING_MASK_FAMILIES = ("box", "stroke") + MASK_FAMILIES       # data/training_masks.py
INPAINT_METHODS = ("asyncpatch", "asyncpatch_input_guidance", "progressive",
                   "repaint")                                    # inpainting_eval.METHODS
REFERENCE_SPLITS = ("train", "test")                       # evaluators/generation.py's
EVALUATORS = ("digit_classifier", "generation", "inpainting")   # evaluators/common.EVALUATORS
BETA_CONVENTIONS = ("codebook", "commitment")                    # autoencoder_losses.BETA_CONVENTIONS

_POSITIVE, _COUNT, _FRACTION = Int(1), Int(0), Number(0, 1)
_WEIGHT = Number(0)                       # a loss or guidance weight: >= 0

RULES: dict[str, Rule] = {
    "seed": Int(0, 2 ** 63 - 1),
    "trainer": Choice(("diffusion", "autoencoder", "head")),      # base_config.TRAINERS
    "data.dataset": Choice(datasets.DATASETS),
    "data.data_dir": Text("a TFDS folder or gs:// URL, or '' for an embedded dataset"),
    "data.options": Options(),
    "model.name": Choice(MODEL_NAMES),
    "model.out_channels": _POSITIVE,
    "model.base_channels": _POSITIVE,
    "model.channel_mult": Ints(min_length=1),
    "model.num_res_blocks": Ints(low=0, min_length=1),
    "model.num_middle_blocks": _COUNT,
    "model.attention_resolutions": Ints(),
    "model.head_dim": _POSITIVE,
    "model.time_embed_dim": _POSITIVE,
    "model.num_classes": _COUNT,
    "model.dropout": Number(0, 1, high_open=True),
    "model.norm": Choice(("group", "rms")),
    "model.num_groups": _POSITIVE,
    "model.dtype": Choice(DTYPES),
    "model.remat": Choice(REMAT),
    "model.patch_size": _POSITIVE,
    "model.hidden_size": _POSITIVE,
    "model.depth": _POSITIVE,
    "model.num_heads": _POSITIVE,
    "model.mlp_ratio": Number(0, None, low_open=True),
    "model.modulation": Choice(MODULATIONS),
    "model.clean_context": Bool(),
    "timesteps.sampler": Choice(TIMESTEP_SAMPLERS),
    "timesteps.t_min": Number(0, 1, high_open=True),
    "timesteps.t_max": Number(0, 1, low_open=True),
    "timesteps.patch_sizes": Ints(),
    "timesteps.perlin_cells": Ints(min_length=1),
    "timesteps.perlin_octaves": _POSITIVE,
    "timesteps.perlin_threshold": Numbers(2),
    "timesteps.antithetic": Bool(),
    "timesteps.clean_fraction": _FRACTION,
    "timesteps.clean_families": Names(CLEAN_FAMILIES, min_length=1),
    "loss.weighting": Choice(("sigmoid", "mse")),
    "loss.bias": Number(),
    "loss.mu_reg": _WEIGHT,
    "loss.reg_patch_size": _POSITIVE,
    "loss.reg_probes": _POSITIVE,
    "optim.learning_rate": Number(0, low_open=True),
    "optim.warmup_steps": _COUNT,
    "optim.decay": Choice(("cosine", "constant")),
    "optim.end_lr_ratio": _FRACTION,
    "optim.b1": Number(0, 1, high_open=True),
    "optim.b2": Number(0, 1, high_open=True),
    "optim.eps": Number(0, low_open=True),
    "optim.weight_decay": Number(0),
    "optim.grad_clip": Number(0, low_open=True),
    "train.batch_size": _POSITIVE,
    "train.num_steps": _POSITIVE,
    "train.label_dropout": _FRACTION,
    "train.ema_decay": Number(0, 1, high_open=True),
    "train.fsdp": _POSITIVE,
    "train.log_every": _POSITIVE,
    "train.checkpoint_every": _POSITIVE,
    "train.keep_checkpoints": _POSITIVE,
    "train.sample_every": _COUNT,
    "train.progress_bar": Bool(),
    "train.allow_schedule_change": Bool(),
    "train.lock_timeout": Number(0, low_open=True),
    "train.skip_memory_check": Bool(),      # (used once the key is declared)
    "sample.num_steps": _POSITIVE,
    "sample.eta": _FRACTION,
    "sample.guidance": _WEIGHT,
    "sample.input_guidance": _WEIGHT,
    "sample.input_guidance_t": _FRACTION,
    "sample.num_images": _COUNT,            # 0: no grids after training (--mode=sample: >= 1)
    "sample.batch_size": _POSITIVE,
    "sample.task": Choice(SAMPLE_TASKS),
    "sample.label": ClassLabel(),
    "sample.image": Text("a PNG path, or '' for none"),
    "sample.mask": Text("a PNG path, or '' for none"),
    "sample.box": Ints(low=0, lengths=(0, 2)),
    "sample.num_stripes": _POSITIVE,
    "sample.num_rounds": _POSITIVE,
    "sample.grid": Ints(lengths=(2,)),
    "sample.ipr_rounds": _POSITIVE,
    "sample.ipr_alpha": Number(0, 1, low_open=True),
    "sample.out_dir": Text("a folder path, or '' for <workdir>/samples/<task>"),
    "sample.clean_cache": Bool(),
    "uncertainty.model_workdir": Text("a workdir, or '' for none"),
    "uncertainty.head_workdir": Text("a workdir, or '' for none"),
    "uncertainty.channels": _POSITIVE,
    "uncertainty.num_layers": _POSITIVE,
    "uncertainty.time_features": _POSITIVE,
    "uncertainty.logvar_min": Number(),
    "uncertainty.logvar_max": Number(),
    "uncertainty.policy": Choice(ADAPTIVE_POLICIES),
    "uncertainty.budget": _COUNT,
    "uncertainty.speedup": Number(1),
    "uncertainty.overlap": Number(0, 1, high_open=True),
    "uncertainty.quantile": _FRACTION,
    "uncertainty.look_ahead": Number(1),
    "uncertainty.sub_steps": _POSITIVE,
    "uncertainty.grid": Ints(lengths=(0, 2)),
    "uncertainty.ipr_order": Choice(IPR_ORDERS),
    "uncertainty.debug": Bool(),
    "evaluate.at_end": Names(EVALUATORS),
    "evaluate.evaluators": Names(EVALUATORS),
    "evaluate.classifier_samples": _COUNT,
    "evaluate.classifier_steps": _POSITIVE,
    "evaluate.reconstruct_images": _COUNT,
    "evaluate.num_samples": Int(2),
    "evaluate.batch_size": _POSITIVE,
    "evaluate.guidance": _WEIGHT,
    "evaluate.reference_split": Choice(REFERENCE_SPLITS),
    "evaluate.num_reference": _COUNT,
    "evaluate.mask_families": Names(MASK_FAMILIES),
    "evaluate.num_inpaint": _COUNT,
    "evaluate.inpaint_method": Choice(INPAINT_METHODS),
    "evaluate.input_guidance": _WEIGHT,
    "evaluate.repaint": Ints(lengths=(3,)),
    "evaluate.k": _POSITIVE,
    "evaluate.interval_resamples": _COUNT,
    "evaluate.feature_steps": _POSITIVE,
    "evaluate.inception_weights": Text("an .npz/.safetensors path, or '' for none"),
    "evaluate.lpips_weights": Text("an .npz/.safetensors path, or '' for none"),
    "evaluate.out": Text("a file path, or '' for <workdir>/evaluate.json"),
    "latent.autoencoder_workdir": Text("a workdir, or '' for a pixel model"),
    "latent.scale": Number(0),
    "autoencoder.image_channels": _POSITIVE,
    "autoencoder.base_channels": _POSITIVE,
    "autoencoder.channel_mult": Ints(min_length=1),
    "autoencoder.num_res_blocks": _POSITIVE,
    "autoencoder.latent_channels": _POSITIVE,
    "autoencoder.codebook_size": _POSITIVE,
    "autoencoder.encoder_kernels": Ints(min_length=1, odd=True),
    "autoencoder.attention_resolutions": Ints(),
    "autoencoder.head_dim": _POSITIVE,
    "autoencoder.mask_embed_dim": _POSITIVE,
    "autoencoder.dtype": Choice(DTYPES),
    "autoencoder.beta": _WEIGHT,
    "autoencoder.beta_on": Choice(BETA_CONVENTIONS),
    "autoencoder.codebook_weight": _WEIGHT,
    "autoencoder.l1_weight": _WEIGHT,
    "autoencoder.lpips_weight": _WEIGHT,
    "autoencoder.lpips_weights": Text("an .npz/.safetensors path, or '' for none"),
    "autoencoder.disc_weight": _WEIGHT,
    "autoencoder.disc_start": _COUNT,
    "autoencoder.disc_layers": _POSITIVE,
    "autoencoder.disc_channels": _POSITIVE,
    "autoencoder.dead_after": _POSITIVE,
    "autoencoder.restart_dead_codes": Bool(),
    "autoencoder.mask_fraction": _FRACTION,
    "autoencoder.mask_families": Names(TRAINING_MASK_FAMILIES, min_length=1),
}


def _one_line_repr(value) -> str:
  if isinstance(value, ml_collections.ConfigDict):
    value = value.to_dict()
  return " ".join(repr(value).split()) if "\n" in repr(value) else repr(value)


def check_value(key: str, value) -> None:
  """InputError "key=value; expected ..." unless RULES[key] accepts `value`."""
  rule = RULES[key]
  if not rule.accepts(value):
    raise checks.InputError(f"{key}={_one_line_repr(value)}; expected {rule.expected()}."
                            f"{rule.hint(value)}")


def validate(config) -> None:
  """Checks every key of `config` that RULES has a rule for; InputError for the first bad one.

  config: a ConfigDict (or a dict) of this file's sections; keys it lacks (an autoencoder
  config has no `sample`) are skipped. The message names the key, its value and what it
  accepts, e.g. "sample.eta=2.0; expected a number in [0, 1]."
  """
  for key, rule in RULES.items():
    node, found = config, True
    parts = key.split(".")
    for i, part in enumerate(parts):
      if not isinstance(node, (dict, ml_collections.ConfigDict)):
        section = ".".join(parts[:i])
        raise checks.InputError(f"{section}={_one_line_repr(node)}; expected a section of "
                                "keys (a dict), as in asyncpatch_jax/config/base_config.py.")
      if part not in node:
        found = False
        break
      node = node[part]
    if found:
      check_value(key, node)
