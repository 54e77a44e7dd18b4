"""Nothing lost, nothing silent (issue 11): damaged checkpoints, full disks, Ctrl-C, bad input.

One tiny run (configs/test.py, 24 steps, checkpoints every 4, the same compiled step as
tests/test_train.py's command-line runs) trained in this process is the reference: a
damaged copy of its workdir must resume from the step before the damage and end with
bitwise the same state, and an interrupted command-line run must too. The bad-input
rows run the real command line (exit code, stderr) and compare the files of the
workdir before and after.
"""

import contextlib
import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from asyncpatch_jax.modes import train_mode
from asyncpatch_jax.config import base_config
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.modes import sample_mode
from asyncpatch_jax.data import image_io
from asyncpatch_jax.runs import checkpointing
from asyncpatch_jax.runs import compat
from asyncpatch_jax.runs import loader
from asyncpatch_jax.runs import step_selection
from asyncpatch_jax.training import train
from asyncpatch_jax.training import train_state

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = os.path.join(ROOT, "configs", "test.py")
# Host-side settings only (tests/test_train.py's command-line runs compile the same step).
RUN = {"train.log_every": 1, "train.checkpoint_every": 4, "evaluate.classifier_samples": 0,
       "sample.num_images": 0}
ENV = dict(os.environ, PYTHONPATH=ROOT)     # 8 host devices, the shared compilation cache


def make_config(overrides=None):
  config = base_config.load_config_file(TEST_CONFIG)
  with config.unlocked():
    for key, value in {**RUN, **(overrides or {})}.items():
      section, name = key.split(".")
      config[section][name] = value
  return config


def cli(*args, overrides=None, config=True):
  flags = [f"--config.{k}={v}" for k, v in (overrides or {}).items()]
  return [sys.executable, "-m", "asyncpatch_jax.main",
          *([f"--config={TEST_CONFIG}"] + [f"--config.{k}={v}" for k, v in RUN.items()]
            if config else []), *args, *flags]


def run(cmd, **kw):
  return subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, **kw)


def snapshot(path):
  """{relative path: sha256} of every file under path (what 'nothing changed' compares)."""
  out = {}
  for f in sorted(glob.glob(os.path.join(path, "**"), recursive=True)):
    if os.path.isfile(f):
      out[os.path.relpath(f, path)] = hashlib.sha256(open(f, "rb").read()).hexdigest()
  return out


def lines(text):
  return [l for l in text.splitlines() if l.strip()]


def notices(stderr):
  """stderr without the device line and the run's own info lines (absl 'I<mmdd> ...')."""
  return [l for l in lines(stderr) if not re.match(r"I\d{4} ", l) and not l.startswith("jax ")]


def assert_same_state(a, b):
  assert int(a.step) == int(b.step)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted run: (workdir, final state, metrics.jsonl records)."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  summary = train_mode.train_and_evaluate(make_config(), workdir)
  assert summary["step"] == 24
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "24"]
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return workdir, summary["state"], records


def _biggest_data_file(step_dir):
  return max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
             key=os.path.getsize)


def _damage(kind, step_dir):
  """Damages a step; returns the file named in the report."""
  if kind in ("truncated", "deleted", "flipped"):
    path = _biggest_data_file(step_dir)
    size = os.path.getsize(path)
    if kind == "truncated":
      os.truncate(path, size // 2)
    elif kind == "deleted":
      os.remove(path)
    else:                                   # 64 bytes inverted in the middle, same size
      with open(path, "r+b") as f:
        f.seek(size // 2)
        data = f.read(64)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in data))
  elif kind == "emptied_metadata":
    path = os.path.join(step_dir, "state", "_METADATA")
    open(path, "w").close()
  else:                                     # deleted_meta
    path = os.path.join(step_dir, "meta", "metadata")
    os.remove(path)
  return os.path.relpath(path, step_dir)


WHAT = {"truncated": "bytes, {} when saved (truncated)", "deleted": "is missing",
        "flipped": "has different bytes than when saved", "emptied_metadata": "has 0 bytes",
        "deleted_meta": "is missing"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", list(WHAT))
def test_damaged_newest_checkpoint_falls_back_and_resumes_bitwise(kind, reference, tmp_path,
                                                                   caplog):
  ref_dir, ref_state, ref_records = reference
  workdir = str(tmp_path / "w")
  shutil.copytree(ref_dir, workdir)
  damaged = os.path.join(workdir, "checkpoints", "24")
  size = os.path.getsize(_biggest_data_file(damaged))
  name = _damage(kind, damaged)
  kept = snapshot(damaged)
  caplog.set_level("WARNING")
  summary = train_mode.train_and_evaluate(make_config(), workdir)
  reports = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(reports) == 1, reports
  assert f"step 24 " in reports[0] and f"file {name} " in reports[0]
  assert WHAT[kind].format(size) in reports[0] and "using step 20 instead" in reports[0]
  assert "\n" not in reports[0]
  # Resumed from 20, saved 24 again: bitwise the uninterrupted run's end state.
  assert_same_state(ref_state, summary["state"])
  assert_same_state(ref_state, train.load_trained(workdir, make_config())[1])
  # metrics.jsonl: steps 21-24 logged before the damage were dropped and logged again.
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records] == list(range(1, 25))
  assert [r["loss"] for r in records] == [r["loss"] for r in ref_records]
  # The damaged step was renamed, not deleted: every file still there, unchanged.
  assert snapshot(os.path.join(workdir, "checkpoints", "24.damaged")) == kept
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20", "24", "24.damaged"]


def test_every_checkpoint_damaged_stops_with_a_list_and_changes_nothing(reference, tmp_path):
  ref_dir, _, _ = reference
  workdir = str(tmp_path / "w")
  shutil.copytree(ref_dir, workdir)
  _damage("truncated", os.path.join(workdir, "checkpoints", "24"))
  _damage("deleted_meta", os.path.join(workdir, "checkpoints", "20"))
  before = snapshot(workdir)
  with pytest.raises(step_selection.DamagedCheckpointError) as err:
    train_mode.train_and_evaluate(make_config(), workdir)
  msg = str(err.value)
  assert "\n" not in msg and "every step is damaged" in msg
  assert "step 24: file state/ocdbt.process_0/d/" in msg and "(truncated)" in msg
  assert "step 20: file meta/metadata is missing" in msg and "Nothing was deleted" in msg
  with pytest.raises(step_selection.DamagedCheckpointError):
    train.load_trained(workdir)
  assert snapshot(workdir) == before


@contextlib.contextmanager
def small_disk(path, size):
  """A tmpfs of `size` bytes at `path` (root); yields False if mounting is not permitted."""
  os.makedirs(path)
  res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", path],
                       capture_output=True)
  try:
    yield res.returncode == 0
  finally:
    if res.returncode == 0:
      subprocess.run(["umount", path], check=True)


@pytest.mark.slow
def test_full_disk_stops_training_with_one_line_and_keeps_the_earlier_step(reference, tmp_path):
  ref_dir, _, _ = reference
  one_step = sum(os.path.getsize(f) for f in
                 glob.glob(os.path.join(ref_dir, "checkpoints", "20", "**"), recursive=True)
                 if os.path.isfile(f))
  mount = str(tmp_path / "disk")
  with small_disk(mount, one_step * 3 // 2) as mounted:   # room for one checkpoint, not two
    workdir = os.path.join(mount, "w")
    if not mounted:
      if os.geteuid() == 0:
        pytest.skip("cannot mount a tmpfs here, and root ignores a read-only directory")
      os.makedirs(os.path.join(workdir, "checkpoints"))    # step 4 fails instead of step 8
      os.chmod(os.path.join(workdir, "checkpoints"), 0o555)
    res = run(cli(f"--workdir={workdir}"), timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    assert lines(res.stderr)[0].startswith("jax ") and "Traceback" not in res.stderr
    # One error line, the last; (orbax may warn that a save waited > 1 s on a busy machine.)
    out = [l for l in notices(res.stderr) if "Waiting for previous save" not in l]
    assert len(out) == 1 and out == lines(res.stderr)[-1:], res.stderr[-3000:]
    failed = 8 if mounted else 4
    assert out[0].startswith(f"error: saving checkpoint step {failed} to ")
    assert ("No space left on device" if mounted else "Permission denied") in out[0]
    steps = [json.loads(l)["step"] for l in open(os.path.join(workdir, "metrics.jsonl"))]
    assert failed <= steps[-1] <= failed + 4          # stopped within one checkpoint interval
    left = os.listdir(os.path.join(workdir, "checkpoints"))
    assert not [n for n in left if "tmp" in n], left
    if mounted:
      assert sorted(left) == ["4"]
      _, state = train.load_trained(workdir)
      assert int(state.step) == 4
      assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state.params))


def _wait_for_step(workdir, proc, step, timeout=240):
  path = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + timeout
  while time.time() < deadline:
    if proc.poll() is not None:
      raise AssertionError("the run ended before it could be interrupted:\n"
                           + proc.stderr.read()[-3000:])
    if os.path.exists(path):
      with open(path) as f:
        if any(json.loads(l)["step"] >= step for l in f if l.strip()):
          return
    time.sleep(0.02)
  raise AssertionError("timed out waiting for the run")


@pytest.mark.slow
def test_ctrl_c_saves_exits_130_and_resumes_bitwise(reference, tmp_path):
  _, ref_state, ref_records = reference
  workdir = str(tmp_path / "w")
  proc = subprocess.Popen(cli(f"--workdir={workdir}"), cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  _wait_for_step(workdir, proc, 6)
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert "Traceback" not in err and "Interrupted: saving" in err
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")))
  assert 6 <= saved[-1] < 24, saved                 # the step it was at, saved
  summary = train_mode.train_and_evaluate(make_config(), workdir)       # resume, as a rerun would
  assert_same_state(ref_state, summary["state"])
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records] == list(range(1, 25))        # every step once
  assert [r["loss"] for r in records] == [r["loss"] for r in ref_records]


@pytest.mark.parametrize("delay", [0.6, 1.2])
def test_ctrl_c_during_start_up_exits_130_in_one_line_and_touches_nothing(delay, tmp_path):
  """Ctrl-C while the libraries load: held until they are loaded, then exit 130.

  Python's default (a KeyboardInterrupt traceback, killed by SIGINT) and, in CI, a
  SIGSEGV inside jaxlib's import were what an early Ctrl-C gave before.
  """
  workdir = tmp_path / "w"
  # A user's Ctrl-C reaches a program whose SIGINT is not ignored; pytest started in the
  # background of a non-interactive shell hands its children an ignored SIGINT.
  proc = subprocess.Popen(cli(f"--workdir={workdir}"), cwd=ROOT, env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  time.sleep(delay)
  proc.send_signal(signal.SIGINT)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 130, err[-3000:]
  assert err.strip().splitlines()[-1] == "interrupted." and "Traceback" not in err, err
  assert not out and not workdir.exists()


def test_sample_mode_needs_no_config_and_reports_a_damaged_step_in_one_line(reference,
                                                                           tmp_path):
  ref_dir, _, _ = reference
  workdir = str(tmp_path / "w")
  shutil.copytree(ref_dir, workdir)
  _damage("truncated", os.path.join(workdir, "checkpoints", "24"))
  before = snapshot(workdir)
  sample = {"sample.num_images": 3, "sample.batch_size": 2}
  res = run(cli(f"--workdir={workdir}", "--mode=sample",
                f"--config.sample.out_dir={tmp_path / 'cli'}", overrides=sample, config=False),
            timeout=300)
  assert res.returncode == 0, res.stderr[-3000:]
  out = notices(res.stderr)
  assert len(out) == 1, res.stderr
  assert "checkpoint step 24" in out[0] and "is damaged" in out[0] and "using step 20" in out[0]
  assert "Restoring checkpoint of step 20" in res.stderr
  assert snapshot(workdir) == before                                # nothing renamed or written
  config = make_config({**sample, "sample.out_dir": str(tmp_path / "lib")})
  settings = sample_mode.sample_from_workdir(config, workdir)       # the original config
  assert settings["step"] == 20 and settings["label"] == "cycle (sample.label=auto)"
  a, b = np.load(tmp_path / "cli" / "samples.npz"), np.load(tmp_path / "lib" / "samples.npz")
  assert a["samples"].shape == (3, 16, 16, 1)
  np.testing.assert_array_equal(a["samples"], b["samples"])
  np.testing.assert_array_equal(a["samples_uint8"], image_io.to_uint8(b["samples"]))
  np.testing.assert_array_equal(a["labels"], [0, 1, 2])
  png = np.asarray(Image.open(tmp_path / "cli" / "sample_002.png"))
  np.testing.assert_array_equal(png, a["samples_uint8"][2, ..., 0])


@contextlib.contextmanager
def read_only_copy(src, path):
  """A read-only copy of `src` at `path`: a tmpfs remounted read-only (root), else chmod."""
  os.makedirs(path)
  mounted = subprocess.run(["mount", "-t", "tmpfs", "tmpfs", path],
                           capture_output=True).returncode == 0
  try:
    shutil.copytree(src, os.path.join(path, "w"))
    if mounted:
      subprocess.run(["mount", "-o", "remount,ro", path], check=True)
    else:
      if os.geteuid() == 0:
        pytest.skip("cannot mount a tmpfs here, and root ignores a read-only directory")
      subprocess.run(["chmod", "-R", "a-w", os.path.join(path, "w")], check=True)
    yield os.path.join(path, "w")
  finally:
    if mounted:
      subprocess.run(["umount", path], check=True)


@pytest.mark.slow
def test_bad_input_table_one_line_each_exit_1_nothing_changed(reference, tmp_path):
  """Issue 11's table, on the real command line: each row ends in one `error:` line."""
  ref_dir, _, _ = reference
  workdir = str(tmp_path / "w")
  shutil.copytree(ref_dir, workdir)
  text_png = tmp_path / "text.png"
  text_png.write_text("not an image\n")
  mask = np.zeros((16, 16, 1), np.uint8)
  mask[:, :8] = 255
  image_io.save_png(mask, str(tmp_path / "mask.png"))
  fresh = str(tmp_path / "fresh")
  sample = [f"--workdir={workdir}", "--mode=sample", "--config.sample.num_images=2"]
  rows = {
      "config typo": (cli(f"--workdir={fresh}", "--config.train.num_step=5"),
                      ['--config.train.num_step: the config has no key', 'Did you mean "num_steps"']),
      "text file as image": (cli(*sample, "--config.sample.task=inpaint",
                                 f"--config.sample.image={text_png}",
                                 f"--config.sample.mask={tmp_path / 'mask.png'}", config=False),
                             [f"image file '{text_png}' is not an image file"]),
      "text file as mask": (cli(*sample, "--config.sample.task=inpaint",
                                f"--config.sample.image={tmp_path / 'mask.png'}",
                                f"--config.sample.mask={text_png}", config=False),
                            [f"mask file '{text_png}' is not an image file"]),
      "num_images=0": (cli(f"--workdir={workdir}", "--mode=sample",
                           "--config.sample.num_images=0", config=False),
                       ["sample.num_images=0; expected a positive integer"]),
      "negative learning rate": (cli(f"--workdir={fresh}", "--config.optim.learning_rate=-0.001"),
                                 ["optim.learning_rate=-0.001; expected a number > 0"]),
      "larger num_steps on resume": (
          cli(f"--workdir={workdir}", "--config.train.num_steps=48"),
          ["resuming step 24 with changed training settings (train.num_steps: 24 -> 48)",
           "--config.train.allow_schedule_change=True"]),
      "no config for training": ([sys.executable, "-m", "asyncpatch_jax.main",
                                  f"--workdir={fresh}"], ["--config is required for training"]),
  }
  before = snapshot(workdir)
  procs = {name: subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
           for name, (cmd, _) in rows.items()}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    out = notices(err)
    assert proc.returncode == 1, (name, err[-3000:])
    assert len(out) == 1 and out[0].startswith("error: "), (name, err[-3000:])
    for part in rows[name][1]:
      assert part in out[0], (name, out[0])
  assert snapshot(workdir) == before and not os.path.exists(fresh)
  # A read-only workdir in sample mode: refused before anything is sampled.
  with read_only_copy(ref_dir, str(tmp_path / "ro")) as ro:
    res = run(cli(f"--workdir={ro}", "--mode=sample", "--config.sample.num_images=2",
                  config=False), timeout=300)
    assert res.returncode == 1, res.stderr[-3000:]
    out = notices(res.stderr)
    assert len(out) == 1 and out[0].startswith(f"error: sample.out_dir '{ro}/samples/generate'")
    assert "is not writable" in out[0]
    assert snapshot(ro) == snapshot(ref_dir)


def test_accepted_schedule_change_keeps_the_original_config(reference, tmp_path):
  ref_dir, _, _ = reference
  workdir = str(tmp_path / "w")
  shutil.copytree(ref_dir, workdir)
  original = open(os.path.join(workdir, "config.json")).read()
  # The saved config.json is a config (--config=DIR/config.json): the run's own, key by key.
  saved = base_config.load_config_file(os.path.join(workdir, "config.json"))
  assert compat.config_differences(saved.to_dict(), make_config().to_dict()) == []
  assert isinstance(saved.model.channel_mult, tuple)
  config = make_config({"train.num_steps": 48, "optim.learning_rate": 2e-3,
                        "train.allow_schedule_change": True})
  ckpt = checkpointing.Checkpointer(workdir, config, (16, 16, 1), every=4, keep=2)
  try:
    ckpt.check_compatible()
    ckpt.write_config_json()
  finally:
    ckpt.close()
  assert open(os.path.join(workdir, "config.json")).read() == original
  new = json.load(open(os.path.join(workdir, "config.step_24.json")))
  assert (new["train"]["num_steps"], new["optim"]["learning_rate"]) == (48, 2e-3)
  # Settings that do not change the computation (logging, checkpoints, sampling) pass.
  quiet = make_config({"train.log_every": 3, "sample.num_steps": 9})
  ckpt = checkpointing.Checkpointer(workdir, quiet, (16, 16, 1), every=4, keep=2)
  try:
    ckpt.check_compatible()
  finally:
    ckpt.close()


@pytest.mark.parametrize("key,value,expected", [
    ("learning_rate", 0.0, "> 0"), ("b1", 1.0, "in [0, 1)"), ("b2", -0.1, "in [0, 1)"),
    ("eps", 0.0, "> 0"), ("grad_clip", -1.0, "> 0"), ("weight_decay", -1e-4, ">= 0"),
    ("end_lr_ratio", 1.5, "in [0, 1]"), ("warmup_steps", -1, "integer >= 0")])
def test_optimizer_settings_are_range_checked(key, value, expected):
  optim = make_config().optim
  with optim.unlocked():
    optim[key] = value
  with pytest.raises(checks.InputError, match=f"optim.{key}={value!r}; expected .*"
                     + expected.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
    train_state.make_optimizer(optim, 10)


def test_train_settings_are_range_checked_before_anything_is_built(tmp_path):
  for key, value in (("ema_decay", 1.0), ("label_dropout", 1.2)):
    with pytest.raises(checks.InputError, match=f"train.{key}={value}; expected a number in"):
      train_mode.train_and_evaluate(make_config({f"train.{key}": value}), str(tmp_path / "w"))
  assert not os.path.exists(tmp_path / "w")


def test_sixteen_bit_grayscale_png_is_scaled_to_eight_bits(tmp_path):
  """v * 257 (16 bit) must load as the 8-bit value v; 65535 -> 255 exactly."""
  values = np.arange(256, dtype=np.uint16).reshape(16, 16)
  Image.fromarray(values * 257).save(tmp_path / "g16.png")
  assert Image.open(tmp_path / "g16.png").mode == "I;16"
  x = image_io.load_image(str(tmp_path / "g16.png"), (16, 16, 1))
  np.testing.assert_array_equal(image_io.to_uint8(x)[..., 0], values.astype(np.uint8))
  mask = np.zeros((16, 16), np.uint16)
  mask[:, :8] = 65535
  Image.fromarray(mask).save(tmp_path / "m16.png")
  np.testing.assert_array_equal(image_io.load_mask(str(tmp_path / "m16.png"), (16, 16)),
                                (mask > 0).astype(np.float32))


@pytest.mark.parametrize("task,image,label,expected", [
    ("generate", "", "auto", "cycle"), ("autoregressive", "", "auto", "cycle"),
    ("ipr", "", "auto", "cycle"), ("inpaint", "x.png", "auto", "null"),
    ("outpaint", "x.png", "auto", "null"), ("progressive", "x.png", "auto", "null"),
    ("interleaved", "x.png", "auto", "null"), ("ipr", "x.png", "auto", "null"),
    ("inpaint", "x.png", "3", "3"), ("generate", "", "null", "null")])
def test_tasks_that_start_from_an_image_default_to_the_unconditional_label(task, image, label,
                                                                           expected):
  sc = make_config({"sample.task": task, "sample.image": image, "sample.label": label}).sample
  assert sample_mode.label_spec(sc) == expected
  labels = sample_mode._labels(sample_mode.label_spec(sc), 12, 10)  # pylint: disable=protected-access
  reference = {"cycle": np.arange(12) % 10, "null": None, "3": np.full(12, 3)}[expected]
  if reference is None:
    assert labels is None
  else:
    np.testing.assert_array_equal(labels, reference)


def test_second_ctrl_c_exits_at_once():
  """The first SIGINT asks the loop to save and stop; a second one exits with 130 at once."""
  script = """
import os, signal, time
from asyncpatch_jax.training import loop
with loop._Preemption() as preemption:
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(0.2)
  print("requested", preemption.requested, loop.interrupt_exit_code(), flush=True)
  os.kill(os.getpid(), signal.SIGINT)
  time.sleep(5)
print("not reached")
"""
  res = run([sys.executable, "-c", script], timeout=120)
  assert res.returncode == 130, res.stderr[-2000:]
  assert res.stdout.split() == ["requested", "True", "130"]
  assert "Interrupted again: exiting now without saving." in res.stderr


# ------------------------------------------------------------------ --mode=evaluate (issue 12)

# 160 samples (more than the 128 feature dimensions: full-rank covariances) in batches of
# 80, 12 held-out digits per family; a 20-step digit classifier.
EVALUATE = {"evaluate.num_samples": 160, "evaluate.batch_size": 80, "evaluate.num_inpaint": 12,
            "evaluate.feature_steps": 20}
FAMILIES = ("thin", "square")


def _frechet_sqrtm(a, b):
  """pytorch-fid's formula in float64 (scipy sqrtm of the non-symmetric product)."""
  import warnings  # pylint: disable=g-import-not-at-top
  import scipy.linalg  # pylint: disable=g-import-not-at-top
  c1, c2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  with warnings.catch_warnings():             # dead (always 0) ReLU features: singular
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(c1 @ c2).real
  return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(c1) + np.trace(c2)
               - 2 * np.trace(covmean))


def _prdc_numpy(real, fake, k):
  """Naeem et al. 2020, Eq. 1-4 with strict inequalities, float64 distance matrices."""
  d = lambda a, b: np.sqrt(np.maximum(((a[:, None] - b[None]) ** 2).sum(-1), 0.0))
  r_real, r_fake = np.sort(d(real, real), 1)[:, k], np.sort(d(fake, fake), 1)[:, k]
  rf = d(real, fake)
  inside = rf < r_real[:, None]                             # [real, fake]: fake in real ball
  return {"precision": inside.any(0).mean(), "recall": (rf < r_fake[None, :]).any(1).mean(),
          "density": inside.sum(0).mean() / k, "coverage": inside.any(1).mean()}


@pytest.mark.slow
def test_evaluate_mode_on_a_trained_workdir_matches_an_independent_recomputation(reference,
                                                                                 tmp_path):
  """The command line (8 devices: sampler, features and PRDC on a mesh) against the
  documented protocol recomputed here (the sampler on the same mesh, so its compilations
  come from the shared cache; one device vs a mesh is tests/test_workdir_eval.py's and
  tests/test_metrics.py's): samples with labels cycling,
  key fold_in(key(seed), 2) + batch start; the digit classifier from fold_in(key, 1); the
  first 160 train digits as reference; for family j the first 12 test digits, masks
  make_masks(family, 12, 16, 16, seed), key fold_in(key, 10 + j); then float64 NumPy:
  scipy's sqrtm Frechet distance, the PRDC definitions, PSNR."""
  from asyncpatch_jax.generation import generate  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.data import datasets, masks  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.diffusion import schedules  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.evaluation import digit_classifier  # pylint: disable=g-import-not-at-top
  from asyncpatch_jax.evaluation import metrics  # pylint: disable=g-import-not-at-top
  ref_dir, _, _ = reference
  workdir = str(tmp_path / "w")
  shutil.copytree(ref_dir, workdir)
  before = snapshot(workdir)
  res = run(cli(f"--workdir={workdir}", "--mode=evaluate",
                f"--config.evaluate.mask_families={FAMILIES!r}", overrides=EVALUATE,
                config=False), timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  after = snapshot(workdir)
  assert {f: after[f] for f in before} == before                # nothing else touched
  assert set(after) - set(before) == {"evaluate.json", "evaluate.png"}
  result = json.load(open(os.path.join(workdir, "evaluate.json")))
  summary = json.loads(res.stdout)
  assert summary["evaluate_json"] == os.path.join(workdir, "evaluate.json")
  assert result["step"] == 24 and result["mesh"] == {"data": 8} and result["devices"] == 8
  gen_result, inp = result["generation"], result["inpainting"]
  assert summary["generation"]["fd_digits"] == gen_result["fd_digits"]
  assert inp["method"] == "asyncpatch" and inp["network_evals"] == 4
  digits_net = result["feature_nets"]["digits"]
  assert digits_net["chance"] == 0.1 and digits_net["training_steps"] == 20

  config = make_config()
  setup, state = train.load_trained(workdir, config)
  params = state.ema_params
  gen = generate.Generator(setup.model)                   # all 8 devices, as the command line
  key = jax.random.key(config.seed)
  cls_params, accuracy = digit_classifier.train_classifier(jax.random.fold_in(key, 1), 20)
  assert digits_net["held_out_accuracy"] == accuracy
  feats = lambda x: np.asarray(digit_classifier.features(cls_params, np.asarray(x, np.float32)),
                               np.float64)
  tau = schedules.synchronous(config.sample.num_steps, 16, 16)
  samples = np.concatenate([np.asarray(gen(
      params, tau, key=jax.random.fold_in(jax.random.fold_in(key, 2), i), shape=(80, 16, 16, 1),
      labels=np.arange(i, i + 80) % 10, eta=config.sample.eta)) for i in (0, 80)])
  train_src = datasets.get_dataset("digits", "train")
  real = np.stack([train_src[i]["image"] for i in range(160)])
  f_real, f_fake = feats(real), feats(samples)
  # float32 features against float64 references: the Frechet distance of 160 x 128-d
  # features to 1e-4 relative, PRDC exactly (shares of 160).
  assert gen_result["fd_digits"] == pytest.approx(_frechet_sqrtm(f_real, f_fake), rel=1e-4)
  for name, value in _prdc_numpy(f_real, f_fake, 5).items():
    assert gen_result[f"{name}_digits"] == pytest.approx(value, abs=1e-9), name

  test_src = datasets.get_dataset("digits", "test")
  originals = np.stack([test_src[i]["image"] for i in range(12)])
  for j, family in enumerate(FAMILIES):
    m = masks.make_masks(family, 12, 16, 16, seed=config.seed)
    # The batch: 12 images rounded up to the 8 devices (16), padded with the last image.
    pad = lambda a: np.concatenate([a, np.repeat(a[-1:], 4, axis=0)])
    out = np.asarray(gen(params, schedules.inpainting(pad(m), config.sample.num_steps),
                         key=jax.random.fold_in(jax.random.fold_in(key, 10 + j), 0),
                         x=pad(originals), eta=config.sample.eta))[:12]
    np.testing.assert_array_equal(out[m > 0], originals[m > 0])   # known pixels exact
    mse = (((out.astype(np.float64) - originals) / 2.0) ** 2).mean(axis=(1, 2, 3))
    q = inp["families"][family]
    assert q["psnr"] == pytest.approx(np.mean(10 * np.log10(1.0 / mse)), rel=1e-4), family
    assert q["hole_fraction"] == pytest.approx(1.0 - m.mean(), abs=1e-6)
    # 12 samples of 128-d features (rank-deficient): the library's stable formula, which
    # tests/test_metrics.py checks against sqrtm, on the features recomputed here.
    with pytest.warns(RuntimeWarning, match="rank deficient"):
      fd = metrics.frechet_distance(*metrics.feature_statistics(feats(originals)),
                                    *metrics.feature_statistics(feats(out)))
    assert q["fd_digits"] == pytest.approx(fd, rel=1e-4), family


def test_evaluate_mode_bad_input_stops_before_restoring_and_changes_nothing(reference, tmp_path,
                                                                           monkeypatch):
  from asyncpatch_jax.modes import evaluate_mode  # pylint: disable=g-import-not-at-top
  ref_dir, _, _ = reference
  workdir = str(tmp_path / "w")
  shutil.copytree(ref_dir, workdir)
  no_checkpoint = str(tmp_path / "no_checkpoint")
  os.makedirs(no_checkpoint)
  shutil.copy(os.path.join(ref_dir, "config.json"), no_checkpoint)
  np.savez(tmp_path / "lpips_like.npz", **{"lin0.model.1.weight": np.zeros((1, 64, 1, 1))})
  before = snapshot(workdir)

  def restored(*args, **kwargs):
    raise AssertionError("the checkpoint was restored before the bad setting was refused")

  monkeypatch.setattr(loader, "load_run", restored)
  config = lambda **kw: make_config({f"evaluate.{k}": v for k, v in kw.items()})
  rows = [
      (config(mask_families=("thin", "thinn")),
       r"Unknown evaluate.mask_families entry 'thinn'; expected one of 'thin', .* Did you mean"),
      (config(num_samples=1), r"evaluate.num_samples=1; the Frechet distance .* at least 2"),
      (config(num_samples=5), r"evaluate.k=5 nearest neighbours need more than k samples"),
      (config(inception_weights=str(tmp_path / "lpips_like.npz")),
       r"FID Inception-v3 weights: tensor 'Conv2d_1a_3x3.bn.running_mean' \(32,\) is missing "
       r"from the file \(it holds 1 tensors\)"),
      (config(lpips_weights=str(tmp_path / "nope.npz")),
       r"weights file .*nope.npz' does not exist"),
      (config(inpaint_method="repaint", repaint=(250, 7, 10)),
       "jump_length=7 must divide num_steps=250"),
  ]
  for cfg, message in rows:
    with pytest.raises(checks.InputError, match=message):
      evaluate_mode.evaluate_workdir(cfg, workdir)
  with pytest.raises(checks.InputError, match="has no checkpoints; train first"):
    evaluate_mode.evaluate_workdir(config(), no_checkpoint)
  assert snapshot(workdir) == before
  assert os.listdir(no_checkpoint) == ["config.json"]
  # On the command line: one line, exit 1 (no config.json; config.json but no checkpoint).
  empty = str(tmp_path / "empty")
  os.makedirs(empty)
  for wd, part in ((empty, f"--mode=evaluate without --config reads the workdir's config.json, "
                           f"but {empty}/config.json does not exist"),
                   (no_checkpoint, f"workdir '{no_checkpoint}' has no checkpoints; train first")):
    res = run(cli(f"--workdir={wd}", "--mode=evaluate", config=False), timeout=300)
    out = notices(res.stderr)
    assert res.returncode == 1 and len(out) == 1 and out[0].startswith("error: "), res.stderr
    assert part in out[0], out[0]
  assert os.listdir(empty) == [] and os.listdir(no_checkpoint) == ["config.json"]
