"""The uncertainty head (AsyncPatch Sec. 5.5): what it learns (exact Gaussian error
variances), its training on a frozen model (frozen, resumable, tied to its model), and the
command-line tasks that sample with it."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from asyncpatch_jax.modes import train_mode
from asyncpatch_jax.config import base_config
from asyncpatch_jax.runtime import checks
from asyncpatch_jax import models as models_lib
from asyncpatch_jax.modes import sample_mode
from asyncpatch_jax.data import image_io
from asyncpatch_jax.diffusion import gaussian
from asyncpatch_jax.models import uncertainty_head
from asyncpatch_jax.runs import checkpointing
from asyncpatch_jax.runs import loader
from asyncpatch_jax.training import head_train
from asyncpatch_jax.training import train
from asyncpatch_jax.training import train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ------------------------------------------------ what the head learns: exact Gaussian

H, W, C = 4, 4, 3
P, D = H * W, H * W * C


def _gaussian_problem():
  """Correlated Gaussian data on [4, 4, 3]: per-pixel scales, exp(-d) spatial decay,
  channels correlated 0.5 (cov = K_pixels (x) K_channels, pixel-major like z)."""
  rng = np.random.default_rng(0)
  yy, xx = np.meshgrid(np.arange(H), np.arange(W), indexing="ij")
  pos = np.stack([yy.ravel(), xx.ravel()], 1)
  dist = np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1))
  scale = 0.4 + 0.8 * rng.uniform(size=P)
  cov = np.kron(np.exp(-dist) * np.outer(scale, scale), 0.5 * np.eye(C) + 0.5)
  return rng.normal(size=(H, W, C)) * 0.3, cov


MEAN, COV = _gaussian_problem()


def exact_error_variance(t_map: np.ndarray) -> np.ndarray:
  """Var(v_i | z), channel-averaged, for data N(MEAN, COV) and one time map [H, W] (float64).

  (v, z) are jointly Gaussian with v = eps - x, z = A x + S eps, A = diag(1 - t), S = diag(t):
  Cov(v) = I + Sigma, Cov(v, z) = S - Sigma A, Cov(z) = A Sigma A + S^2, and the error of the
  optimal prediction E[v | z] has covariance Cov(v) - Cov(v, z) Cov(z)^-1 Cov(z, v).
  """
  t = np.repeat(t_map.reshape(-1), C).astype(np.float64)
  a = 1.0 - t
  cov_z = a[:, None] * COV * a[None] + np.diag(t * t)
  cross = np.diag(t) - COV * a[None]
  err = np.eye(D) + COV - cross @ np.linalg.solve(cov_z, cross.T)
  return np.diag(err).reshape(H, W, C).mean(-1)


def _time_maps(key, b, h, w):
  """A fifth of the pixels clean (t = 0), the rest uniform: every kind of map."""
  k1, k2 = jax.random.split(key)
  return jnp.where(jax.random.bernoulli(k1, 0.2, (b, h, w)), 0.0,
                   jax.random.uniform(k2, (b, h, w)))


@pytest.mark.slow
def test_head_recovers_the_exact_gaussian_error_variance():
  model = gaussian.GaussianVelocity(MEAN, COV)
  head = uncertainty_head.UncertaintyHead(channels=16, num_layers=3)
  steps, batch = 600, 128
  tx = optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 50, steps))
  params = head.init(jax.random.key(0), *uncertainty_head.example_inputs((H, W, C)))["params"]
  state = train_state.create(params, tx)
  chol = jnp.asarray(np.linalg.cholesky(COV), jnp.float32)
  mu = jnp.asarray(MEAN.reshape(-1), jnp.float32)

  @jax.jit
  def step(state, key):
    k_x, k_update = jax.random.split(key)
    x = (mu + jax.random.normal(k_x, (batch, D)) @ chol.T).reshape(batch, H, W, C)
    return head_train.head_update(state, x, None, {}, k_update, head=head, tx=tx,
                                  velocity_fn=lambda frozen, z, t, y: model(z, t),
                                  noise_level_sampler=_time_maps, ema_decay=0.99)

  # A host loop over one compiled step, as train_head runs it (XLA:CPU runs the
  # convolutions' backward pass several times slower inside a scan).
  for i in range(steps):
    state, metrics = step(state, jax.random.key(i + 1))
  assert abs(float(metrics["calibration"]) - 1.0) < 0.2    # E[err^2 / sigma^2] on a batch

  n = 256
  t = np.asarray(_time_maps(jax.random.key(10 ** 6), n, H, W), np.float64)
  rng = np.random.default_rng(1)
  x = MEAN + (rng.normal(size=(n, D)) @ np.linalg.cholesky(COV).T).reshape(n, H, W, C)
  z = jnp.asarray((1 - t[..., None]) * x + t[..., None] * rng.normal(size=x.shape), jnp.float32)
  tj = jnp.asarray(t, jnp.float32)
  u = np.asarray(uncertainty_head.uncertainty_fn(head)(z, tj, model(z, tj), state.ema_params))
  ref = np.stack([exact_error_variance(tm) for tm in t])
  noisy = t > 0
  # The reference spans a factor ~16 over the time maps; the head recovers it to a median
  # 5 % (95th percentile 17 %) in 600 steps: tolerances 10 % / 30 %, and the log-variances
  # correlate above 0.97 (a head that ignored the time map's neighbourhood: ~0.9).
  log_ratio = np.abs(np.log(u[noisy] / ref[noisy]))
  assert np.median(log_ratio) < 0.10, np.median(log_ratio)
  assert np.percentile(log_ratio, 95) < 0.30, np.percentile(log_ratio, 95)
  assert np.corrcoef(np.log(u[noisy]), np.log(ref[noisy]))[0, 1] > 0.97
  # At t = 0 the velocity error is the unobservable eps_i (variance exactly 1), but the x0
  # prediction is exact: those pixels carry no loss and the head reports 0 there.
  np.testing.assert_allclose(ref[~noisy], 1.0, atol=1e-9)
  assert (u[~noisy] == 0).all()


def test_gaussian_nll_is_the_masked_closed_form():
  rng = np.random.default_rng(2)
  logvar = rng.normal(size=(2, 3, 3))
  v, v_hat = rng.normal(size=(2, 3, 3, 2)), rng.normal(size=(2, 3, 3, 2))
  t = rng.uniform(size=(2, 3, 3))
  t[0, 0, 0] = t[1, 2, 1] = 0.0
  err2 = ((v - v_hat) ** 2).mean(-1)
  ref = (0.5 * (err2 * np.exp(-logvar) + logvar))[t > 0].mean()
  got = uncertainty_head.gaussian_nll(*(jnp.asarray(a, jnp.float32) for a in (logvar, v, v_hat, t)))
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  # The gradient reaches only the head's output, never the prediction (stop-gradient).
  g = jax.grad(lambda vh: uncertainty_head.gaussian_nll(jnp.asarray(logvar), jnp.asarray(v), vh,
                                                        jnp.asarray(t)))(jnp.asarray(v_hat))
  assert (np.asarray(g) == 0).all()


# --------------------------------------------------- training on a frozen trained model


def _config(path, **overrides):
  config = base_config.load_config_file(os.path.join(ROOT, "configs", path))
  with config.unlocked():
    for key, value in overrides.items():
      section, name = key.split("__")
      config[section][name] = value
  return config


def _make_model(workdir, seed):
  """A model workdir as training leaves it (config.json, an orbax checkpoint) holding the
  test config's UNet at its initialisation from `seed`: what the head needs is a model
  and its checkpoint, not a trained one, and this compiles no train step."""
  cfg = _config("test.py")
  setup = train.Setup(cfg)
  params = models_lib.init_params(setup.model, jax.random.key(seed), setup.image_shape)
  state = train_state.create(params, setup.tx)
  ckpt = checkpointing.Checkpointer(workdir, cfg, setup.image_shape, every=1, keep=None)
  try:
    ckpt.write_config_json()
    ckpt.save(2, state, force=True)
  finally:
    ckpt.close()
  return train.load_trained(workdir)


HEAD = dict(uncertainty__channels=8, uncertainty__num_layers=2, train__batch_size=16,
            train__num_steps=4, train__checkpoint_every=2, train__log_every=2,
            train__keep_checkpoints=5, train__progress_bar=False)


def _head_config(model_workdir, **overrides):
  return _config("uncertainty_digits.py", uncertainty__model_workdir=model_workdir,
                 **{**HEAD, **overrides})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """Two model workdirs (the test config's UNet, seeds 0 and 1) and a head trained on the first."""
  root = tmp_path_factory.mktemp("heads")
  a, b = str(root / "model_a"), str(root / "model_b")
  setup_a, state_a = _make_model(a, 0)
  setup_b, state_b = _make_model(b, 1)
  head_dir = str(root / "head_a")
  summary = train_mode.train_and_evaluate(_head_config(a), head_dir, devices=jax.devices()[:1])
  return dict(root=root, a=a, b=b, setup_a=setup_a, state_a=state_a, setup_b=setup_b,
              state_b=state_b, head_dir=head_dir, summary=summary)


def _head_state(head_dir, model_workdir):
  setup = head_train.HeadSetup(_head_config(model_workdir))
  ckpt = checkpointing.Checkpointer(head_dir, setup.config, setup.checkpoint_shape, every=1,
                                    keep=None, model=setup.checkpoint_model(), read_only=True)
  try:
    return ckpt.restore(setup.abstract_state)
  finally:
    ckpt.close()


def _assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_the_model_stays_frozen_and_the_head_trains(models):
  summary = models["summary"]
  assert summary["step"] == 4
  # The parameters the head trained on are the model's EMA parameters, bit for bit, and
  # the model's workdir still holds exactly them.
  _, state_after = train.load_trained(models["a"])
  _assert_trees_equal(summary["frozen"], models["state_a"].ema_params)
  _assert_trees_equal(state_after.params, models["state_a"].params)
  _assert_trees_equal(state_after.ema_params, models["state_a"].ema_params)
  assert summary["frozen_model"]["fingerprint"] == loader.fingerprint(
      models["state_a"].ema_params)
  # The head did train: its parameters moved from the initialisation.
  setup = head_train.HeadSetup(_head_config(models["a"]))
  init = setup.init_state(jax.random.fold_in(jax.random.key(0), -1 % 2 ** 31))
  moved = [float(np.abs(np.asarray(x) - np.asarray(y)).max())
           for x, y in zip(jax.tree.leaves(init.params), jax.tree.leaves(summary["state"].params))]
  assert max(moved) > 1e-4
  metrics = [json.loads(line) for line in open(os.path.join(models["head_dir"], "metrics.jsonl"))]
  assert [m["step"] for m in metrics] == [2, 4]
  assert all(np.isfinite(m["loss"]) and m["velocity_mse"] > 0 for m in metrics)


def test_a_finished_head_is_reused_by_the_experiments_resume(models):
  """experiments/common.train_or_resume on a finished head workdir trains nothing (a rerun of
  ipr_benchmarks used to refuse it as "a different model": the head's checkpoint records its
  frozen model, which a head config does not); it is checked against that model instead, so
  a finished head of another model is still refused."""
  from experiments import common  # pylint: disable=g-import-not-at-top
  metrics = os.path.join(models["head_dir"], "metrics.jsonl")
  before = open(metrics).read()
  assert common.train_or_resume(_head_config(models["a"]), models["head_dir"]) == 0.0
  assert open(metrics).read() == before
  with pytest.raises(checks.InputError, match="trained on another model"):
    common.train_or_resume(_head_config(models["b"]), models["head_dir"])


def test_head_training_resumes_bitwise(models):
  # A run interrupted after its step-2 checkpoint: the head workdir as it was then.
  resumed = str(models["root"] / "head_resumed")
  shutil.copytree(models["head_dir"], resumed)
  shutil.rmtree(os.path.join(resumed, "checkpoints", "4"))
  summary = train_mode.train_and_evaluate(_head_config(models["a"]), resumed,
                                     devices=jax.devices()[:1])
  assert summary["step"] == 4
  a = _head_state(models["head_dir"], models["a"])
  b = _head_state(resumed, models["a"])
  _assert_trees_equal(a.params, b.params)
  _assert_trees_equal(a.ema_params, b.ema_params)
  _assert_trees_equal(a.opt_state, b.opt_state)


def test_a_head_of_another_model_is_refused(models):
  head_dir = models["head_dir"]
  before = sorted(os.listdir(os.path.join(head_dir, "checkpoints")))
  fp_a = loader.fingerprint(models["state_a"].ema_params)
  fp_b = loader.fingerprint(models["state_b"].ema_params)
  assert fp_a != fp_b
  # Resuming its training on model B.
  with pytest.raises(checks.InputError, match=rf"different model(.|\n)*frozen.fingerprint: "
                                              rf"'{fp_a}' -> '{fp_b}'"):
    train_mode.train_and_evaluate(_head_config(models["b"]), head_dir, devices=jax.devices()[:1])
  assert sorted(os.listdir(os.path.join(head_dir, "checkpoints"))) == before
  # Sampling model B with it.
  with pytest.raises(checks.InputError, match=rf"trained on another model(.|\n)*fingerprint: "
                                              rf"'{fp_a}' -> '{fp_b}'"):
    loader.load_run(models["b"], head_workdir=head_dir)
  # Model A gets its head's EMA parameters.
  head = loader.load_run(models["a"], head_workdir=head_dir).head
  _assert_trees_equal(head.params, models["summary"]["state"].ema_params)
  assert head.module.channels == 8
  with pytest.raises(checks.InputError, match="model_workdir is empty"):
    head_train.HeadSetup(_head_config(""))


# ------------------------------------------------------------- --mode=sample tasks


def _sample_config(out_dir, **overrides):
  return _config("test.py", sample__out_dir=out_dir, sample__num_images=4,
                 sample__batch_size=4, sample__num_steps=8, **overrides)


def test_sample_mode_ordered_task_and_its_bad_inputs(models, tmp_path):
  # (tests/test_readme.py runs the README's adaptive, ordered and ipr-in-SRM-order commands.)
  a, head_dir = models["a"], models["head_dir"]
  # ordered, conditioned on an image: the known (white) half comes back exactly.
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (16, 16, 1), dtype=np.uint8)
  mask = np.zeros((16, 16, 1), np.uint8)
  mask[:, :8] = 255
  image_io.save_png(image, str(tmp_path / "in.png"))
  image_io.save_png(mask, str(tmp_path / "mask.png"))
  out = str(tmp_path / "ordered")
  settings = sample_mode.sample_from_workdir(
      _sample_config(out, sample__task="ordered", sample__grid=(2, 2),
                     sample__image=str(tmp_path / "in.png"), sample__mask=str(tmp_path / "mask.png"),
                     uncertainty__head_workdir=head_dir, uncertainty__overlap=0.5), a)
  assert settings["policy"] == "uncertainty_ordered" and settings["budget"] == 8
  assert settings["network_evaluations_max"] == 8          # 2 unknown quadrants, overlap 0.5
  for name in ("samples.png", "steps.png", "settings.json"):
    assert os.path.exists(os.path.join(out, name))
  for i in range(4):
    got = image_io.load_image(os.path.join(out, f"sample_{i:03d}.png"), (16, 16, 1))
    np.testing.assert_array_equal(image_io.to_uint8(got)[:, :8], image[:, :8])
  # Bad input: no head, a head of another model, an unknown policy, too small a budget.
  with pytest.raises(checks.InputError, match="head_workdir"):
    sample_mode.sample_from_workdir(_sample_config(out, sample__task="ordered"), a)
  with pytest.raises(checks.InputError, match="trained on another model"):
    sample_mode.sample_from_workdir(
        _sample_config(out, sample__task="ordered", uncertainty__head_workdir=head_dir),
        models["b"])
  with pytest.raises(checks.InputError, match="Unknown uncertainty.policy 'look_ahed'"):
    sample_mode.sample_from_workdir(
        _sample_config(out, sample__task="adaptive", uncertainty__head_workdir=head_dir,
                       uncertainty__policy="look_ahed"), a)
  with pytest.raises(checks.InputError, match="budget of 3 steps is smaller than the 4"):
    sample_mode.sample_from_workdir(
        _sample_config(out, sample__task="ordered", uncertainty__head_workdir=head_dir,
                       uncertainty__budget=3), a)
