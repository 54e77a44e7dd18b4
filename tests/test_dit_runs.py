"""A DiT through the library's real entry points: sharded training (fsdp 2 equals fsdp 1),
every --mode=sample task, --mode=evaluate, an uncertainty head trained on the DiT and the
head tasks, and a head of one backbone refused for the other."""

import json
import os

import jax
import numpy as np
import pytest

from asyncpatch_jax.data import image_io
from asyncpatch_jax.modes import evaluate_mode
from asyncpatch_jax.modes import sample_mode
from asyncpatch_jax.modes import train_mode
from asyncpatch_jax.runs import loader
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import sharding
from tests.fixtures import configs

pytestmark = pytest.mark.slow

DIT = {"model.name": "dit", "model.patch_size": 2, "model.hidden_size": 32, "model.depth": 2,
       "model.num_heads": 2, "model.modulation": "adaln_single",
       "train.num_steps": 8, "train.checkpoint_every": 4, "train.log_every": 4,
       "sample.num_images": 0, "evaluate.classifier_samples": 0}


def _config(**overrides):
  return configs.with_overrides({**DIT, **{k.replace("__", "."): v for k, v in overrides.items()}})


@pytest.fixture(scope="module")
def dit_run(tmp_path_factory):
  root = tmp_path_factory.mktemp("dit_runs")
  workdir = str(root / "dit")
  summary = train_mode.train_and_evaluate(_config(), workdir)
  return root, workdir, summary


def test_dit_training_with_fsdp_equals_data_parallel(dit_run, tmp_path, monkeypatch):
  _, _, one = dit_run
  monkeypatch.setattr(sharding, "MIN_FSDP_SIZE", 0)        # shard every leaf that divides
  two = train_mode.train_and_evaluate(_config(train__fsdp=2), str(tmp_path / "fsdp2"))
  specs = [str(x.sharding.spec) for x in jax.tree.leaves(two["state"].params)]
  assert any("fsdp" in s for s in specs)
  np.testing.assert_allclose(two["metrics"]["loss"], one["metrics"]["loss"], rtol=1e-5)
  for a, b in zip(jax.tree.leaves(one["state"].params), jax.tree.leaves(two["state"].params),
                  strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)


def _sample(workdir, out, head_workdir="", **sample):
  config = _config(sample__num_images=4, sample__batch_size=4, sample__num_steps=8,
                   sample__out_dir=out, uncertainty__head_workdir=head_workdir,
                   **{f"sample__{k}": v for k, v in sample.items()})
  return sample_mode.sample_from_workdir(config, workdir)


def _read(out, n=4, shape=(16, 16, 1)):
  return np.stack([image_io.to_uint8(image_io.load_image(os.path.join(out, f"sample_{i:03d}.png"),
                                                         shape)) for i in range(n)])


def test_every_sample_task_runs_on_a_dit(dit_run, tmp_path):
  _, workdir, _ = dit_run
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
  mask = np.zeros((16, 16, 1), np.uint8)
  mask[3:11, 5:13] = 255                             # cuts through the 2x2 tokens
  image_io.save_png(image, str(tmp_path / "in.png"))
  image_io.save_png(mask, str(tmp_path / "mask.png"))
  image_io.save_png(image[:8, :8], str(tmp_path / "small.png"))
  known_image = dict(image=str(tmp_path / "in.png"), mask=str(tmp_path / "mask.png"))
  tasks = {"generate": {}, "autoregressive": {"grid": (2, 2)},
           "inpaint": known_image, "progressive": {**known_image, "num_stripes": 2},
           "interleaved": {**known_image, "num_stripes": 2, "num_rounds": 2},
           "outpaint": {"image": str(tmp_path / "small.png"), "num_stripes": 2},
           "ipr": {"grid": (4, 4), "ipr_rounds": 2}}
  for task, settings in tasks.items():
    out = str(tmp_path / task)
    result = _sample(workdir, out, task=task, **settings)
    assert result["step"] == 8, task
    got = _read(out)
    if "mask" in settings:
      known = mask[..., 0] == 255
      for i in range(4):
        np.testing.assert_array_equal(got[i][known], image[known], err_msg=task)
    if task == "outpaint":
      np.testing.assert_array_equal(got[:, 4:12, 4:12], np.broadcast_to(image[:8, :8], (4, 8, 8, 1)))


def test_mode_evaluate_scores_a_dit(dit_run, tmp_path):
  _, workdir, _ = dit_run
  config = _config(evaluate__evaluators=("inpainting",), evaluate__num_inpaint=8,
                   evaluate__batch_size=8, evaluate__mask_families=("square",),
                   evaluate__feature_steps=5, evaluate__k=2, sample__num_steps=4,
                   evaluate__out=str(tmp_path / "evaluate.json"))
  result = evaluate_mode.evaluate_workdir(config, workdir)
  scores = json.load(open(tmp_path / "evaluate.json"))
  del result
  assert scores["inpainting"]["num_images"] == 8 and scores["inpainting"]["network_evals"] == 4
  square = scores["inpainting"]["families"]["square"]
  assert np.isfinite(square["psnr"]) and np.isfinite(square["fd_digits"])


def test_a_head_trained_on_a_dit_drives_the_head_tasks_and_is_refused_for_a_unet(
    dit_run, tiny_workdir, tmp_path):
  root, workdir, _ = dit_run
  head_dir = str(root / "head")
  head_cfg = configs.with_overrides(
      {"uncertainty.model_workdir": workdir, "uncertainty.channels": 8,
       "uncertainty.num_layers": 2, "train.batch_size": 16, "train.num_steps": 4,
       "train.checkpoint_every": 4, "train.log_every": 2, "train.progress_bar": False},
      path=os.path.join(configs.ROOT, "configs", "uncertainty_digits.py"))
  train_mode.train_and_evaluate(head_cfg, head_dir, devices=jax.devices()[:1])
  for task, extra in (("adaptive", {}), ("ordered", {"grid": (2, 2)})):
    out = str(tmp_path / task)
    settings = _sample(workdir, out, head_dir, task=task, **extra)
    assert settings["budget"] == 8
  with pytest.raises(checks.InputError, match=r"was trained on a dit; this model is a unet"):
    loader.load_run(str(tiny_workdir), head_workdir=head_dir)


def test_a_clean_context_dit_trains_and_samples_with_the_cache(dit_run, tmp_path):
  """The real entry points: a clean-context DiT trained with clean sets samples an inpainting
  with the cached sampler as with the full computation (PNGs within one level); the cache
  asked of the unmasked DiT's run is refused in one line."""
  _, plain_workdir, _ = dit_run
  workdir = str(tmp_path / "clean")
  summary = train_mode.train_and_evaluate(
      _config(model__clean_context=True, timesteps__clean_fraction=0.5), workdir)
  assert np.isfinite(summary["metrics"]["loss"])
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
  mask = np.zeros((16, 16, 1), np.uint8)
  mask[:, :9] = 255                                  # cuts through the 2x2 tokens
  image_io.save_png(image, str(tmp_path / "in.png"))
  image_io.save_png(mask, str(tmp_path / "mask.png"))
  known_image = dict(task="inpaint", image=str(tmp_path / "in.png"),
                     mask=str(tmp_path / "mask.png"))
  outs = {}
  for cache in (False, True):
    outs[cache] = str(tmp_path / f"cache_{cache}")
    config = _config(model__clean_context=True, sample__num_images=4, sample__batch_size=4,
                     sample__num_steps=8, sample__out_dir=outs[cache],
                     sample__clean_cache=cache,
                     **{f"sample__{k}": v for k, v in known_image.items()})
    sample_mode.sample_from_workdir(config, workdir)
  full, cached = _read(outs[False]).astype(int), _read(outs[True]).astype(int)
  assert np.abs(full - cached).max() <= 1
  np.testing.assert_array_equal(cached[:, mask[..., 0] == 255], np.broadcast_to(
      image[mask[..., 0] == 255], cached[:, mask[..., 0] == 255].shape))
  with pytest.raises(checks.InputError, match=r"sample.clean_cache needs a DiT trained with "
                                              r"model.clean_context=True"):
    _sample(plain_workdir, str(tmp_path / "refused"), clean_cache=True, **known_image)
