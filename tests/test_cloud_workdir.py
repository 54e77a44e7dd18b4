"""gs:// workdirs end to end, offline: a GCS emulator on localhost, the real command line.

The emulator (tests/fixtures/gcs_emulator.py, the `gcs` fixture of conftest.py) is reached
as a user reaches one, through STORAGE_EMULATOR_HOST alone. The bucket is read back here
over the emulator's JSON API with urllib, not through the code under test. The reference
run is the same config trained in a local folder, uninterrupted, in this process.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from asyncpatch_jax.modes import train_mode
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.modes import sample_mode
from asyncpatch_jax.runtime import storage
from asyncpatch_jax.runs import checkpointing
from asyncpatch_jax.training import train
from fixtures import configs
from fixtures import gcs_emulator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = os.path.join(ROOT, "configs", "test.py")
BUCKET, READ_ONLY = gcs_emulator.BUCKET, gcs_emulator.READ_ONLY
# Host-side settings of configs/test.py (the train step is the one tests/test_train.py
# compiles), small final grids and evaluation, and a sample task.
RUN = {"train.log_every": 1, "train.checkpoint_every": 4, "sample.num_images": 4,
       "evaluate.classifier_samples": 8, "evaluate.classifier_steps": 5}
SAMPLE = {"sample.task": "generate", "sample.num_images": 4}
NOT_PERF = ("steps_per_s", "images_per_s")   # wall-clock rates differ between runs

# Runs the command line with something taken away: `data` (the training data: the
# dataset registry raises, and scikit-learn, which ships the embedded digits, cannot
# be imported) or `gcsfs` (not installed).
WITHOUT = r'''
import runpy, sys
what = sys.argv.pop(1)
if what == "data":
  sys.modules["sklearn"] = None
  from asyncpatch_jax.data import datasets
  def absent(*args, **kwargs):
    raise RuntimeError("get_dataset was called, but this machine has no training data")
  datasets.get_dataset = absent
else:
  sys.modules["gcsfs"] = None
sys.argv[0] = "asyncpatch_jax.main"
runpy.run_module("asyncpatch_jax.main", run_name="__main__", alter_sys=True)
'''


def cli(args, env, cwd, without=None, **kw):
  prefix = [os.path.join(cwd, "without.py"), without] if without else ["-m", "asyncpatch_jax.main"]
  return subprocess.Popen([sys.executable, *prefix, f"--config={TEST_CONFIG}", *args], cwd=cwd,
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          **kw)


def flags(overrides):
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def load_state(workdir, config):
  setup = train.Setup(config, image_shape=(16, 16, 1))
  ckpt = checkpointing.Checkpointer(workdir, config, setup.image_shape, every=1, keep=None)
  try:
    return ckpt.restore(setup.abstract_state)
  finally:
    ckpt.close()


def png(data) -> np.ndarray:
  import io  # pylint: disable=g-import-not-at-top
  return np.asarray(Image.open(io.BytesIO(data)))


def tfrecords(data: bytes):
  """The records of a TFRecord file (TensorBoard event files): length, crc, data, crc."""
  out, i = [], 0
  while i < len(data):
    (n,) = struct.unpack("<Q", data[i:i + 8])
    out.append(data[i + 12:i + 12 + n])
    i += 12 + n + 4
  return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The same run, local and uninterrupted, in this process (8 host devices, like the CLI)."""
  workdir = tmp_path_factory.mktemp("reference")
  train_mode.train_and_evaluate(configs.with_overrides(RUN), str(workdir))
  return workdir


@pytest.mark.slow
def test_gs_workdir_killed_resumed_and_sampled_without_data(gcs, reference, tmp_path):
  cwd = tmp_path / "cwd"
  cwd.mkdir()
  (cwd / "without.py").write_text(WITHOUT)
  url = f"gs://{BUCKET}/run"
  args = [f"--workdir={url}", *flags(RUN)]

  # 1. Train, SIGKILL as soon as the first checkpoint is committed, train again.
  proc = cli(args, gcs.env, cwd)
  deadline = time.time() + 300
  while not gcs.committed_steps("run"):
    assert proc.poll() is None, "the run ended before its first checkpoint:\n" + proc.stderr.read()[-3000:]
    assert time.time() < deadline, "no checkpoint in the bucket after 300 s"
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  resumed_from = max(gcs.committed_steps("run"))
  assert 4 <= resumed_from < 24
  proc = cli(args, gcs.env, cwd)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  assert f"Restoring checkpoint of step {resumed_from} from {url}" in err

  # 2. Bitwise the uninterrupted local run: parameters, EMA, optimizer state.
  config = configs.with_overrides(RUN)
  a, b = load_state(str(reference), config), load_state(url, config)
  assert int(a.step) == int(b.step) == 24
  for name in ("params", "ema_params", "opt_state"):
    for x, y in zip(jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)

  # 3. Its files are in the bucket, equal to the local run's.
  assert json.loads(gcs.read("run/config.json")) == json.load(open(reference / "config.json"))
  assert json.loads(gcs.read("run/eval.json")) == json.load(open(reference / "eval.json"))
  got = [json.loads(l) for l in gcs.read("run/metrics.jsonl").decode().splitlines()]
  want = [json.loads(l) for l in open(reference / "metrics.jsonl")]
  assert [r["step"] for r in got] == list(range(1, 25))   # each step once, despite the kill
  for g, w in zip(got, want):
    assert {k: v for k, v in g.items() if k not in NOT_PERF} == \
           {k: v for k, v in w.items() if k not in NOT_PERF}
  grids = sorted(os.listdir(reference / "samples" / "final"))
  assert grids == ["autoregressive.png", "inpainting.png", "samples.png",
                   "samples_conditional.png"]
  for name in grids:
    np.testing.assert_array_equal(png(gcs.read(f"run/samples/final/{name}")),
                                  np.asarray(Image.open(reference / "samples" / "final" / name)))
  # TensorBoard: the resumed run's event file starts with a purge at the step after
  # its checkpoint (TensorBoard drops the killed run's later points), then every loss.
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  events = sorted(n for n in gcs.names("run/tensorboard/") if "tfevents" in n)
  assert len(events) == 2
  resumed = [event_pb2.Event.FromString(r) for r in tfrecords(gcs.read(events[-1]))]
  starts = [e.step for e in resumed if e.HasField("session_log")]
  assert starts == [resumed_from + 1]
  losses = {e.step: v.simple_value for e in resumed for v in e.summary.value if v.tag == "loss"}
  assert losses == {r["step"]: np.float32(r["loss"]) for r in want if r["step"] > resumed_from}

  # 4. --mode=sample where the training data is absent: PNGs and settings in the bucket,
  # equal to sampling the local run's workdir here.
  proc = cli(["--mode=sample", f"--workdir={url}", *flags(SAMPLE)], gcs.env, cwd,
             without="data")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  local = tmp_path / "local_samples"
  sample_mode.sample_from_workdir(configs.with_overrides({**SAMPLE, "sample.out_dir": str(local)}),
                                  str(reference))
  settings = json.loads(gcs.read("run/samples/generate/settings.json"))
  assert settings["step"] == 24 and settings["out_dir"] == f"{url}/samples/generate"
  written = gcs.names("run/samples/generate/")
  # gs:// has no folder rename: manifest.json, written last, lists the call's files.
  manifest = json.loads(gcs.read("run/samples/generate/manifest.json"))["files"]
  assert manifest == sorted(os.listdir(local))
  assert [n.split("/")[-1] for n in written] == sorted(manifest + ["manifest.json"])
  written = [n for n in written if not n.endswith("manifest.json")]
  for name in written:
    if name.endswith(".png"):
      np.testing.assert_array_equal(png(gcs.read(name)),
                                    np.asarray(Image.open(local / name.split("/")[-1])))
  # The same wrapper does take the data away: training through it fails.
  proc = cli([f"--workdir=gs://{BUCKET}/other"], gcs.env, cwd, without="data")
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 1 and "this machine has no training data" in err

  # 5. Nothing went to a local folder named after the URL.
  for top in (cwd, ROOT):
    for dirpath, dirnames, filenames in os.walk(top):
      assert not [n for n in dirnames + filenames if n.startswith("gs:")], dirpath
      dirnames[:] = [d for d in dirnames if d not in (".git", ".ci-venv")]


@pytest.mark.slow
def test_bad_gs_paths_stop_with_one_line_before_compiling(gcs, tmp_path):
  (tmp_path / "without.py").write_text(WITHOUT)
  env = dict(gcs.env, JAX_LOG_COMPILES="1")
  cases = {
      "no bucket": ([f"--workdir=gs://no-such-bucket-7/run"], None,
                    "bucket gs://no-such-bucket-7 does not exist"),
      "read-only": ([f"--workdir=gs://{READ_ONLY}/run"], None,
                    f"workdir 'gs://{READ_ONLY}/run' is not writable (Forbidden"),
      "no data_dir": ([f"--workdir=gs://{BUCKET}/in64", "--config.data.dataset=imagenet64",
                       f"--config.data.data_dir=gs://{BUCKET}/no-tfds"], None,
                      f"data_dir 'gs://{BUCKET}/no-tfds' for dataset 'imagenet64' does not "
                      "exist"),
      "no gcsfs": ([f"--workdir=gs://{BUCKET}/run2"], "gcsfs",
                   "needs gcsfs; install the GCS extra: pip install -e '.[tpu]'"),
      "sample, no bucket": (["--mode=sample", "--workdir=gs://no-such-bucket-7/run"], None,
                            "bucket gs://no-such-bucket-7 does not exist"),
  }
  procs = {k: cli(a, env, str(tmp_path), without=w) for k, (a, w, _) in cases.items()}
  for name, proc in procs.items():
    _, err = proc.communicate(timeout=300)
    message = cases[name][2]
    assert proc.returncode == 1, (name, err[-2000:])
    assert "Traceback" not in err and "Compiling" not in err, (name, err[-2000:])
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("error: ") and message in last, (name, last)
  assert not gcs.names("run2/") and not gcs.names("in64/")


def test_local_workdir_that_cannot_be_written(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  with pytest.raises(checks.InputError, match=r"workdir '.*a_file/run' is not writable"):
    storage.check_writable(str(blocker / "run"))
  with pytest.raises(checks.InputError, match="only local paths and gs:// URLs"):
    storage.path("s3://bucket/run")
  assert storage.path("rel/dir") == storage.path(os.path.join(os.getcwd(), "rel", "dir"))


def test_metric_writer_keeps_the_steps_up_to_the_resumed_checkpoint(tmp_path):
  from asyncpatch_jax.training import metric_writer  # pylint: disable=g-import-not-at-top
  old = [{"step": s, "loss": float(s)} for s in range(1, 11)]
  path = tmp_path / "metrics.jsonl"
  for start, kept in [(6, [1, 2, 3, 4, 5, 6]), (0, []), (None, list(range(1, 11)))]:
    # A kill mid-append (older versions) leaves a cut line, which is dropped.
    path.write_text("".join(json.dumps(r) + "\n" for r in old) + '{"step": 11, "lo')
    writer = metric_writer.MetricWriter(str(tmp_path), start)
    writer.write(99, {"loss": 0.5})
    writer.close()
    lines = [json.loads(l) for l in path.read_text().splitlines()]
    assert lines == [r for r in old if r["step"] in kept] + [{"step": 99, "loss": 0.5}], start


@pytest.mark.slow
def test_evaluate_mode_reads_a_gs_workdir_and_writes_its_json_there(gcs, reference, tmp_path):
  """The local reference run, uploaded object by object over the emulator's JSON API (not
  through the library), then `--mode=evaluate` on its gs:// URL: evaluate.json and
  evaluate.png land in the bucket, and the scores equal those of the local workdir."""
  for path in sorted(reference.rglob("*")):
    if path.is_file():
      gcs.upload(f"scored/{path.relative_to(reference)}", path.read_bytes())
  url = f"gs://{BUCKET}/scored"
  evaluate = {"evaluate.num_samples": 16, "evaluate.batch_size": 16, "evaluate.num_inpaint": 8,
              "evaluate.feature_steps": 5, "evaluate.mask_families": "('square',)"}
  runs = {}
  for name, workdir in (("gs", url), ("local", str(tmp_path / "local"))):
    if name == "local":
      shutil.copytree(reference, workdir)
    proc = cli(["--mode=evaluate", f"--workdir={workdir}", *flags(RUN), *flags(evaluate)],
               gcs.env, str(tmp_path))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    runs[name] = json.loads(out)
  assert runs["gs"]["evaluate_json"] == f"{url}/evaluate.json"
  result = json.loads(gcs.read("scored/evaluate.json"))
  assert result["workdir"] == url and result["step"] == 24
  assert "scored/evaluate.png" in gcs.names("scored/")
  local = json.load(open(tmp_path / "local" / "evaluate.json"))
  assert result["generation"] == {**local["generation"],
                                  "sampling_seconds": result["generation"]["sampling_seconds"]}
  a, b = result["inpainting"]["families"]["square"], local["inpainting"]["families"]["square"]
  assert {k: v for k, v in a.items() if "seconds" not in k} == \
         {k: v for k, v in b.items() if "seconds" not in k}
  for dirpath, dirnames, filenames in os.walk(tmp_path):
    assert not [n for n in dirnames + filenames if n.startswith("gs:")], dirpath
