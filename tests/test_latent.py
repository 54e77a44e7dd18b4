"""Latent AsyncPatch end to end: autoencoder training (error far below the mean image, bitwise
resume), latent diffusion encoding inside the train step, latent inpainting that keeps the
known pixels exactly, token schedules, and bad input."""

import json
import os
import shutil

import flax.linen as nn
import jax
import numpy as np
import pytest

from asyncpatch_jax.modes import train_mode
from asyncpatch_jax.config import base_config
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runs import loader
from asyncpatch_jax.modes import sample_mode
from asyncpatch_jax.data import datasets
from asyncpatch_jax.data import image_io
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.evaluation import reconstruction
from asyncpatch_jax.models import vqae
from asyncpatch_jax.training import autoencoder_train
from asyncpatch_jax.training import train
from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE = dict(devices=jax.devices()[:1])
DATA = {"image_size": 16, "num_examples": 512}
DATA_SHAPE = (16, 16, 3)
STEPS = 300


def ae_config(**autoencoder):
  config = base_config.load_config_file(os.path.join(ROOT, "configs", "vqae_textures.py"))
  with config.unlocked():
    config.data.options = DATA
    # f = 4, halo 3 (kernels (3, 1, 1), one block per level); no discriminator.
    config.autoencoder.update({**dict(base_channels=8, num_res_blocks=1, codebook_size=32,
                                      encoder_kernels=(3, 1, 1), mask_embed_dim=8,
                                      dead_after=20), **autoencoder})
    config.optim.update(learning_rate=3e-3, warmup_steps=20)
    config.train.update(batch_size=8, num_steps=STEPS, log_every=50, checkpoint_every=STEPS // 2,
                        keep_checkpoints=2, progress_bar=False)
    config.evaluate.reconstruct_images = 32
  return config


@pytest.fixture(scope="module")
def ae_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("vqae"))
  summary = autoencoder_train.train_and_evaluate(ae_config(), workdir, **ONE)
  return workdir, summary


@pytest.mark.slow
def test_autoencoder_reconstructs_far_better_than_the_mean_image(ae_run):
  workdir, summary = ae_run
  assert summary["step"] == STEPS and os.path.isfile(os.path.join(workdir, "eval.json"))
  train_src = datasets.get_dataset("textures", "train", **DATA)
  test_src = datasets.get_dataset("textures", "test", **DATA)
  mean_image = np.mean([train_src[i]["image"] for i in range(len(train_src))], axis=0)
  x = np.stack([test_src[i]["image"] for i in range(64)])
  baseline = np.abs(x - mean_image).mean()
  ae, params, meta = loader.load_autoencoder(workdir)
  rec = reconstruction.Reconstructor(ae, params).reconstruct(x)
  l1 = np.abs(x - rec).mean()
  assert l1 < 0.5 * baseline, (l1, baseline)
  assert meta["latent_stats"]["std"] > 0 and meta["step"] == STEPS


@pytest.mark.slow
def test_autoencoder_resume_is_bitwise(ae_run, tmp_path):
  workdir, summary = ae_run
  resumed = str(tmp_path / "resumed")
  shutil.copytree(workdir, resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", str(STEPS)))     # back to step STEPS / 2
  again = autoencoder_train.train_and_evaluate(ae_config(), resumed, **ONE)
  for a, b in zip(jax.tree.leaves(summary["state"]), jax.tree.leaves(again["state"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_autoencoder_checkpoints_refuse_another_architecture(ae_run):
  workdir, _ = ae_run
  with pytest.raises(checks.InputError, match="codebook_size: 32 -> 64"):
    loader.load_autoencoder(workdir, ae_config(codebook_size=64).autoencoder)
  with pytest.raises(checks.InputError, match=r"different model(.|\n)*latent_channels: 3 -> 4"):
    autoencoder_train.train_and_evaluate(ae_config(latent_channels=4), workdir, **ONE)


def latent_config(ae_workdir, **model):
  config = base_config.load_config_file(os.path.join(ROOT, "configs", "latent_textures.py"))
  with config.unlocked():
    config.data.options = DATA
    config.latent.autoencoder_workdir = ae_workdir
    config.model.update({**dict(base_channels=16, channel_mult=(1,), num_res_blocks=(1,),
                                attention_resolutions=(), head_dim=16, time_embed_dim=32,
                                num_groups=8), **model})
    config.optim.warmup_steps = 2
    config.train.update(batch_size=8, num_steps=8, log_every=4, checkpoint_every=8,
                        progress_bar=False)
    config.sample.update(num_steps=4, num_images=4, batch_size=4)
  return config


@pytest.fixture(scope="module")
def latent_run(ae_run, tmp_path_factory):
  ae_workdir, _ = ae_run
  workdir = str(tmp_path_factory.mktemp("latent"))
  summary = train_mode.train_and_evaluate(latent_config(ae_workdir), workdir, **ONE)
  return workdir, summary


@pytest.mark.slow
def test_latent_training_encodes_each_batch_inside_the_step(ae_run, latent_run):
  """The latent step's loss equals the pixel step's on latents encoded outside (same keys)."""
  ae_workdir, _ = ae_run
  workdir, summary = latent_run
  assert summary["step"] == 8 and np.isfinite(summary["metrics"]["loss"])
  for name in ("samples", "inpainting", "autoregressive"):     # decoded grids, 16x16 images
    assert os.path.isfile(summary["grids"][name])
  setup = train.Setup(latent_config(ae_workdir), **ONE)
  codec = setup.codec
  assert setup.image_shape == (4, 4, 3) and setup.pixel_shape == (16, 16, 3)
  x = np.stack([setup.source[i]["image"] for i in range(8)])
  z = codec.encode_images(x)
  ae, params, meta = loader.load_autoencoder(ae_workdir)
  h = reconstruction.Reconstructor(ae, params).encode(x)
  np.testing.assert_allclose(z, h / meta["latent_stats"]["std"], rtol=1e-5, atol=1e-6)
  pixel_cfg = latent_config("")
  pixel_setup = train.Setup(pixel_cfg, image_shape=setup.image_shape, **ONE)
  key = jax.random.key(3)

  @jax.jit
  def losses(state, x, z, frozen):     # only the losses are kept: the updates compile away
    _, on_pixels = train.train_step(state, {"image": x}, frozen, setup=setup, root_key=key)
    _, on_latents = train.train_step(state, {"image": z}, setup=pixel_setup, root_key=key)
    return on_pixels["loss"], on_latents["loss"]

  loss_latent, loss_pixel = losses(summary["state"], x, z, codec.variables)
  np.testing.assert_allclose(loss_latent, loss_pixel, rtol=1e-5)


def test_train_flops_count_the_frozen_encoder_once(ae_run):
  """experiments/common.train_flops of a latent step = the same denoiser's step on latents given
  + one encoder forward. The encoder's share is checked against its convolutions counted by
  hand from the shapes they run on (2 x output positions x kernel size), the larger part of
  its cost: the rest (RMSNorm, SiLU, FiLM, the mask channel) is elementwise, a few tenths more."""
  ae_workdir, _ = ae_run
  latent = common.train_flops(latent_config(ae_workdir))
  on_latents = latent_config("")
  with on_latents.unlocked():
    on_latents.data.options = dict(DATA, image_size=4)     # the 4x4x3 latent grid as pixels
  plain = common.train_flops(on_latents)
  assert latent["params"] == plain["params"] and latent["batch"] == plain["batch"] == 8
  encoder_share = latent["flops_per_step"] - plain["flops_per_step"]
  ae, params, _ = loader.load_autoencoder(ae_workdir)
  x = np.zeros((8, *DATA_SHAPE), np.float32)
  m = np.ones(x.shape[:-1], np.float32)
  conv_flops = []

  def count(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Conv) and context.method_name == "__call__":
      kernel = context.module.variables["params"]["kernel"]      # [kh, kw, c_in, c_out]
      conv_flops.append(2 * int(np.prod(out.shape[:-1])) * int(np.prod(kernel.shape)))
    return out

  encode = lambda p: ae.apply({"params": p}, x, m, method=ae.encode)
  with nn.intercept_methods(count):
    jax.eval_shape(encode, params)
  assert len(conv_flops) == 17          # conv_in, 2 downsamplings, 6 blocks x 2, conv_out, quant
  assert 1.0 < encoder_share / sum(conv_flops) < 1.4, (encoder_share, sum(conv_flops))
  # and it is one encoding of the batch: XLA's count of the encoder alone, plus the latents'
  # scaling by 1 / std (8 x 4 x 4 x 3 = 384 multiplies; XLA counts 380)
  alone = jax.jit(encode).lower(params).cost_analysis()["flops"]
  assert abs(encoder_share - alone - 384) <= 8, (encoder_share, alone)


def test_token_schedule_knows_exactly_the_tokens_whose_cell_and_halo_are_known(ae_run):
  ae_workdir, _ = ae_run
  codec = loader.load_codec(ae_workdir, (16, 16, 3))
  mask = np.ones((16, 16), np.float32)
  mask[5:9, 10:12] = 0.0
  tau = codec.latent_schedule(schedules.inpainting(mask, 6), known_content=True)
  tokens = codec.token_mask(mask)
  assert tau.shape == (7, 4, 4)
  np.testing.assert_array_equal(tau[0] == 0, tokens == 1)
  # halo 3: rows 5..8 / cols 10..11 hidden -> token rows 0..2 (4i-3 <= 8, 4i+6 >= 5), cols 1..3.
  expected = np.ones((4, 4))
  expected[0:3, 1:4] = 0
  np.testing.assert_array_equal(tokens, expected)
  # Without known content the cell alone counts (autoregressive patches keep their tokens).
  auto = codec.latent_schedule(schedules.autoregressive(16, 16, (2, 2), 3), known_content=False)
  np.testing.assert_array_equal(auto, schedules.autoregressive(4, 4, (2, 2), 3))


def test_latent_inpainting_keeps_the_known_pixels_exactly(ae_run, latent_run, tmp_path):
  ae_workdir, _ = ae_run
  workdir, _ = latent_run
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  mask = np.full((16, 16, 1), 255, np.uint8)
  mask[4:12, 6:14] = 0
  image_io.save_png(image, str(tmp_path / "in.png"))
  image_io.save_png(mask, str(tmp_path / "mask.png"))
  config = latent_config(ae_workdir)
  with config.unlocked():
    config.sample.update(task="inpaint", image=str(tmp_path / "in.png"),
                         mask=str(tmp_path / "mask.png"), num_images=4, out_dir=str(tmp_path / "o"))
  settings = sample_mode.sample_from_workdir(config, workdir)
  assert settings["step"] == 8
  from PIL import Image
  out = np.stack([np.asarray(Image.open(tmp_path / "o" / f"sample_{i:03d}.png")) for i in range(4)])
  known = mask[..., 0] == 255
  assert out.shape == (4, 16, 16, 3)
  for i in range(4):
    np.testing.assert_array_equal(out[i][known], image[known])
    assert not np.array_equal(out[i][~known], image[~known])


def test_latent_configs_fail_clearly(ae_run, latent_run, tmp_path):
  ae_workdir, _ = ae_run
  latent_workdir, _ = latent_run
  with pytest.raises(checks.InputError, match="has no checkpoints; train the autoencoder"):
    train.Setup(latent_config(str(tmp_path / "missing")), **ONE)
  with pytest.raises(checks.InputError, match="holds a checkpoint of a diffusion model"):
    train.Setup(latent_config(latent_workdir), **ONE)
  with pytest.raises(checks.InputError, match="latent has 3 channels; set --config.model.out_"):
    train.Setup(latent_config(ae_workdir, out_channels=4), **ONE)
  with pytest.raises(checks.InputError, match="not divisible by the UNet's downsampling 8"):
    train.Setup(latent_config(ae_workdir, channel_mult=(1, 2, 2, 2), num_res_blocks=(1,) * 4),
                **ONE)
  cfg = latent_config(ae_workdir)
  with cfg.unlocked():
    cfg.data.options = {"image_size": 18, "num_examples": 64}
  with pytest.raises(checks.InputError, match="image height=18 is not divisible by 4"):
    train.Setup(cfg, **ONE)
  with pytest.raises(checks.InputError, match="nothing to sample"):
    sample_mode.sample_from_workdir(ae_config(), ae_workdir)
  assert vqae.token_mask(np.zeros((16, 16)), 4, 3).sum() == 0


def test_latent_sample_mode_serves_the_pixel_tasks(ae_run, latent_run, tmp_path):
  ae_workdir, _ = ae_run
  workdir, _ = latent_run
  from PIL import Image
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  mask = np.zeros((16, 16, 1), np.uint8)
  mask[:, :8] = 255
  image_io.save_png(image, str(tmp_path / "in.png"))
  image_io.save_png(mask, str(tmp_path / "mask.png"))
  for task in ("generate", "autoregressive", "progressive", "ipr"):
    config = latent_config(ae_workdir)
    with config.unlocked():
      config.sample.update(task=task, num_images=2, batch_size=2, grid=(2, 2), ipr_rounds=1,
                           ipr_alpha=0.5, num_stripes=2, out_dir=str(tmp_path / task))
      if task in ("progressive", "ipr"):
        config.sample.update(image=str(tmp_path / "in.png"), mask=str(tmp_path / "mask.png"))
    settings = sample_mode.sample_from_workdir(config, workdir)
    out = np.asarray(Image.open(tmp_path / task / "sample_000.png"))
    assert out.shape == (16, 16, 3), task
    if task in ("progressive", "ipr"):
      np.testing.assert_array_equal(out[:, :8], image[:, :8])
    if task == "ipr":
      # Halo 3: token column 0 alone has a known cell and halo, so no 2x2 region is known.
      assert settings["condition_regions"] == []


@pytest.mark.parametrize("name,ae_name", [("latent_imagenet256", "vqae_imagenet256"),
                                          ("latent_lsun_bedroom", "vqae_lsun_bedroom")])
def test_paper_latent_configs_build_through_eval_shape(name, ae_name):
  """Table 6's ~620M UNet on Table 7's 64x64x3 latents of 256x256 images: the parameter count
  of configs/imagenet64_620m.py's UNet (Table 6, tests/test_unet.py), minus the class
  embedding (1001 x 512) for unconditional LSUN."""
  from asyncpatch_jax import models
  config = base_config.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
  ae = vqae.build_autoencoder(base_config.load_config_file(
      os.path.join(ROOT, "configs", f"{ae_name}.py")).autoencoder)
  latent_shape = ae.latent_shape((256, 256, 3))
  assert latent_shape == (64, 64, 3) and config.model.out_channels == ae.latent_channels

  def count(model_config):
    unet = models.build_model(model_config)
    shapes = jax.eval_shape(lambda k: unet.init(k, *models.example_inputs(unet, latent_shape)),
                            jax.random.key(0))
    return sum(x.size for x in jax.tree.leaves(shapes))

  reference = count(base_config.load_config_file(
      os.path.join(ROOT, "configs", "imagenet64_620m.py")).model)
  n = count(config.model)
  assert n == reference - (1001 * 512 if config.model.num_classes == 0 else 0)
  assert n == {"latent_imagenet256": 622_184_707, "latent_lsun_bedroom": 621_672_195}[name]


def test_evaluate_mode_scores_a_latent_workdir_on_decoded_pixels(ae_run, latent_run):
  """--mode=evaluate on a latent workdir: samples drawn as tokens and decoded; inpainting on
  tokens with the known pixels pasted back. The square family recomputed here from the
  codec's parts (the latent_textures.py protocol): encode the masked test images, the
  token schedule of Eq. 4's pixel schedule, the generator on tokens, decode, paste back;
  PSNR in float64 NumPy; the known pixels against the dataset's images."""
  from asyncpatch_jax.modes import evaluate_mode  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.generation import generate  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.data import masks  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.runtime import sharding  # pylint: disable=g-import-not-at-top
  ae_workdir, _ = ae_run
  workdir, _ = latent_run
  config = latent_config(ae_workdir)
  with config.unlocked():
    config.evaluate.update(num_samples=8, batch_size=8, num_inpaint=8, mask_families=("square",),
                           feature_steps=3, k=3)
    config.train.progress_bar = False
  summary = evaluate_mode.evaluate_workdir(config, workdir)
  result = json.load(open(os.path.join(workdir, "evaluate.json")))
  assert result["image_shape"] == [16, 16, 3] and result["latent"]["latent_shape"] == [4, 4, 3]
  gen = result["generation"]
  assert gen["num_samples"] == 8 and np.isfinite(gen["fd_textures"])
  assert summary["generation"]["fd_textures"] == gen["fd_textures"]
  q = result["inpainting"]["families"]["square"]

  setup, state = train.load_trained(workdir, config)
  codec = setup.codec
  mesh = sharding.sampling_mesh()                      # the command line's mesh (8 devices)
  test_src = datasets.get_dataset("textures", "test", **DATA)
  x = np.stack([test_src[i]["image"] for i in range(8)])
  m = masks.make_masks("square", 8, 16, 16, seed=config.seed)
  z_known = codec.encode_images(x, m)
  tau = codec.latent_schedule(schedules.inpainting(m, config.sample.num_steps),
                              known_content=True)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(config.seed), 10), 0)
  z = generate.Generator(setup.model, mesh=mesh)(state.ema_params, tau, key=key, x=z_known,
                                                 eta=config.sample.eta)
  out = codec.decode_latents(z)
  out = np.where(m[..., None] > 0, x, out)
  assert (m > 0).any() and (m == 0).any()
  mse = (((out.astype(np.float64) - x) / 2.0) ** 2).mean(axis=(1, 2, 3))
  assert q["psnr"] == pytest.approx(np.mean(10 * np.log10(1.0 / mse)), rel=1e-4)
  assert q["hole_fraction"] == pytest.approx(1.0 - m.mean(), abs=1e-6)
  # A pixel model's RePaint is refused for a latent model, in one line, before restoring.
  with config.unlocked():
    config.evaluate.inpaint_method = "repaint"
  with pytest.raises(checks.InputError, match="needs a pixel model; a latent diffusion model"):
    evaluate_mode.evaluate_workdir(config, workdir)


@pytest.mark.slow
def test_a_latent_dit_trains_on_tokens_and_inpaints_exactly(ae_run, tmp_path):
  """A DiT over the autoencoder's 4x4 tokens (patch 2: four DiT tokens of 2x2 latents):
  training encodes each batch as for the UNet; an inpainting task gives every DiT token
  one time (the largest of the latents it covers) and keeps the known pixels exactly."""
  ae_workdir, _ = ae_run
  config = latent_config(ae_workdir, name="dit", patch_size=2, hidden_size=16, depth=1,
                         num_heads=2)
  workdir = str(tmp_path / "dit")
  summary = train_mode.train_and_evaluate(config, workdir, **ONE)
  assert summary["step"] == 8 and np.isfinite(summary["metrics"]["loss"])
  run = loader.load_run(workdir)
  assert type(run.model).__name__ == "DiT" and run.image_shape == (4, 4, 3)
  from asyncpatch_jax.diffusion import tokens  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.generation import generate  # pylint: disable=g-import-not-at-top
  gen = generate.Generator(run.model, codec=run.codec, mesh=None)
  mask = np.ones((16, 16), np.float32)
  mask[4:12, 6:14] = 0
  rng = np.random.default_rng(1)
  x = rng.uniform(-1, 1, (16, 16, 3)).astype(np.float32)
  task = gen.task(schedules.inpainting(mask, 4), x, mask)
  latent_tau = run.codec.latent_schedule(schedules.inpainting(mask, 4), known_content=True)
  np.testing.assert_array_equal(task.tau, tokens.align(latent_tau, 2))
  out = gen.generate(run.params, task, key=jax.random.key(0), num=2)
  known = np.broadcast_to(mask[None, :, :, None] > 0, out.shape)
  np.testing.assert_array_equal(out[known], np.broadcast_to(x, out.shape)[known])
