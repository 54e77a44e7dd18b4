"""The training system end to end: sharding, multi-process, resume, NaN stop, configs, CLI.

Subprocess runs share a persistent compilation cache (one compile per program for
the whole session) and run the real command line.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from asyncpatch_jax import base_config
from asyncpatch_jax.training import checkpointing
from asyncpatch_jax.data import image_io
from asyncpatch_jax import sample_mode
from asyncpatch_jax.training import sharding
from asyncpatch_jax.training import train
from asyncpatch_jax.data import tfds_source

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = os.path.join(ROOT, "configs", "test.py")
FAST = dict(eval__num_samples=0, sample__num_images=0)   # no final sampling


def make_config(path=TEST_CONFIG, **overrides):
  config = base_config.load_config_file(path)
  with config.unlocked():
    for key, value in {**FAST, **overrides}.items():
      section, name = key.split("__")
      config[section][name] = value
  return config


def cli_args(overrides):
  return [f"--config.{k.replace('__', '.')}={v}" for k, v in {**FAST, **overrides}.items()]


@pytest.fixture(scope="session")
def cli_env():
  # Inherits the 8 host devices and the compilation cache of tests/conftest.py, so the
  # command line compiles nothing the in-process runs compiled already.
  return dict(os.environ, PYTHONPATH=ROOT)


def run_cli(args, env, **kw):
  return subprocess.run([sys.executable, "-m", "asyncpatch_jax.main", *args], cwd=ROOT,
                        env=env, capture_output=True, text=True, **kw)


def load_state(workdir, config):
  setup = train.Setup(config)
  ckpt = checkpointing.Checkpointer(workdir, config, setup.image_shape, every=1, keep=None)
  try:
    return ckpt.latest_step(), ckpt.restore(setup.abstract_state)
  finally:
    ckpt.close()


def assert_trees_equal(a, b, atol=0.0):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if atol:
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol, rtol=atol)
    else:
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  """A tiny model trained in-process for 24 steps on one device (the test config)."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  summary = train.train_and_evaluate(make_config(), workdir, devices=jax.devices()[:1])
  return workdir, summary


def test_training_writes_metrics_config_and_checkpoints(trained_workdir):
  workdir, summary = trained_workdir
  assert summary["step"] == 24 and not summary["preempted"]
  lines = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [l["step"] for l in lines] == [4, 8, 12, 16, 20, 24]
  for key in ("loss", "grad_norm", "param_norm", "update_norm", "learning_rate", "steps_per_s",
              "images_per_s"):
    assert np.isfinite(lines[-1][key])
  # Logged learning rate is the warmup + cosine schedule at the step (optax, independently).
  cfg = make_config()
  warm, peak = cfg.optim.warmup_steps, cfg.optim.learning_rate
  s = 23
  cos = 0.5 * (1 + np.cos(np.pi * (s - warm) / (cfg.train.num_steps - warm)))
  expected = peak * (cfg.optim.end_lr_ratio + (1 - cfg.optim.end_lr_ratio) * cos)
  np.testing.assert_allclose(lines[-1]["learning_rate"], expected, rtol=1e-5)
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["base_channels"] == 16
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["12", "24"]
  assert os.listdir(os.path.join(workdir, "tensorboard"))


@pytest.mark.parametrize("fsdp", [1, 4])
def test_sharded_training_matches_one_device(fsdp, trained_workdir, monkeypatch, tmp_path):
  """8 CPU devices (data x fsdp) give the one-device loss and parameters."""
  monkeypatch.setattr(sharding, "MIN_FSDP_SIZE", 0)  # shard every leaf that divides
  _, one = trained_workdir
  many = train.train_and_evaluate(make_config(train__fsdp=fsdp), str(tmp_path))
  assert len(jax.tree.leaves(many["state"].params)[0].sharding.device_set) == 8
  if fsdp > 1:
    specs = [x.sharding.spec for x in jax.tree.leaves(many["state"].params)]
    assert any("fsdp" in str(s) for s in specs)
  np.testing.assert_allclose(many["metrics"]["loss"], one["metrics"]["loss"], rtol=1e-5)
  assert_trees_equal(one["state"].params, many["state"].params, atol=2e-5)
  assert_trees_equal(one["state"].ema_params, many["state"].ema_params, atol=2e-5)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def test_two_processes_train_together_like_one(trained_workdir, tmp_path, cli_env):
  """jax.distributed on localhost (gloo CPU collectives), one device per process."""
  workdir = str(tmp_path / "mp")
  overrides = {}
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(cli_env, XLA_FLAGS="--xla_force_host_platform_device_count=1",
               JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen(
        [sys.executable, "-m", "asyncpatch_jax.main", f"--config={TEST_CONFIG}",
         f"--workdir={workdir}", *cli_args(overrides)], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  assert "process 1 of 2" in outs[1] or "process 1 of 2" in outs[0]
  _, single = trained_workdir                      # one process, one device
  step, state = load_state(workdir, make_config())
  assert step == 24
  assert_trees_equal(single["state"].params, state.params, atol=2e-5)


def _wait_for_step(workdir, proc, step, timeout=240):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError("the run ended before it could be interrupted:\n" + proc.stdout.read()[-3000:])
    if os.path.exists(path):
      with open(path) as f:
        if any(json.loads(l)["step"] >= step for l in f if l.strip()):
          return
    time.sleep(0.02)
  raise AssertionError("timed out waiting for the run")


# Host-side settings only: the same compiled step as the other 8-device runs.
RESUME = dict(train__log_every=1, train__checkpoint_every=4)


@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory, cli_env):
  ref = str(tmp_path_factory.mktemp("uninterrupted"))
  res = run_cli([f"--config={TEST_CONFIG}", *cli_args(RESUME), f"--workdir={ref}"], cli_env,
                timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  return ref


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_interrupted_run_resumes_bitwise(sig, uninterrupted_run, tmp_path, cli_env):
  overrides = RESUME
  args = [f"--config={TEST_CONFIG}", *cli_args(overrides)]
  ref = uninterrupted_run
  wd = str(tmp_path / "interrupted")
  proc = subprocess.Popen([sys.executable, "-m", "asyncpatch_jax.main", *args, f"--workdir={wd}"],
                          cwd=ROOT, env=cli_env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  _wait_for_step(wd, proc, 12)
  proc.send_signal(sig)
  out = proc.communicate(timeout=120)[0]
  cfg = make_config(**overrides)
  stopped_at, _ = load_state(wd, cfg)
  if sig == signal.SIGTERM:
    assert proc.returncode == 143, out[-2000:]      # saved at the current step, then exited
  else:
    assert proc.returncode == -signal.SIGKILL
  assert 4 <= stopped_at < 24
  resumed = run_cli([*args, f"--workdir={wd}"], cli_env, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  _, a = load_state(ref, cfg)
  _, b = load_state(wd, cfg)
  assert int(a.step) == int(b.step) == 24
  assert_trees_equal(a.params, b.params)
  assert_trees_equal(a.ema_params, b.ema_params)
  assert_trees_equal(a.opt_state, b.opt_state)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  cfg = make_config(optim__learning_rate=1e6, optim__warmup_steps=0, optim__grad_clip=1e9,
                    train__num_steps=20, train__checkpoint_every=1, train__log_every=10)
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match=r"non-finite at step (\d+)") as err:
    train.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  bad = int(err.value.args[0].split("at step ")[1].split(" ")[0])
  step, state = load_state(workdir, cfg)
  assert step == bad      # the checkpoint after the last finite step, nothing later
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def test_incompatible_checkpoint_is_refused(trained_workdir):
  workdir, _ = trained_workdir
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  cfg = make_config(model__base_channels=24)
  with pytest.raises(ValueError, match=r"different model(.|\n)*base_channels: 16 -> 24"):
    train.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


def test_sample_mode_inpainting_keeps_the_known_pixels(trained_workdir, tmp_path, cli_env):
  workdir, _ = trained_workdir
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
  mask = np.zeros((16, 16, 1), np.uint8)
  mask[:, :8] = 255
  image_io.save_png(image, str(tmp_path / "in.png"))
  image_io.save_png(mask, str(tmp_path / "mask.png"))
  out_dir = tmp_path / "out"
  res = run_cli([f"--config={TEST_CONFIG}", f"--workdir={workdir}", "--mode=sample",
                 "--config.sample.task=inpaint", f"--config.sample.image={tmp_path / 'in.png'}",
                 f"--config.sample.mask={tmp_path / 'mask.png'}", "--config.sample.num_images=4",
                 f"--config.sample.out_dir={out_dir}"], cli_env, timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  settings = json.load(open(out_dir / "settings.json"))
  assert settings["task"] == "inpaint" and settings["step"] == 24
  from PIL import Image
  for i in range(4):
    out = np.asarray(Image.open(out_dir / f"sample_{i:03d}.png"))
    np.testing.assert_array_equal(out[:, :8], image[:, :8, 0])
    assert not np.array_equal(out[:, 8:], image[:, 8:, 0])
  # Bad inputs stop with a clear message before compiling.
  image_io.save_png(np.zeros((12, 16, 1), np.uint8), str(tmp_path / "small.png"))
  res = run_cli([f"--config={TEST_CONFIG}", f"--workdir={workdir}", "--mode=sample",
                 "--config.sample.task=inpaint", f"--config.sample.image={tmp_path / 'small.png'}",
                 f"--config.sample.mask={tmp_path / 'mask.png'}"], cli_env, timeout=120)
  assert res.returncode != 0 and "expected 16x16" in res.stderr
  image_io.save_png(np.full((16, 16, 1), 7, np.uint8), str(tmp_path / "grey.png"))
  res = run_cli([f"--config={TEST_CONFIG}", f"--workdir={workdir}", "--mode=sample",
                 "--config.sample.task=inpaint", f"--config.sample.image={tmp_path / 'in.png'}",
                 f"--config.sample.mask={tmp_path / 'grey.png'}"], cli_env, timeout=120)
  assert res.returncode != 0 and "must be binary" in res.stderr


def test_load_trained_reads_the_runs_config_and_refuses_empty_workdirs(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  setup, state = train.load_trained(workdir)             # config from workdir/config.json
  assert int(state.step) == 24 and setup.config.model.base_channels == 16
  with pytest.raises(ValueError, match="has no config.json"):
    train.load_trained(str(tmp_path))
  with pytest.raises(ValueError, match="has no checkpoints; train first"):
    sample_mode.sample_from_workdir(make_config(), str(tmp_path))


def test_sample_mode_ipr_refines_only_the_free_regions(trained_workdir, tmp_path):
  workdir, _ = trained_workdir
  image = np.random.default_rng(1).integers(0, 256, (16, 16, 1), dtype=np.uint8)
  mask = np.zeros((16, 16, 1), np.uint8)
  mask[:, :8] = 255                                  # regions 0 and 2 of the 2x2 grid
  image_io.save_png(image, str(tmp_path / "in.png"))
  image_io.save_png(mask, str(tmp_path / "mask.png"))
  config = make_config(sample__task="ipr", sample__image=str(tmp_path / "in.png"),
                       sample__mask=str(tmp_path / "mask.png"), sample__num_images=4,
                       sample__num_steps=8, sample__ipr_rounds=4, sample__ipr_alpha=0.5,
                       sample__out_dir=str(tmp_path / "ipr"))
  settings = sample_mode.sample_from_workdir(config, workdir)
  assert settings["condition_regions"] == [0, 2] and settings["rounds_shown"] == [0, 1, 2, 4]
  from PIL import Image
  rounds = np.asarray(Image.open(settings["rounds_grid"]))
  assert rounds.shape[0] > rounds.shape[1] / 4 * 3      # 4 rows of 4 samples
  for i in range(4):
    out = np.asarray(Image.open(tmp_path / "ipr" / f"sample_{i:03d}.png"))
    np.testing.assert_array_equal(out[:, :8], image[:, :8, 0])
  misaligned = mask.copy()
  misaligned[:, 8:10] = 255
  image_io.save_png(misaligned, str(tmp_path / "mask2.png"))
  with config.unlocked():
    config.sample.mask = str(tmp_path / "mask2.png")
  with pytest.raises(ValueError, match=r"regions \[1, 3\] are only partly known"):
    sample_mode.sample_from_workdir(config, workdir)


@pytest.fixture(scope="module")
def prepared_imagenet64(tmp_path_factory):
  """A real (tiny) prepared imagenet_resized/64x64 in ArrayRecord format, no TensorFlow."""
  data_dir = tmp_path_factory.mktemp("tfds")
  rng = np.random.default_rng(0)
  examples = [{"image": rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), "label": i % 1000}
              for i in range(8)]
  tfds_source.write_prepared_dataset("imagenet64", str(data_dir),
                                     {"train": examples, "test": examples[:4]})
  return str(data_dir)


@pytest.mark.parametrize("name", ["default", "test", "imagenet64_60m", "imagenet64_620m",
                                  "textures", "even_pixels", "sudoku"])
def test_every_config_builds_through_eval_shape(name, prepared_imagenet64):
  config = base_config.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
  if config.data.dataset.startswith("imagenet"):
    with config.unlocked():
      config.data.data_dir = prepared_imagenet64
  setup = train.Setup(config)          # builds the data source and eval_shapes the state
  n = sum(x.size for x in jax.tree.leaves(setup.abstract_state.params))
  assert n > 0
  h, w, c = setup.image_shape
  assert c == config.model.out_channels and h % setup.model.downsampling == 0


def test_bad_configs_fail_before_compiling(tmp_path, cli_env):
  with pytest.raises(ValueError, match="Did you mean 'digits'"):
    train.Setup(make_config(data__dataset="digitz"))
  with pytest.raises(ValueError, match="data_dir"):
    train.Setup(make_config(data__dataset="imagenet64"))
  with pytest.raises(ValueError, match="out_channels=3"):
    train.Setup(make_config(model__out_channels=3))
  with pytest.raises(ValueError, match="patch size 3"):
    train.Setup(make_config(timesteps__patch_sizes=(3,)))
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(ValueError, match="not writable"):
    train.train_and_evaluate(make_config(), str(blocker / "workdir"))
  res = run_cli([f"--config={TEST_CONFIG}", f"--workdir={tmp_path / 'w'}",
                 "--config.train.num_stesp=3"], cli_env, timeout=120)
  assert res.returncode != 0 and 'Did you mean "num_steps"' in res.stderr
  res = run_cli(["--config=configs/nonexistent.py", f"--workdir={tmp_path / 'w'}"], cli_env,
                timeout=120)
  assert res.returncode != 0 and "nonexistent.py" in res.stderr


def test_collage_regulariser_enters_the_training_loss():
  """config.loss.mu_reg adds the PIFS collage penalty (Thm. 15) to the loss."""
  import functools
  setup = train.Setup(make_config(loss__mu_reg=0.5, loss__reg_patch_size=4),
                      devices=jax.devices()[:1])
  state = jax.jit(setup.init_state)(jax.random.key(0))
  # Fresh UNets output 0 (zero-initialised output layers): perturb so the Jacobian is not 0.
  rng = np.random.default_rng(0)
  state = state.replace(params=jax.tree.map(
      lambda x: x + 0.05 * rng.normal(size=x.shape).astype(np.float32), state.params))
  src = setup.source
  batch = {"image": np.stack([src[i]["image"] for i in range(16)]),
           "label": np.array([src[i]["label"] for i in range(16)], np.int32)}
  step = jax.jit(functools.partial(train.train_step, setup=setup, root_key=jax.random.key(1)))
  _, m = step(state, batch)
  m = jax.device_get(m)
  assert m["collage_reg"] > 0 and np.isfinite(m["loss"])
  np.testing.assert_allclose(m["loss"], m["velocity_loss"] + 0.5 * m["collage_reg"], rtol=1e-5)
