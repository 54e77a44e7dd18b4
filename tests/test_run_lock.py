"""One workdir, one writer (runs/run_lock.py) and one meaning of a workdir path (runtime/storage.py).

References: the lock's documented rules, checked on the files themselves (a second
training stops naming the owner and leaves the first run's files as they are; a lock of a
dead process or with an old heartbeat is taken over; on gs:// the create-if-absent is the
storage's own `ifGenerationMatch=0`, which the emulator enforces with HTTP 412), and the
operating system's reading of a path (`os.path.realpath` of the shell-expanded text) for
the workdir rule, checked through the real command line in subprocesses.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from asyncpatch_jax.runs import loader
from asyncpatch_jax.modes import train_mode
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.modes import sample_mode
from asyncpatch_jax.runtime import storage
from asyncpatch_jax.runs import run_lock
from fixtures import configs
from fixtures import gcs_emulator
from fixtures import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = os.path.join(ROOT, "configs", "test.py")
SMALL = ["--config.sample.num_images=4", "--config.evaluate.classifier_samples=8",
         "--config.evaluate.classifier_steps=5"]


def start(args, env=None, **kw):
  return cli.start(*args, env=env, **kw)


def write_lock(path, **owner):
  now = time.time()
  owner = {"host": socket.gethostname(), "pid": os.getpid(), "started": now, "heartbeat": now,
           "token": "t" * 32, **owner}
  path.write_text(json.dumps(owner))
  return owner


# --- the lock's rules, on a local folder -------------------------------------------------

def test_a_held_lock_refuses_a_second_run_and_is_removed_on_release(tmp_path):
  lock = run_lock.RunLock.acquire(tmp_path, 60)
  owner = json.loads((tmp_path / "run.lock").read_text())
  assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
  with pytest.raises(checks.InputError, match=rf"in use by another training run \(host "
                     rf"{socket.gethostname()}, pid {os.getpid()}, started at .*last heartbeat"):
    run_lock.RunLock.acquire(tmp_path, 60)
  # The read-only check the trainers make before compiling says the same.
  with pytest.raises(checks.InputError, match=f"in use by another training run .*pid {os.getpid()}"):
    run_lock.check_free(tmp_path, 60)
  lock.release()
  assert not (tmp_path / "run.lock").exists()
  run_lock.check_free(tmp_path, 60)


def test_the_heartbeat_refreshes_the_lock(tmp_path):
  lock = run_lock.RunLock.acquire(tmp_path, 0.4)          # a beat every 0.1 s
  first = json.loads((tmp_path / "run.lock").read_text())["heartbeat"]
  time.sleep(0.5)
  later = json.loads((tmp_path / "run.lock").read_text())["heartbeat"]
  lock.release()
  assert later - first >= 0.2


def test_a_dead_process_of_this_host_is_taken_over_at_once(tmp_path):
  # A process that takes the lock and is SIGKILLed while it holds it.
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from asyncpatch_jax.runs import run_lock; "
       f"run_lock.RunLock.acquire({str(tmp_path)!r}, 3600); print('held', flush=True); "
       "time.sleep(600)"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
      stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "held"
  with pytest.raises(checks.InputError, match=f"pid {holder.pid}"):
    run_lock.RunLock.acquire(tmp_path, 3600)               # alive: refused
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  lock = run_lock.RunLock.acquire(tmp_path, 3600)          # dead: no waiting for the timeout
  assert json.loads((tmp_path / "run.lock").read_text())["pid"] == os.getpid()
  lock.release()


def test_another_hosts_lock_is_taken_over_once_its_heartbeat_is_older_than_the_timeout(tmp_path):
  now = time.time()
  write_lock(tmp_path / "run.lock", host="another-host", pid=1, heartbeat=now - 20)
  with pytest.raises(checks.InputError, match="host another-host, pid 1.*heartbeat 2[0-9] s ago"):
    run_lock.RunLock.acquire(tmp_path, 60)
  lock = run_lock.RunLock.acquire(tmp_path, 10)
  assert json.loads((tmp_path / "run.lock").read_text())["host"] == socket.gethostname()
  lock.release()
  assert run_lock.stale_reason({"host": "h", "pid": 1, "heartbeat": now - 11}, 10, now=now,
                               host="other") == "its heartbeat is 11 s old (train.lock_timeout=10 s)"
  assert run_lock.stale_reason({"host": "h", "pid": 1, "heartbeat": now - 9}, 10, now=now,
                               host="other") is None


def test_a_lost_lock_stops_the_run_at_its_next_poll(tmp_path):
  lock = run_lock.RunLock.acquire(tmp_path, 0.4)
  write_lock(tmp_path / "run.lock", host="another-host", pid=1)     # taken over meanwhile
  time.sleep(0.3)
  with pytest.raises(checks.InputError, match="another run took over workdir .*host another-host"):
    lock.poll()
  lock.release()                                # not ours any more: left in place
  assert json.loads((tmp_path / "run.lock").read_text())["host"] == "another-host"


def test_the_gs_lock_is_a_conditional_create(gcs):
  url = f"gs://{gcs_emulator.BUCKET}/locked"
  lock = run_lock.RunLock.acquire(url, 60)
  assert gcs.names("locked/") == ["locked/run.lock"]
  with pytest.raises(checks.InputError, match="in use by another training run"):
    run_lock.RunLock.acquire(url, 60)
  # The emulator refuses a create-if-absent of an existing object with HTTP 412, so the
  # refusal above came from the storage, not from a read before the write.
  with pytest.raises(Exception, match="412"):
    gcs.upload("locked/run.lock", b"{}", if_generation_match=0)
  lock.release()
  assert gcs.names("locked/") == []
  # Another host's stale lock: taken over by a compare-and-swap on its generation.
  gcs.upload("locked/run.lock", json.dumps({"host": "another-host", "pid": 1, "started": 0,
                                            "heartbeat": time.time() - 30,
                                            "token": "x"}).encode())
  lock = run_lock.RunLock.acquire(url, 10)
  assert json.loads(gcs.read("locked/run.lock"))["pid"] == os.getpid()
  lock.release()


def test_a_gs_lock_without_google_cloud_storage_says_what_to_install(monkeypatch):
  # (This gcsfs imports google-cloud-storage itself; another gcsfs version may not.)
  import google.cloud  # pylint: disable=g-import-not-at-top
  monkeypatch.delattr(google.cloud, "storage", raising=False)
  monkeypatch.setitem(sys.modules, "google.cloud.storage", None)
  with pytest.raises(checks.InputError, match=r"needs google-cloud-storage; install the GCS "
                     r"extra: pip install -e '\.\[tpu\]'"):
    run_lock._GcsObject("gs://some-bucket/run/run.lock")  # pylint: disable=protected-access


# --- through the command line ---------------------------------------------------------------

@pytest.mark.slow
def test_two_trainings_started_together_one_runs_one_stops_naming_the_owner(tmp_path):
  workdir = tmp_path / "run"
  first = start([f"--config={TEST_CONFIG}", f"--workdir={workdir}", *SMALL])
  # Started together: the second as soon as the first has taken the lock.
  deadline = time.time() + 120
  while not (workdir / "run.lock").exists():
    assert first.poll() is None and time.time() < deadline, first.communicate()[1][-2000:]
    time.sleep(0.01)
  second = start([f"--config={TEST_CONFIG}", f"--workdir={workdir}", "--config.seed=7",
                "--config.train.num_steps=48", *SMALL])
  _, err2 = second.communicate(timeout=300)
  still_running = first.poll() is None
  _, err1 = first.communicate(timeout=600)
  assert first.returncode == 0, err1[-2000:]
  assert second.returncode == 1 and still_running
  last = err2.strip().splitlines()[-1]
  assert last.startswith("error: workdir ") and f"pid {first.pid}" in last, err2[-2000:]
  assert "Traceback" not in err2
  saved = json.loads((workdir / "config.json").read_text())
  assert saved["seed"] == 0 and saved["train"]["num_steps"] == 24   # the first run's
  assert json.loads((workdir / "eval.json").read_text())["step"] == 24
  assert not (workdir / "run.lock").exists()                         # released at the end


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("trained") / "run"
  train_mode.train_and_evaluate(configs.with_overrides({"sample.num_images": 0, "evaluate.classifier_samples": 0}),
                           str(workdir))
  return workdir


@pytest.mark.slow
def test_sampling_beside_a_live_training(trained, tmp_path):
  """A trained workdir whose lock is held (a run in progress): sampling it works; training
  in it is refused."""
  workdir = trained
  lock = run_lock.RunLock.acquire(workdir, 3600)
  try:
    out = tmp_path / "samples"
    settings = sample_mode.sample_from_workdir(
        configs.with_overrides({"sample.task": "generate", "sample.num_images": 4, "sample.out_dir": str(out)}),
        str(workdir))
    assert settings["step"] == 24 and (out / "samples.npz").exists()
    with pytest.raises(checks.InputError, match=f"pid {os.getpid()}"):
      train_mode.train_and_evaluate(configs.with_overrides({}), str(workdir))
  finally:
    lock.release()


# --- one meaning of a workdir ---------------------------------------------------------------

def test_the_workdir_rule_is_the_operating_systems(tmp_path, monkeypatch):
  real = tmp_path / "real"
  (real / "sub").mkdir(parents=True)
  (tmp_path / "home").mkdir()
  os.symlink(real / "sub", tmp_path / "home" / "link")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.chdir(tmp_path / "home")
  # link/.. is the parent of the link's target (as `cd -P`, open() and the shell read it).
  assert os.fspath(storage.path("~/link/../w")) == os.path.realpath(
      os.path.expanduser("~/link/../w")) == str(real / "w")
  assert os.fspath(storage.path("link/../w")) == str(real / "w")
  assert os.fspath(storage.path("gs://b/x/../y")) == "gs://b/x/../y"     # URLs as they are


@pytest.mark.slow
def test_train_sample_and_evaluate_with_the_same_tilde_symlink_dotdot_flag(tmp_path):
  real = tmp_path / "real"
  (real / "sub").mkdir(parents=True)
  home = tmp_path / "home"
  home.mkdir()
  os.symlink(real / "sub", home / "link")
  flag = "--workdir=~/link/../w"             # bash leaves ~ after = as it is
  env = {"HOME": str(home)}
  proc = start([f"--config={TEST_CONFIG}", flag, *SMALL], env)
  _, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-2000:]
  assert (real / "w" / "eval.json").exists() and not (home / "w").exists()
  for mode, written in (("sample", real / "w" / "samples" / "generate" / "settings.json"),
                        ("evaluate", real / "w" / "evaluate.json")):
    extra = (["--config.sample.num_images=4"] if mode == "sample" else
             ["--config.evaluate.num_samples=16", "--config.evaluate.batch_size=16",
              "--config.evaluate.num_inpaint=8", "--config.evaluate.feature_steps=5",
              "--config.evaluate.mask_families=('square',)"])
    proc = start([f"--mode={mode}", flag, *extra], env)   # no --config: the workdir's own
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, (mode, err[-2000:])
    assert written.exists(), mode
    # With the progress bars off (configs/test.py), each phase still says what it does.
    assert "compiling the sampler for these shapes" in err, err[-2000:]
    if mode == "evaluate":
      for phase in ("training the in-project digits feature network", "generating 16 samples",
                    "inpainting 8 test images, mask family 'square'"):
        assert f"evaluate: {phase}" in err, (phase, err[-2000:])


@pytest.mark.slow
def test_a_workdir_read_elsewhere_names_both_places(trained, tmp_path, caplog):
  """Checkpoints record where they were written; a copy names the original."""
  copy = tmp_path / "copy"
  shutil.copytree(trained, copy)
  with caplog.at_level("INFO"):
    assert loader.saved_image_shape(str(copy)) == (16, 16, 1)
  assert f"workdir {copy} was written as {trained}" in caplog.text
  caplog.clear()
  with caplog.at_level("INFO"):
    loader.saved_image_shape(str(trained))
  assert "was written as" not in caplog.text
