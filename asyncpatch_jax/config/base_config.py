"""The full set of config keys with their defaults; every file in configs/ starts from it.

Keeping every key here means a `--config.<key>=value` override of a key that does
not exist fails (the config is locked) and names the close matches. Each key's
trailing `# comment` is its meaning: `--help` prints it beside the default
(`describe_keys` reads this file's source), so every key has one. Each key's rule in
`RULES` says which values it accepts; `validate(config)` applies them (main.py, first
thing in every mode).
"""

from __future__ import annotations

import abc
import ast
import dataclasses
import io
import math
import numbers
import tokenize
from collections.abc import Callable
from typing import Any

import ml_collections

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.data import datasets


def get_base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all experiments (AsyncPatch App. E where the paper fixes them)."""
  config = ml_collections.ConfigDict()
  config.seed = 0   # seed of the run's one root key: initialisation, batches, time maps, sampling

  config.data = dict(
      dataset="digits",      # see asyncpatch_jax.data.datasets.DATASETS
      data_dir="",           # prepared TFDS directory (real datasets only)
      options={},            # extra keyword arguments of the dataset source
  )

  config.model = dict(
      out_channels=1,        # image channels C (must match the data)
      base_channels=32,      # channels at the first level
      channel_mult=(1, 2, 2),  # per-level multipliers of base_channels (L levels)
      num_res_blocks=(1, 1, 1),  # residual blocks per level on the way down (up: one more)
      num_middle_blocks=1,   # (attention, residual) pairs after the first middle residual block
      attention_resolutions=(4,),  # feature-map heights with self-attention
      head_dim=32,           # channels per attention head
      time_embed_dim=64,     # width of the per-pixel time embedding (the FiLM input)
      num_classes=10,        # class labels 0..n-1 (n = the null label of CFG); 0 = unconditional
      dropout=0.0,           # dropout rate inside residual blocks (training only)
      norm="group",          # group | rms
      num_groups=32,         # GroupNorm groups (gcd with the channel count)
      dtype="float32",       # compute dtype: float32 | bfloat16 (params stay float32)
  )

  config.timesteps = dict(
      sampler="asyncpatch",  # global | independent | patchwise | perlin | asyncpatch
      t_min=0.0,             # lowest training time (0 = clean, 1 = noise)
      t_max=1.0,             # highest training time
      patch_sizes=(),        # () -> powers of two from 2 to H/2
      perlin_cells=(4, 8, 16),  # perlin: lattice spacings (pixels), one drawn per image
      perlin_octaves=3,      # perlin: octaves of the noise mask
      perlin_threshold=(-0.2, 0.2),  # perlin: mask = noise > thr, thr ~ U(lo, hi) per image
      antithetic=False,      # asyncpatch: patches paired as tbar +/- u (exact per-image mean)
  )

  config.loss = dict(
      weighting="sigmoid",   # sigmoid (SiD2) | mse
      bias=0.0,              # b of the sigmoid weighting
      mu_reg=0.0,            # weight of the PIFS collage regulariser (0 = off)
      reg_patch_size=4,      # block size of the collage regulariser
      reg_probes=1,          # random probes per step
  )

  config.optim = dict(
      learning_rate=1e-3,    # peak learning rate
      warmup_steps=100,      # linear warmup from 0 to the peak
      decay="cosine",        # cosine | constant
      end_lr_ratio=0.05,     # final lr / peak lr for cosine
      b1=0.9,                # Adam beta1
      b2=0.99,               # Adam beta2
      eps=1e-8,              # Adam epsilon
      weight_decay=0.0,      # AdamW decoupled weight decay
      grad_clip=1.0,         # clip gradients to this global norm
  )

  config.train = dict(
      batch_size=128,        # global batch
      num_steps=2000,        # training steps
      label_dropout=0.1,     # p of replacing the label by the null class (CFG)
      ema_decay=0.999,       # EMA decay of the parameters (ramped up: min(d, (1+k)/(10+k)))
      fsdp=1,                # size of the mesh's fsdp axis (1 = pure data parallel)
      log_every=100,         # write metrics (and check they are finite) every N steps
      checkpoint_every=500,  # save a checkpoint every N steps (and at the end)
      keep_checkpoints=3,    # newest checkpoints kept; older ones are deleted
      sample_every=0,        # sample grids every N steps (0 = only at the end)
      progress_bar=True,     # progress bars of every phase (training, grids, evaluation, sampling)
      allow_schedule_change=False,  # True: a resume may change the training settings
                                    # (schedule, optimizer, batch, data, loss; refused if
                                    # False); config.json stays, the new one is
                                    # config.step_<k>.json
      lock_timeout=300.0,    # seconds after which another run takes over this run's
                             # workdir lock (run.lock) once its heartbeat (every
                             # lock_timeout / 4 s) stopped; a dead process of this host: at once
      skip_memory_check=False,  # True: train even when the train step's estimated peak memory
                                # per device (logged before anything is allocated) exceeds
                                # the devices' memory; False stops with settings that fit
  )

  config.sample = dict(
      num_steps=50,          # sampler steps of a synchronous schedule
      eta=0.25,              # stochastic coefficient (AsyncPatch App. E)
      guidance=2.0,          # classifier-free guidance weight w_c (Eq. 6-7)
      input_guidance=0.0,    # input guidance weight w_i (Eq. 8)
      input_guidance_t=0.6,  # extra noise level of the guidance region
      num_images=64,         # images per grid
      batch_size=64,         # images per sampler call (evaluation, --mode=sample)
      # --mode=sample (python -m asyncpatch_jax.main --mode=sample ...):
      task="generate",       # one of sample_mode.TASKS (--help lists them)
      label="auto",          # 'cycle' (0, 1, ...), 'null' (unconditional) or a class id; 'auto':
                             # 'null' for tasks that start from a known image, else 'cycle'
      image="",              # inpaint/progressive/interleaved: PNG of the model's size;
                             # outpaint: a smaller PNG placed at `box`
      mask="",               # PNG, white (255) = known pixel, black (0) = generate
      box=(),                # outpaint: (top, left) of the image on the canvas; () = centred
      num_stripes=4,         # progressive/interleaved/outpaint bands
      num_rounds=4,          # interleaved visits per stripe
      grid=(2, 2),           # autoregressive patch grid (rows, cols); ipr: the regions
      ipr_rounds=10,         # ipr: refinement rounds R (IPR Alg. 1)
      ipr_alpha=0.25,        # ipr: resampling ratio alpha
      out_dir="",            # default: <workdir>/samples/<task>
  )

  # Uncertainty head and adaptive sampling (AsyncPatch Sec. 5.5; SRM; Patch Forcing):
  # a config with model_workdir set trains a head on that workdir's frozen model.
  config.uncertainty = dict(
      model_workdir="",      # head training: the trained workdir whose (EMA) model is frozen
      head_workdir="",       # sampling: the trained head (tasks adaptive, ordered; ipr order)
      channels=16,           # head width (models/uncertainty_head.py)
      num_layers=3,          # head depth (3x3 convolutions)
      time_features=16,      # sinusoidal features of the per-pixel time
      logvar_min=-12.0,      # lower clamp of the predicted log-variance
      logvar_max=6.0,        # upper clamp of the predicted log-variance
      policy="uncertainty_accelerated",  # task adaptive: uncertainty_accelerated | look_ahead | dual_loop
      budget=0,              # steps (network evaluations); 0 = sample.num_steps
      speedup=2.0,           # uncertainty_accelerated: pace of the most certain region
      overlap=0.0,           # uncertainty_ordered (task ordered, ipr order): SRM overlap
      quantile=0.4,          # look_ahead / dual_loop: certain = below this per-image quantile
      look_ahead=1.4,        # look_ahead: progress factor of the certain regions
      sub_steps=4,           # dual_loop: sub-steps of the uncertain regions
      grid=(),               # policy regions (rows, cols); () = pixels (adaptive), sample.grid (ordered)
      ipr_order="raster",    # ipr: raster (inpainting) | uncertainty (SRM order, needs head_workdir)
      debug=False,           # check the policy's invariants at every step
  )

  config.eval = dict(
      num_samples=512,       # samples scored at the end of training (0 = skip)
      classifier_steps=600,  # steps of the in-project digit classifier
  )

  # --mode=evaluate (modes/evaluate_mode.py, evaluation/workdir_eval.py): a trained workdir's
  # generation and inpainting quality, written to <workdir>/evaluate.json. The sampler
  # settings (num_steps, eta, num_stripes) are config.sample's.
  config.evaluate = dict(
      num_samples=1000,      # generated samples (labels cycle over the classes); >= 2, > k
      batch_size=250,        # images per sampler / feature-network call
      guidance=0.0,          # CFG weight of the generated samples
      reference_split="train",  # real images the samples are compared with (train | test)
      num_reference=0,       # real images; 0 = num_samples (at most the split's size)
      mask_families=("thin", "wide", "square", "extrema"),  # data/masks.py families
      num_inpaint=256,       # held-out (test split) images inpainted per family; 0 = none
      inpaint_method="asyncpatch",  # asyncpatch | asyncpatch_input_guidance | progressive | repaint
      input_guidance=1.0,    # asyncpatch_input_guidance: weight w_i (Eq. 8)
      repaint=(250, 10, 10),  # repaint: num_steps, jump_length, jump_n_sample
      k=5,                   # PRDC nearest neighbours
      feature_steps=600,     # training steps of the in-project feature network (digits, textures)
      inception_weights="",  # FID Inception-v3 weights (.npz/.safetensors): adds fid, *_inception
      lpips_weights="",      # LPIPS weights (.npz/.safetensors): adds lpips to inpainting
      out="",                # default <workdir>/evaluate.json
  )

  # Latent AsyncPatch (Sec. 5.2): the UNet runs on the latents of a trained autoencoder.
  config.latent = dict(
      autoencoder_workdir="",  # workdir of a trained configs/vqae_*.py run ("" = pixel model)
      scale=0.0,               # latent multiplier; 0 = 1 / std of the training latents
  )
  return config


def get_autoencoder_base_config() -> ml_collections.ConfigDict:
  """Defaults of an autoencoder run (configs/vqae_*.py): seed, data, optim, train, eval and
  `autoencoder` (AsyncPatch App. F, Table 7; latent diffusion's f = 4 VQ model).

  A config with an `autoencoder` section trains the autoencoder (training/autoencoder_train.py).
  """
  base = get_base_config()
  config = ml_collections.ConfigDict()
  for section in ("seed", "data", "optim", "train", "eval"):
    config[section] = base[section]
  config.optim.update(b1=0.5, b2=0.9)   # Adam betas of latent diffusion's autoencoder
  config.autoencoder = dict(
      # Architecture (models/vqae.py).
      image_channels=3,                # image channels C
      base_channels=128,               # channels at the first level
      channel_mult=(1, 2, 4),          # f = 2^(L-1) = 4
      num_res_blocks=2,                # residual blocks per level
      latent_channels=3,               # channels of the latent (the diffusion model's image)
      codebook_size=8192,              # codes K of the quantiser
      encoder_kernels=(3, 3, 1),       # kernel per encoder level: sets the halo (locality)
      attention_resolutions=(),        # decoder only; the encoder never attends
      head_dim=64,                     # channels per attention head
      mask_embed_dim=128,              # width of the mask embedding (the FiLM input)
      dtype="float32",                 # compute dtype (params stay float32)
      # Loss (taming / latent diffusion's VQ loss).
      beta=0.25,                       # VQ loss weight of the term beta_on names
      beta_on="codebook",              # codebook: taming legacy; commitment: VQ-VAE paper
      codebook_weight=1.0,             # weight of the VQ loss
      l1_weight=1.0,                   # weight of the L1 reconstruction loss (known pixels)
      lpips_weight=0.0,                # > 0 needs lpips_weights (evaluation/ LPIPS module)
      lpips_weights="",                # LPIPS weights file (.npz/.safetensors)
      disc_weight=0.0,                 # PatchGAN hinge loss weight (0 = off; LDM: 0.75)
      disc_start=0,                    # step at which the discriminator starts
      disc_layers=3,                   # PatchGAN discriminator layers
      disc_channels=64,                # PatchGAN discriminator width
      # Codebook usage.
      dead_after=1000,                 # steps unused after which a code is dead
      restart_dead_codes=True,         # re-initialise dead codes from the batch's latents
      # Training on masked images (data/training_masks.py).
      mask_fraction=0.5,               # share of examples that get a random mask
      mask_families=("box", "stroke"),  # data/training_masks.py families
  )
  config.eval = dict(num_samples=256)  # test images for the reconstruction metrics
  return config


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
ADAPTIVE_POLICIES = ("uncertainty_accelerated", "look_ahead", "dual_loop")  # adaptive_mode's
IPR_ORDERS = ("raster", "uncertainty")                           # adaptive_mode.IPR_ORDERS
DTYPES = ("float32", "bfloat16")                                 # models._DTYPES, vqae._DTYPES
MASK_FAMILIES = ("thin", "medium", "thick", "wide", "square", "extrema",
                 "left_half")                                    # data/masks.FAMILIES
TRAINING_MASK_FAMILIES = ("box", "stroke") + MASK_FAMILIES       # data/training_masks.py
INPAINT_METHODS = ("asyncpatch", "asyncpatch_input_guidance", "progressive",
                   "repaint")                                    # inpainting_eval.METHODS
REFERENCE_SPLITS = ("train", "test")                             # workdir_eval's
BETA_CONVENTIONS = ("codebook", "commitment")                    # vqae.BETA_CONVENTIONS

_POSITIVE, _COUNT, _FRACTION = Int(1), Int(0), Number(0, 1)
_WEIGHT = Number(0)                       # a loss or guidance weight: >= 0

RULES: dict[str, Rule] = {
    "seed": Int(0, 2 ** 63 - 1),
    "data.dataset": Choice(datasets.DATASETS),
    "data.data_dir": Text("a TFDS folder or gs:// URL, or '' for an embedded dataset"),
    "data.options": Options(),
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
    "timesteps.sampler": Choice(TIMESTEP_SAMPLERS),
    "timesteps.t_min": Number(0, 1, high_open=True),
    "timesteps.t_max": Number(0, 1, low_open=True),
    "timesteps.patch_sizes": Ints(),
    "timesteps.perlin_cells": Ints(min_length=1),
    "timesteps.perlin_octaves": _POSITIVE,
    "timesteps.perlin_threshold": Numbers(2),
    "timesteps.antithetic": Bool(),
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
    "eval.num_samples": _COUNT,
    "eval.classifier_steps": _POSITIVE,
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


def _key_comments(function: str) -> dict[str, tuple[int, str]]:
  """{dotted key: (line, meaning)} of the keys that `function` in this file sets.

  A key is set by `config.<key> = value`, by a keyword of `config.<section> = dict(...)`
  or of `config.<section>.update(...)`. Its meaning is the `# comment` that ends the
  line of its value, continued on the comment-only lines below that start in the same
  column; a comment on a line of its own above a key is a heading, not a meaning.
  """
  with open(__file__, encoding="utf-8") as f:
    source = f.read()
  lines = source.splitlines()
  trailing, alone = {}, {}   # line -> (column, text) of comments after code / on their own
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      (row, col), text = tok.start, tok.string.lstrip("#").strip()
      (alone if not lines[row - 1][:col].strip() else trailing)[row] = (col, text)

  def meaning(line: int) -> str:
    if line not in trailing:
      return ""
    col, text = trailing[line]
    parts = [text]
    while alone.get(line + 1, (None,))[0] == col:
      line += 1
      parts.append(alone[line][1])
    return " ".join(parts)

  def section(target) -> str | None:   # "x" for `config.x`, else None
    if (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
        and target.value.id == "config"):
      return target.attr
    return None

  tree = ast.parse(source)
  body = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == function)
  out = {}
  for node in ast.walk(body):
    if isinstance(node, ast.Assign) and section(node.targets[0]):
      name, value = section(node.targets[0]), node.value
      if not (isinstance(value, ast.Call) and getattr(value.func, "id", None) == "dict"):
        out[name] = (value.end_lineno, meaning(value.end_lineno))
        continue
    elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
          and node.func.attr == "update" and section(node.func.value)):
      name, value = section(node.func.value), node
    else:
      continue
    for kw in value.keywords:
      out[f"{name}.{kw.arg}"] = (kw.value.end_lineno, meaning(kw.value.end_lineno))
  return out


def describe_keys(make: Callable[[], ml_collections.ConfigDict] = get_base_config,
                  ) -> list[tuple[str, Any, str]]:
  """(key, default, meaning) of every key of the config `make()` builds, in this file's order.

  `make` is get_base_config or get_autoencoder_base_config. The keys and defaults are
  the built config's; the meaning of each is its comment in this file (`_key_comments`:
  the one in `make`, else the one in get_base_config, whose sections the autoencoder
  config copies), so `--help` cannot drift from the source. A key without a comment gets
  "" (tests/test_help.py requires one for every key). An empty free-form dict (data.options)
  is one key with the default {}.
  """
  base = _key_comments(get_base_config.__name__)
  own = _key_comments(make.__name__)
  rows = []

  def walk(config: ml_collections.ConfigDict, prefix: str) -> None:
    for name, value in config.items():
      key = prefix + name
      if isinstance(value, ml_collections.ConfigDict) and list(value.keys()):
        walk(value, key + ".")
        continue
      if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
      line = base[key][0] if key in base else own.get(key, (math.inf, ""))[0]
      meaning = own.get(key, (0, ""))[1] or base.get(key, (0, ""))[1]
      rows.append((line, key, value, meaning))

  walk(make(), "")
  return [row[1:] for row in sorted(rows, key=lambda row: row[0])]


def finalize(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Locks the config so that overrides of unknown keys fail."""
  config.lock()
  return config


def _merge_saved(config: ml_collections.ConfigDict, saved: dict, path: str,
                 prefix: str = "") -> list[str]:
  """Sets the keys of a saved config (JSON) on `config`, converting lists back to tuples.

  Returns the saved keys that `config` does not have (they are skipped).
  """

  def like(default, value):
    if isinstance(default, tuple) and isinstance(value, list):
      return tuple(like(default[0] if default else None, v) for v in value)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
      return float(value)
    return value

  ignored = []
  for key, value in saved.items():
    name = f"{prefix}{key}"
    if key not in config:
      if prefix and not list(config.keys()):   # a free-form dict (e.g. data.options)
        config[key] = value
      else:       # a key an older version had; a model that differs is refused on restore
        ignored.append(name)
      continue
    if isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
      ignored += _merge_saved(config[key], value, path, name + ".")
    else:
      try:
        config[key] = like(config[key], value)
      except TypeError as e:
        raise checks.InputError(f"config file {path!r}: {name}={value!r} has the wrong type "
                                f"({e}).") from None
  return ignored


def load_config_json(path) -> ml_collections.ConfigDict:
  """A run's saved `config.json` (local or gs://) as a locked config with this version's keys.

  Keys the file lacks keep their defaults; keys this version does not know (written by
  an older version) are skipped with one warning (a checkpoint of a model that then
  differs is refused when it is restored). Tuples come back as tuples, so
  `--config.x=...` overrides parse as usual.
  """
  import json  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.runtime import storage  # pylint: disable=g-import-not-at-top

  p = storage.check_bucket(path, "config file")
  if not p.is_file():
    raise checks.InputError(f"config file {str(path)!r} does not exist"
                            + (" (the workdir has no config.json: train there first, or pass "
                               "--config=configs/<name>.py)" if p.name == "config.json" else "")
                            + ".")
  try:
    saved = json.loads(p.read_text())
  except ValueError as e:
    raise checks.InputError(f"config file {str(path)!r} is not valid JSON ({e}).") from None
  if not isinstance(saved, dict):
    raise checks.InputError(f"config file {str(path)!r} does not hold a config (a JSON object).")
  make = get_autoencoder_base_config if "autoencoder" in saved and \
      "get_autoencoder_base_config" in globals() else get_base_config
  config = make()
  ignored = _merge_saved(config, saved, str(path))
  if ignored:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("config file %s: ignoring keys this version does not know: %s", path,
                    ", ".join(ignored))
  return finalize(config)


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Loads `get_config()` from a config file such as `configs/default.py`, or a saved config.json."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top

  if str(path).endswith(".json"):
    return load_config_json(path)
  if not os.path.isfile(path):
    raise checks.InputError(f"config file {path!r} does not exist; the configs are in configs/ "
                     "at the repository root (e.g. configs/default.py).")
  spec = importlib.util.spec_from_file_location(
      "asyncpatch_config_" + os.path.splitext(os.path.basename(path))[0], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def get_config(path: str) -> ml_collections.ConfigDict:
  """This file as an ml_collections config file for a run's saved config.json (`path:argument`).

  The command line turns `--config=DIR/config.json` into `--config=<this file>:DIR/config.json`
  (and, in `--mode=sample`, a missing --config into the workdir's own config.json), so
  `--config.key=value` overrides apply on top of a saved config exactly as on configs/*.py.
  """
  return load_config_json(path)
