"""What every experiment script shares: the repository root, configs, trained runs, --tiny, results.

Every script runs from the repository root as a module, so that this file imports as
`from experiments import common`:

  python -m experiments.<group>.<script> --out=results/<folder>/<name>.json [flags]

- `ROOT`: the repository root (configs/ and results/ are below it).
- `load_config(spec)`: a config by name or file, with the `:variant` of configs that have
  one (`"default"`, `"configs/default.py"`, `"configs/sudoku4.py:cpu"`, a saved config.json).
- `train_or_resume(config, workdir)`: trains a run to `config.train.num_steps`, resuming its
  newest checkpoint; a finished run is left as it is.
- `evaluate_run(workdir, config, names, feature_nets)`: evaluators' scores of a trained run,
  with the same key and masks for every run.
- `train_flops(config)`: the FLOPs of a config's train step (XLA's cost analysis) and run.
- `load_run(workdir)`: the one place that loads a trained run (model, EMA parameters, ...).
- `define_tiny(defaults)` and `run(main)`: `--tiny`, the smoke run the tests make of every
  script: `defaults` replace the defaults of the flags not given on the command line.
- `write_json(path, result)`: a result file with the command and the wall time that made it;
  `write_table(path, text)` its Markdown tables beside it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from typing import Any, Callable

from absl import app, flags
from etils import epath
import ml_collections

from asyncpatch_jax.config import base_config
from asyncpatch_jax.runtime import checks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START = time.time()  # the script's start (it imports this module first)

FLAGS = flags.FLAGS

# The UNet of every tiny run: one level, no attention (compiles in seconds on a CPU).
TINY_UNET = {"base_channels": 8, "channel_mult": (1,), "num_res_blocks": (1,),
             "attention_resolutions": (), "head_dim": 8, "time_embed_dim": 16, "num_groups": 4}

# The pixel UNet of the embedded 32x32 textures that latent_textures.py, schedule_study.py
# and texture_synthesis.py share: configs/textures.py's UNet at width 32, one block per
# level (1.1M parameters), what a 2-core CPU trains in their budget.
TEXTURES_PIXEL_UNET = {"base_channels": 32, "num_res_blocks": (1, 1, 1)}

_tiny_defaults: dict[str, Any] = {}


# ----------------------------------------------------------------------------- configs


def load_config(spec: str) -> ml_collections.ConfigDict:
  """The config `spec` names: `name`, `configs/name.py` or either with `:variant`.

  A bare name is `configs/<name>.py`; relative paths are from the repository root (a
  script run from elsewhere finds them too); `file.py:variant` calls
  `get_config(variant)` (configs/sudoku4.py:cpu), `file.py` calls `get_config()`; a
  `.json` file is a run's saved config.json.
  """
  path, variant = str(spec), ""
  if ":" in path and not path.startswith("gs://"):
    path, _, variant = path.partition(":")
  if "/" not in path and not path.endswith((".py", ".json")):
    path = os.path.join("configs", f"{path}.py")
  if not os.path.isabs(path) and not path.startswith("gs://"):
    path = os.path.join(ROOT, path)
  return base_config.load_config_file(path, variant)


def textures_pixel_config(steps: int, batch: int, tiny: bool = False) -> ml_collections.ConfigDict:
  """configs/textures.py with TEXTURES_PIXEL_UNET (tiny: TINY_UNET), `steps` at `batch`."""
  return updated(load_config("textures"), {
      "model": TINY_UNET if tiny else TEXTURES_PIXEL_UNET,
      "train": {"num_steps": steps, "batch_size": batch, "checkpoint_every": 1000,
                "progress_bar": not tiny},
      "sample": {"num_images": 0}})


def updated(config: ml_collections.ConfigDict, sections: dict) -> ml_collections.ConfigDict:
  """`config` with `{section: {key: value}}` set (new keys allowed); returns it."""
  with config.unlocked():
    for section, values in sections.items():
      config[section].update(values)
  return config


# ----------------------------------------------------------------------------- trained runs


@dataclasses.dataclass(frozen=True)
class TrainedRun:
  """The parts of a trained run the experiments use (`load_run`).

  A diffusion run: its UNet (`model`), EMA parameters, the latent codec of a latent run,
  the uncertainty head asked for. An autoencoder run: the autoencoder (`model`), its
  parameters and `latent_stats`.
  """
  workdir: str
  config: ml_collections.ConfigDict
  model: Any
  params: Any                           # EMA parameters
  step: int
  image_shape: tuple[int, int, int]     # what the model sees (latents of a latent run)
  pixel_shape: tuple[int, int, int]     # the images
  codec: Any = None                     # latent_codec.LatentCodec of a latent run
  noise_level_sampler: Any = None       # the training noise-level sampler
  head: Any = None                      # uncertainty head (load_run's head_workdir)
  head_params: Any = None
  latent_stats: dict | None = None      # autoencoder runs

  @property
  def num_params(self) -> int:
    import jax  # pylint: disable=g-import-not-at-top
    return int(sum(x.size for x in jax.tree.leaves(self.params)))


def load_run(workdir, config: ml_collections.ConfigDict | None = None, *,
             head_workdir=None) -> TrainedRun:
  """The newest checkpoint of a trained run, for sampling and analysis.

  Every script loads a trained run through this function (and nothing else).
  config: the run's config; None reads the workdir's own (a config of another model is
  refused, listing the differing keys). head_workdir: also load the uncertainty head
  trained there on this model (refused if it was trained on another one).
  """
  from asyncpatch_jax import models  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.diffusion import timesteps  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.runs import checkpointing  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.runs import loader  # pylint: disable=g-import-not-at-top
  meta = checkpointing.saved_meta(workdir)
  if meta is not None and "autoencoder" in meta["config"]:
    ae, params, ae_meta = loader.load_autoencoder(
        workdir, None if config is None else config.autoencoder)
    shape = tuple(ae_meta["image_shape"])
    return TrainedRun(workdir=str(workdir), config=ml_collections.ConfigDict(ae_meta["config"]),
                      model=ae, params=params, step=int(ae_meta["step"]), image_shape=shape,
                      pixel_shape=shape, latent_stats=ae_meta["latent_stats"])
  run = loader.load_run(workdir, config, head_workdir=head_workdir)
  return TrainedRun(workdir=str(workdir), config=run.config, model=run.model,
                    params=run.params, step=run.step, image_shape=tuple(run.image_shape),
                    pixel_shape=tuple(run.pixel_shape), codec=run.codec,
                    noise_level_sampler=timesteps.NoiseLevelSampler.from_config(
                        run.config.timesteps, token_size=models.patch_size(run.model)),
                    head=None if run.head is None else run.head.module,
                    head_params=None if run.head is None else run.head.params)


def evaluate_run(workdir, config: ml_collections.ConfigDict, names, feature_nets, *,
                 seed: int = 0) -> tuple[TrainedRun, dict]:
  """(run, scores) of the evaluators `names` (evaluation/evaluators) on a trained pixel or
  latent run, with the evaluation key and mask seed `seed` (the same for every run compared),
  scored on decoded pixels; the run samples with its sample.clean_cache."""
  import jax  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.evaluation.evaluators import base  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.evaluation.evaluators import common as evaluators  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.generation import generate  # pylint: disable=g-import-not-at-top
  run = load_run(workdir, config)
  chosen = evaluators.from_config(config, names, run.pixel_shape, latent=run.codec is not None)
  gen = generate.Generator(run.model, codec=run.codec,
                           clean_cache=config.sample.get("clean_cache", False))
  ctx = base.Context(gen, run.params, config, image_shape=run.pixel_shape,
                     key=jax.random.key(seed), mesh=gen.mesh, mask_seed=seed,
                     feature_nets=feature_nets)
  return run, evaluators.run(chosen, ctx)[0]


def cached_scores(path, settings: dict, compute: Callable[[], dict]) -> dict:
  """{'settings': settings, **compute()}, stored as JSON at `path` (a run's workdir keeps its
  scores) and read back instead of recomputed while the stored settings equal `settings`."""
  if os.path.exists(path):
    with open(path) as f:
      stored = json.load(f)
    if stored.get("settings") == settings:
      return stored
  result = {"settings": settings, **compute()}
  with open(path, "w") as f:
    json.dump(result, f, indent=2)
  return result


def train_flops(config: ml_collections.ConfigDict) -> dict:
  """The train step's FLOPs from XLA's cost analysis (a latent model's step includes encoding
  its batch with the frozen autoencoder, whose workdir the config names; the DiT's blocks
  unrolled, since a loop body is counted once), and the run's total."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.training import train  # pylint: disable=g-import-not-at-top
  setup = train.Setup(config, devices=jax.devices()[:1])
  if hasattr(setup.model, "unroll_blocks"):
    setup.model = setup.model.clone(unroll_blocks=True)
  b = config.train.batch_size
  batch = {"image": jax.ShapeDtypeStruct((b, *setup.pixel_shape), jnp.float32),
           "label": jax.ShapeDtypeStruct((b,), jnp.int32)}
  frozen = None if setup.codec is None else setup.codec.variables
  step = jax.jit(lambda s, x, f: train.train_step(s, x, f, setup=setup,
                                                  root_key=jax.random.key(0)))
  flops = float(step.lower(setup.abstract_state, batch, frozen).cost_analysis()["flops"])
  params = sum(int(x.size) for x in jax.tree.leaves(setup.abstract_state.params))
  return {"flops_per_step": flops, "steps": config.train.num_steps,
          "train_flops": flops * config.train.num_steps, "params": params, "batch": b}


def train_or_resume(config: ml_collections.ConfigDict, workdir) -> float:
  """Trains `config` in `workdir` up to `config.train.num_steps`; the seconds this call trained.

  An interrupted run resumes from its newest checkpoint; a finished one is left as it is
  (0.0 seconds: no compilation, no new grids or eval.json).
  """
  from asyncpatch_jax.modes import train_mode  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.runs import checkpointing  # pylint: disable=g-import-not-at-top
  step = checkpointing.saved_step(workdir)
  if step is not None and step >= config.train.num_steps:
    # A finished run is reused only if it is this config's model; a head's checkpoint records
    # the frozen model it was trained on, so it is checked against that model.
    model_workdir = config.get("uncertainty", {}).get("model_workdir")
    if model_workdir:
      load_run(model_workdir, head_workdir=workdir)
    else:
      load_run(workdir, config)
    return 0.0
  t0 = time.time()
  train_mode.train_and_evaluate(config, workdir)
  return time.time() - t0


# ----------------------------------------------------------------------------- --tiny, main


def define_tiny(defaults: dict[str, Any],
                help_text: str = "A smoke run (the tests'): small sizes and few steps.") -> None:
  """Defines --tiny: `defaults` (flag name -> value) for the flags not given on the command line.

  A flag given on the command line wins, so a test can run a documented command with
  --tiny and the few values it needs. The script reads FLAGS.tiny for what flags cannot
  say (e.g. a tiny UNet).
  """
  caller = sys._getframe(1).f_globals.get("__name__", "")  # pylint: disable=protected-access
  # Listed with the script's own flags in --help (absl names the main module by its path).
  flags.DEFINE_bool("tiny", False, help_text,
                    module_name=sys.argv[0] if caller == "__main__" else caller)
  _tiny_defaults.update(defaults)


def apply_tiny() -> bool:
  """With --tiny, sets the tiny defaults of the flags not given; returns FLAGS.tiny."""
  if "tiny" not in FLAGS or not FLAGS.tiny:
    return False
  for name, value in _tiny_defaults.items():
    if not FLAGS[name].present:
      FLAGS[name].value = value
  return True


def run(main: Callable[[list[str]], Any], required: tuple[str, ...] = ()) -> None:
  """app.run(main) after --tiny is applied; bad input (InputError) stops with one line."""
  if required:
    flags.mark_flags_as_required(list(required))

  def _main(argv):
    apply_tiny()
    return main(argv)

  try:
    app.run(_main)
  except checks.InputError as e:       # bad input: one line, no traceback
    sys.exit(f"error: {e}")


# ----------------------------------------------------------------------------- results


def command() -> str:
  """This script's command line, as the README shows it (`python -m experiments....`)."""
  main = sys.modules["__main__"]
  module = getattr(main.__spec__, "name", None) if getattr(main, "__spec__", None) else None
  if module:
    head = ["python", "-m", module]
  else:
    head = ["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)]
  return " ".join(head + sys.argv[1:])


def elapsed() -> float:
  """Seconds since the script started."""
  return time.time() - START


def write_table(json_path, text: str) -> None:
  """Writes `text` (a result's Markdown tables) beside its JSON, as <name>.md, and prints it."""
  epath.Path(os.path.splitext(str(json_path))[0] + ".md").write_text(text)
  print(text)


def write_json(path, result: dict, *, time_key: str | None = "wall_seconds",
               indent: int | None = 2) -> dict:
  """Writes `result` as JSON to `path` (folders made); returns it.

  Records how it was made, unless the script did: "command" (`command()`) and, under
  `time_key` (each script keeps the key its stored results use; None: the script
  records its time itself), the seconds since the script started.
  """
  result.setdefault("command", command())
  if time_key is not None:
    result.setdefault(time_key, elapsed())
  out = epath.Path(path)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=indent))
  return result
