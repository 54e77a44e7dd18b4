"""The training system end to end: sharding, multi-process, resume, NaN stop, configs, CLI.

Subprocess runs share a persistent compilation cache (one compile per program for
the whole session) and run the real command line.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from asyncpatch_jax.modes import train_mode
from asyncpatch_jax.config import base_config
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runs import checkpointing
from asyncpatch_jax.data import image_io
from asyncpatch_jax.modes import sample_mode
from asyncpatch_jax.runtime import sharding
from asyncpatch_jax.training import train
from asyncpatch_jax.data import tfds_source
from fixtures import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = os.path.join(ROOT, "configs", "test.py")
FAST = dict(evaluate__classifier_samples=0, sample__num_images=0)   # no final sampling


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
  return cli.run(*args, env=env, **kw)


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
  summary = train_mode.train_and_evaluate(make_config(), workdir, devices=jax.devices()[:1])
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


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [1, 4])
def test_sharded_training_matches_one_device(fsdp, trained_workdir, monkeypatch, tmp_path):
  """8 CPU devices (data x fsdp) give the one-device loss and parameters."""
  monkeypatch.setattr(sharding, "MIN_FSDP_SIZE", 0)  # shard every leaf that divides
  _, one = trained_workdir
  many = train_mode.train_and_evaluate(make_config(train__fsdp=fsdp), str(tmp_path))
  assert len(jax.tree.leaves(many["state"].params)[0].sharding.device_set) == 8
  if fsdp > 1:
    specs = [x.sharding.spec for x in jax.tree.leaves(many["state"].params)]
    assert any("fsdp" in str(s) for s in specs)
  np.testing.assert_allclose(many["metrics"]["loss"], one["metrics"]["loss"], rtol=1e-5)
  assert_trees_equal(one["state"].params, many["state"].params, atol=2e-5)
  assert_trees_equal(one["state"].ema_params, many["state"].ema_params, atol=2e-5)


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
  cfg = make_config(optim__learning_rate=1e6, optim__warmup_steps=0, optim__grad_clip=1e9,
                    train__num_steps=20, train__checkpoint_every=1, train__log_every=10)
  workdir = str(tmp_path)
  with pytest.raises(FloatingPointError, match=r"non-finite at step (\d+)") as err:
    train_mode.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  bad = int(err.value.args[0].split("at step ")[1].split(" ")[0])
  step, state = load_state(workdir, cfg)
  assert step == bad      # the checkpoint after the last finite step, nothing later
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused(trained_workdir):
  workdir, _ = trained_workdir
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  cfg = make_config(model__base_channels=24)
  with pytest.raises(ValueError, match=r"different model(.|\n)*base_channels: 16 -> 24"):
    train_mode.train_and_evaluate(cfg, workdir, devices=jax.devices()[:1])
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before


@pytest.mark.slow
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
                                  "textures", "even_pixels", "sudoku", "polygons"])
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
  with pytest.raises(checks.InputError, match="Did you mean 'digits'"):
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
    train_mode.train_and_evaluate(make_config(), str(blocker / "workdir"))
  res = run_cli([f"--config={TEST_CONFIG}", f"--workdir={tmp_path / 'w'}",
                 "--config.train.num_stesp=3"], cli_env, timeout=120)
  assert res.returncode != 0 and 'Did you mean "num_steps"' in res.stderr
  res = run_cli(["--config=configs/nonexistent.py", f"--workdir={tmp_path / 'w'}"], cli_env,
                timeout=120)
  assert res.returncode != 0 and "nonexistent.py" in res.stderr


@pytest.mark.parametrize("overrides,message", [
    (dict(task="autoregressive", grid=(0, 2)), r"sample.grid=\(0, 2\); expected \(rows, cols\)"),
    (dict(task="ipr", grid=(3,)), r"sample.grid=\(3,\); expected \(rows, cols\)"),
    (dict(task="progressive", num_stripes=0), "sample.num_stripes=0; expected a positive"),
    (dict(task="interleaved", num_rounds=-1), "sample.num_rounds=-1; expected a positive"),
])
def test_bad_sample_settings_are_one_line_errors(overrides, message):
  """Before: ZeroDivisionError / ValueError tracebacks from the schedule arithmetic."""
  config = make_config()
  with config.unlocked():
    config.sample.update(overrides)
  with pytest.raises(checks.InputError, match=message):
    sample_mode._schedule_and_input(config.sample, (16, 16, 1))  # pylint: disable=protected-access


@pytest.mark.slow
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


# ---- Training against closed forms: the loss floor of Gaussian data, label dropout, EMA.

GAUSS_HW = 8


def _gaussian_data():
  """Mean [D] and covariance [D, D] of smooth Gaussian 8x8x1 images (D = 64)."""
  i, j = np.meshgrid(np.arange(GAUSS_HW), np.arange(GAUSS_HW), indexing="ij")
  pos = np.stack([i.ravel(), j.ravel()], 1)
  cov = 0.5 * np.exp(-((pos[:, None] - pos[None]) ** 2).sum(-1) / 8.0) + 0.05 * np.eye(len(pos))
  mean = 0.3 * np.sin(pos[:, 0] / 2.0) * np.cos(pos[:, 1] / 3.0)
  return mean, cov


def _sid2_weight(t, bias):
  """docs/conventions.md, "Loss weighting": t (1 - t) / (t^2 + exp(-b) (1 - t)^2)."""
  return t * (1 - t) / (t * t + np.exp(-bias) * (1 - t) ** 2)


def _gaussian_loss_floor(t_maps, mean, cov, bias):
  """float64 (minimum expected loss, expected loss of the zero model) over the time maps.

  With z = A x + S eps (A = diag(1 - t), S = diag(t)) and v = eps - x, the best
  prediction of v is E[v | z] and its per-pixel error is the conditional variance
  diag(Cov v - Cov(v, z) Cov(z)^-1 Cov(z, v)), with Cov v = Sigma + I,
  Cov(v, z) = S - Sigma A, Cov z = A Sigma A + S^2; the zero model's is E v^2 = diag Sigma + 1 + mu^2.
  """
  floor, zero = [], []
  for t in t_maps.reshape(len(t_maps), -1).astype(np.float64):
    a = 1.0 - t
    cov_z = a[:, None] * cov * a[None, :] + np.diag(t * t)
    cov_vz = np.diag(t) - cov * a[None, :]
    cond_var = np.diag(cov) + 1.0 - np.einsum("ij,ji->i", cov_vz, np.linalg.solve(cov_z, cov_vz.T))
    w = _sid2_weight(t, bias)
    floor.append(np.mean(w * cond_var))
    zero.append(np.mean(w * (np.diag(cov) + 1.0 + mean ** 2)))
  return np.mean(floor), np.mean(zero)


@pytest.fixture(scope="module")
def gaussian_setup():
  """The test config's UNet, unconditional, on 8x8x1 Gaussian images; its train step, jitted."""
  import functools
  cfg = make_config(model__num_classes=0, train__batch_size=64, train__num_steps=200,
                    optim__learning_rate=2e-3, optim__warmup_steps=10)
  setup = train.Setup(cfg, devices=jax.devices()[:1], image_shape=(GAUSS_HW, GAUSS_HW, 1))
  step = jax.jit(functools.partial(train.train_step, setup=setup, root_key=jax.random.key(1)),
                 donate_argnums=(0,))
  key = jax.random.key(0)
  # Compiled once, without backend optimisation (as train.py does on CPU); a fresh state per call.
  init = jax.jit(setup.init_state).lower(key).compile(
      compiler_options={"xla_backend_optimization_level": 0})
  return setup, step, lambda: init(key)


@pytest.mark.slow
def test_training_on_gaussian_data_approaches_the_analytic_loss_floor(gaussian_setup):
  """Loss of the freshly built UNet (zero output) = the zero model's expected loss; after
  200 steps the loss has closed >= 85 % of the gap to the floor E|v - E[v|z]|^2 and is
  not below it. Measured: zero model 0.358, floor 0.162, last 50 of 200 steps 0.177."""
  setup, step, init_state = gaussian_setup
  mean, cov = _gaussian_data()
  bias = setup.config.loss.bias
  t_ref = np.asarray(setup.noise_level_sampler(jax.random.key(123), 512, GAUSS_HW, GAUSS_HW))
  floor, zero = _gaussian_loss_floor(t_ref, mean, cov, bias)
  chol = np.linalg.cholesky(cov)
  rng = np.random.default_rng(0)
  b, d = setup.config.train.batch_size, len(mean)

  def batch():
    return (mean + rng.normal(size=(b, d)) @ chol.T).reshape(b, GAUSS_HW, GAUSS_HW, 1)

  # Batch-to-batch spread of the zero model's loss (NumPy Monte Carlo, 200 batches).
  zero_losses = []
  for _ in range(200):
    x, eps = batch(), rng.normal(size=(b, GAUSS_HW, GAUSS_HW, 1))
    t = t_ref[rng.integers(0, len(t_ref), b)][..., None]
    zero_losses.append(np.mean(_sid2_weight(t, bias) * (eps - x) ** 2))
  np.testing.assert_allclose(np.mean(zero_losses), zero, rtol=0.03)
  state = init_state()
  losses = []
  for _ in range(setup.config.train.num_steps):
    state, metrics = step(state, {"image": batch().astype(np.float32)})
    losses.append(metrics["velocity_loss"])
  losses = np.asarray(jax.device_get(losses), np.float64)
  assert abs(losses[0] - zero) < 5 * np.std(zero_losses), (losses[0], zero)
  end = losses[-50:].mean()
  end_se = losses[-50:].std() / np.sqrt(50)
  assert end - floor < 0.15 * (zero - floor), (end, floor, zero)
  assert end > floor - 5 * end_se, (end, floor)


@pytest.mark.slow
def test_ema_update_follows_its_formula(gaussian_setup):
  """One train step: ema' = d ema + (1 - d) params' with d = min(decay, (1 + k) / (10 + k))
  at step k (training/train_state.py), computed here in NumPy; d != 1/2 so that
  swapping ema and params changes the result."""
  setup, step, init_state = gaussian_setup
  decay = setup.config.train.ema_decay
  mean, cov = _gaussian_data()
  rng = np.random.default_rng(1)
  x = (mean + rng.normal(size=(64, len(mean))) @ np.linalg.cholesky(cov).T).reshape(
      64, GAUSS_HW, GAUSS_HW, 1).astype(np.float32)
  state = init_state()
  for k in (50, 100_000):
    ema = jax.tree.map(lambda p: p + rng.normal(size=p.shape).astype(np.float32),
                       jax.device_get(state.params))
    state = state.replace(step=np.int32(k), ema_params=ema)
    state, _ = step(state, {"image": x})
    d = min(decay, (1.0 + k) / (10.0 + k))
    assert abs(d - 0.5) > 0.1
    new_params, new_ema = jax.device_get((state.params, state.ema_params))
    for e_old, p_new, e_new in zip(jax.tree.leaves(ema), jax.tree.leaves(new_params),
                                   jax.tree.leaves(new_ema)):
      ref = d * np.asarray(e_old, np.float64) + (1 - d) * np.asarray(p_new, np.float64)
      np.testing.assert_allclose(e_new, ref, rtol=1e-6, atol=1e-6)


class _LabelRecorder:
  """Stands in for the UNet in train_step and records the labels it is given."""
  num_classes = 10
  null_label = 10

  def __init__(self):
    self.labels = []

  def apply(self, variables, z, t, y, *, train, rngs):
    del t, train, rngs
    jax.debug.callback(lambda labels: self.labels.append(np.asarray(labels)), y)
    return variables["params"]["w"] * z


def test_label_dropout_replaces_the_stated_share_of_labels():
  """train_step replaces each label by the null class with probability
  train.label_dropout, independently per image and per step; other labels are kept."""
  import functools
  from asyncpatch_jax.training import train_state
  p, b = 0.25, 4096
  setup = train.Setup(make_config(train__label_dropout=p, train__batch_size=b),
                      devices=jax.devices()[:1], image_shape=(4, 4, 1))
  setup.model = recorder = _LabelRecorder()
  state = train_state.create({"w": jax.numpy.zeros(())}, setup.tx)
  labels = np.random.default_rng(2).integers(0, 10, b).astype(np.int32)
  batch = {"image": np.zeros((b, 4, 4, 1), np.float32), "label": labels}
  step = jax.jit(functools.partial(train.train_step, setup=setup, root_key=jax.random.key(3)))
  for _ in range(3):
    state, _ = step(state, batch)
  jax.effects_barrier()
  y = np.stack(recorder.labels)                                  # [steps, B]
  dropped = y == recorder.null_label
  np.testing.assert_array_equal(y[~dropped], np.broadcast_to(labels, y.shape)[~dropped])
  se = np.sqrt(p * (1 - p) / dropped.size)
  assert abs(dropped.mean() - p) < 5 * se, dropped.mean()
  # Independent draws per step: two steps drop the same image with probability p^2.
  both = (dropped[0] & dropped[1]).mean()
  assert abs(both - p * p) < 5 * np.sqrt(p * p * (1 - p * p) / b), both


def test_checkpoint_holds_the_ema_parameters(trained_workdir):
  """The restored EMA is bitwise the in-memory EMA of the run, and is not its parameters."""
  workdir, summary = trained_workdir
  _, restored = load_state(workdir, make_config())
  assert_trees_equal(restored.ema_params, summary["state"].ema_params)
  assert_trees_equal(restored.params, summary["state"].params)
  gaps = [float(np.abs(np.asarray(e) - np.asarray(p)).max())
          for e, p in zip(jax.tree.leaves(restored.ema_params), jax.tree.leaves(restored.params))]
  # 24 steps at lr 1e-3 with EMA decay (1 + k) / (10 + k) leave the EMA ~3e-4 behind the
  # parameters: far above float32 rounding, and exactly 0 if the EMA were the parameters.
  assert max(gaps) > 3e-5, max(gaps)
