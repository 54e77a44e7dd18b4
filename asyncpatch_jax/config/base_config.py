"""The full set of config keys with their defaults; every file in configs/ starts from it.

Keeping every key here means a `--config.<key>=value` override of a key that does
not exist fails (the config is locked) and names the close matches. Each key's
trailing `# comment` is its meaning: `--help` prints it beside the default
(config/describe.py reads this file's source), so every key has one. Each key's rule in
config/rules.py says which values it accepts; `rules.validate(config)` applies them
(main.py, first thing in every mode).
"""

from __future__ import annotations


import ml_collections

from asyncpatch_jax.runtime import checks


def get_base_config() -> ml_collections.ConfigDict:
  """Defaults shared by all experiments (AsyncPatch App. E where the paper fixes them)."""
  config = ml_collections.ConfigDict()
  config.seed = 0   # seed of the run's one root key: initialisation, batches, time maps, sampling
  config.trainer = "diffusion"  # what --mode=train trains: diffusion | autoencoder | head

  config.data = dict(
      dataset="digits",      # see asyncpatch_jax.data.datasets.DATASETS
      data_dir="",           # prepared TFDS directory (real datasets only)
      options={},            # extra keyword arguments of the dataset source
  )

  config.model = dict(
      name="unet",           # the network: unet (models/unet.py) | dit (models/dit.py)
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
      remat="none",          # recompute block activations in the backward pass (memory
                             # only): none | block (keep matmul outputs) | full (keep
                             # only each block's input); models/blocks.py
      # dit only (a UNet ignores them; DiT sizes: configs/dit.py):
      patch_size=2,          # dit: token side p (divides the image or latent sides)
      hidden_size=384,       # dit: token width D
      depth=12,              # dit: transformer blocks
      num_heads=6,           # dit: attention heads (divide hidden_size)
      mlp_ratio=4.0,         # dit: MLP width / D
      modulation="adaln_zero",  # dit: adaln_zero (DiT, an MLP per block) | adaln_single
                                # (PixArt-alpha, one shared MLP + per-block tables)
      clean_context=False,   # dit: clean tokens (time 0) attend only to clean tokens, so
                             # the cached sampler (sample.clean_cache) can skip them;
                             # train with timesteps.clean_fraction > 0 (configs/dit.py:digits_clean)
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
      clean_fraction=0.0,    # share of images given a clean set (time exactly 0, on tokens;
                             # its loss is skipped): for model.clean_context
      clean_families=("inpaint", "autoregressive", "random"),  # where clean sets come from
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
      clean_cache=False,     # a clean-context DiT computes only its noisy tokens at every
                             # step, from cached keys/values of the clean ones (exact;
                             # models/dit_cache.py); needs model.clean_context
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

  # Evaluation (evaluation/evaluators/): training runs the evaluators of `at_end` when it
  # finishes (<workdir>/eval.json); --mode=evaluate (modes/evaluate_mode.py) runs those of
  # `evaluators` on a trained workdir (<workdir>/evaluate.json). The sampler settings
  # (num_steps, eta, num_stripes, batch_size) are config.sample's.
  config.evaluate = dict(
      at_end=("digit_classifier",),              # evaluators run at the end of training
      evaluators=("generation", "inpainting"),   # evaluators of --mode=evaluate
      # digit_classifier: a digits model's samples scored by the in-project classifier.
      classifier_samples=512,  # samples scored (0 = none)
      classifier_steps=600,  # steps of the in-project digit classifier
      # generation: Frechet distance and PRDC of synchronous samples.
      num_samples=1000,      # generated samples (labels cycle over the classes); >= 2, > k
      batch_size=250,        # images per sampler / feature-network call
      guidance=0.0,          # CFG weight of the generated samples
      reference_split="train",  # real images the samples are compared with (train | test)
      num_reference=0,       # real images; 0 = num_samples (at most the split's size)
      # inpainting: PSNR/SSIM, Frechet distance, PRDC and LPIPS per mask family.
      mask_families=("thin", "wide", "square", "extrema"),  # data/masks.py families
      num_inpaint=256,       # held-out (test split) images inpainted per family; 0 = none
      inpaint_method="asyncpatch",  # asyncpatch | asyncpatch_input_guidance | progressive | repaint
      input_guidance=1.0,    # asyncpatch_input_guidance: weight w_i (Eq. 8)
      repaint=(250, 10, 10),  # repaint: num_steps, jump_length, jump_n_sample
      k=5,                   # PRDC nearest neighbours
      interval_resamples=200,  # bootstrap resamples of the 95% intervals of FD, PSNR, SSIM
                               # (evaluation/statistics.py); 0 = no intervals
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
  """Defaults of an autoencoder run (configs/vqae_*.py): seed, data, optim, train, evaluate and
  `autoencoder` (AsyncPatch App. F, Table 7; latent diffusion's f = 4 VQ model).

  A config with an `autoencoder` section trains the autoencoder (training/autoencoder_train.py).
  """
  base = get_base_config()
  config = ml_collections.ConfigDict()
  for section in ("seed", "data", "optim", "train"):
    config[section] = base[section]
  config.trainer = "autoencoder"        # the localized VQ autoencoder (App. F)
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
  # The end of training: reconstruction metrics (evaluation/reconstruction.py) and the latent
  # statistics, in eval.json and latent_stats.json.
  config.evaluate = dict(reconstruct_images=256)  # test images reconstructed (0 = none)
  return config


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


TRAINERS = ("diffusion", "autoencoder", "head")


def infer_trainer(config) -> str:
  """The trainer of a config (or saved dict) without `trainer`: what its sections say."""
  if "autoencoder" in config:
    return "autoencoder"
  uncertainty = config.get("uncertainty") or {}
  return "head" if uncertainty.get("model_workdir") else "diffusion"


# Keys that moved ({old: new}): an override of the old key says where it went.
MOVED_KEYS = {"eval.num_samples": "evaluate.classifier_samples (an autoencoder's: "
                                  "evaluate.reconstruct_images)",
              "eval.classifier_steps": "evaluate.classifier_steps"}


def migrate_eval_section(saved: dict) -> dict:
  """A saved config (dict) with the old `eval` section, its keys moved into `evaluate`:
  an autoencoder's eval.num_samples becomes evaluate.reconstruct_images; a diffusion
  run's eval.num_samples and eval.classifier_steps become evaluate.classifier_samples and
  evaluate.classifier_steps."""
  saved = dict(saved)
  old = saved.pop("eval")
  evaluate = dict(saved.get("evaluate") or {})
  if "autoencoder" in saved:
    moved = {"num_samples": "reconstruct_images"}
  else:
    moved = {"num_samples": "classifier_samples", "classifier_steps": "classifier_steps"}
  for key, value in old.items():
    evaluate[moved.get(key, key)] = value
  saved["evaluate"] = evaluate
  return saved


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
  if "trainer" not in saved:        # written before config.trainer existed
    saved = {**saved, "trainer": infer_trainer(saved)}
  if isinstance(saved.get("eval"), dict):   # written before config.eval joined config.evaluate
    saved = migrate_eval_section(saved)
  ignored = _merge_saved(config, saved, str(path))
  if ignored:
    from absl import logging  # pylint: disable=g-import-not-at-top
    logging.warning("config file %s: ignoring keys this version does not know: %s", path,
                    ", ".join(ignored))
  return finalize(config)


def load_config_file(path: str, variant: str = "") -> ml_collections.ConfigDict:
  """Loads `get_config()` from a config file such as `configs/default.py` (with `variant`:
  `get_config(variant)`, as `--config=configs/sudoku4.py:cpu` does), or a saved config.json."""
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
  return module.get_config(variant) if variant else module.get_config()


def get_config(path: str) -> ml_collections.ConfigDict:
  """This file as an ml_collections config file for a run's saved config.json (`path:argument`).

  The command line turns `--config=DIR/config.json` into `--config=<this file>:DIR/config.json`
  (and, in `--mode=sample`, a missing --config into the workdir's own config.json), so
  `--config.key=value` overrides apply on top of a saved config exactly as on configs/*.py.
  """
  return load_config_json(path)
