"""Several processes end to end: the real command line on 2 processes x 2 host devices.

`jax.distributed` on localhost (gloo CPU collectives), the same command on every process,
configs/test.py with fsdp = 2 and its final grids and evaluation on, as a pod user runs
it. The reference for training is the same command on one process with 4 host devices
(the same 2 x 2 mesh); for sampling and evaluation, the same calls in this process. What
makes it work is runtime/multihost.py (`gather`: outputs that span processes are gathered
before the host reads them; `is_writer`: process 0 writes); removing the gather from the
sampler makes process 0 exit with jax's "non-addressable devices" error here.

Who writes what is observed, not trusted: every process runs under an audit hook
(AUDIT below, `sys.addaudithook`) that logs each file it opens for writing or renames
under the test's folder, and on gs:// the emulator logs every upload
(tests/fixtures/gcs_emulator.py). Shared outputs must be written by process 0, once.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from asyncpatch_jax.config import base_config
from asyncpatch_jax.modes import evaluate_mode
from asyncpatch_jax.modes import sample_mode
from asyncpatch_jax.runs import checkpointing
from asyncpatch_jax.training import train
from fixtures import configs
from fixtures import gcs_emulator

# One worker runs the module (pytest.ini: --dist loadgroup), so each run below happens once.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multiprocess")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = os.path.join(ROOT, "configs", "test.py")
HEAD_CONFIG = os.path.join(ROOT, "configs", "uncertainty_digits.py")
GRIDS = ["autoregressive.png", "inpainting.png", "samples.png", "samples_conditional.png"]
EVALUATE = {"evaluate.num_samples": 16, "evaluate.batch_size": 16, "evaluate.num_inpaint": 8,
            "evaluate.feature_steps": 5, "evaluate.mask_families": ("square",)}

# The command line under an audit hook: each file opened for writing, or renamed to, under
# AUDIT_ROOT is logged to AUDIT_LOG (one line per event).
AUDIT = r'''
import os, runpy, sys
root = os.path.realpath(os.environ["AUDIT_ROOT"])
log = open(os.environ["AUDIT_LOG"], "a", buffering=1)
def inside(p):
  p = os.path.realpath(os.fsdecode(p))
  return p if p.startswith(root + os.sep) else None
def hook(event, args):
  if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
    mode, flags = args[1], args[2]
    writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(
        flags & (os.O_WRONLY | os.O_RDWR))
    p = inside(args[0]) if writes else None
  elif event in ("os.rename", "os.replace"):
    p = inside(args[1])
  else:
    return
  if p:
    log.write(f"{os.path.relpath(p, root)}\n")
sys.addaudithook(hook)
sys.argv[0] = "asyncpatch_jax.main"
runpy.run_module("asyncpatch_jax.main", run_name="__main__", alter_sys=True)
'''


def launch(args, *, processes, devices, env, folder, tag):
  """Starts `python -m asyncpatch_jax.main ARGS` on `processes` processes (audited)."""
  (folder / "audit.py").write_text(AUDIT)
  port = gcs_emulator.free_port()
  procs = []
  for pid in range(processes):
    penv = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
                "--xla_backend_optimization_level=0",
                AUDIT_ROOT=str(folder), AUDIT_LOG=str(folder / f"{tag}.audit.{pid}"))
    if processes > 1:
      penv.update(JAX_COORDINATOR_ADDRESS=f"localhost:{port}", JAX_NUM_PROCESSES=str(processes),
                  JAX_PROCESS_ID=str(pid))
    procs.append(subprocess.Popen([sys.executable, str(folder / "audit.py"), *args], cwd=ROOT,
                                  env=penv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True))
  return procs


def finish(procs, timeout=600):
  """Waits for every process; asserts each ended with exit code 0; returns (stdout, stderr)s."""
  outs = [p.communicate(timeout=timeout) for p in procs]
  for pid, (p, (_, err)) in enumerate(zip(procs, outs)):
    assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n{err[-4000:]}"
  return outs


def written(folder, tag, pid):
  """{path: times written} by process `pid` of the launch `tag` (the audit log)."""
  path = folder / f"{tag}.audit.{pid}"
  counts = {}
  for line in (path.read_text().splitlines() if path.exists() else []):
    counts[line] = counts.get(line, 0) + 1
  return counts


def assert_only_process_0_writes(folder, tag, processes=2):
  for pid in range(1, processes):
    # Each process probes that the output folder is writable with a file of its own name.
    shared = [p for p in written(folder, tag, pid) if ".write_test_" not in p]
    assert not shared, f"process {pid} wrote shared files: {shared}"


def flags(overrides):
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def load_state(workdir):
  config = base_config.load_config_file(str(workdir / "config.json"))
  setup = train.Setup(config, image_shape=(16, 16, 1))
  ckpt = checkpointing.Checkpointer(workdir, config, setup.image_shape, every=1, keep=None)
  try:
    return ckpt.latest_step(), ckpt.restore(setup.abstract_state)
  finally:
    ckpt.close()


def png(path) -> np.ndarray:
  return np.asarray(Image.open(path)).astype(int)


class Run:
  def __init__(self, folder, workdir, outs):
    self.folder, self.workdir, self.outs = folder, workdir, outs


def _train(tmp_path_factory, name, processes, devices):
  folder = tmp_path_factory.mktemp(name)
  workdir = folder / "run"
  procs = launch([f"--config={TEST_CONFIG}", f"--workdir={workdir}", "--config.train.fsdp=2"],
                 processes=processes, devices=devices, env=dict(os.environ, PYTHONPATH=ROOT),
                 folder=folder, tag="train")
  return Run(folder, workdir, finish(procs))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """configs/test.py, fsdp = 2, on one process with 4 host devices."""
  return _train(tmp_path_factory, "one_process", 1, 4)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  """The same command on 2 processes x 2 host devices, on a local workdir."""
  return _train(tmp_path_factory, "two_processes", 2, 2)


@pytest.mark.slow
def test_two_processes_train_grid_and_evaluate_like_one(two_processes, one_process):
  one, two = one_process.workdir, two_processes.workdir
  # eval.json: the same scores (fractions of 32 samples and of the classifier's test set).
  assert json.loads((two / "eval.json").read_text()) == json.loads((one / "eval.json").read_text())
  for out, _ in two_processes.outs:           # every process reports the same summary
    # (gloo, the CPU collectives, prints its connection lines to stdout before it)
    summary = json.loads(out[out.index("\n{\n") + 1:] if not out.startswith("{") else out)
    assert summary["eval"] == json.loads((one / "eval.json").read_text())
  # The final checkpoint: the one-process state within float32 rounding.
  (step_a, a), (step_b, b) = load_state(one), load_state(two)
  assert step_a == step_b == 24
  for name in ("params", "ema_params", "opt_state"):
    for x, y in zip(jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=2e-5,
                                 err_msg=name)
  # The grids: the same images (a grey level of rounding at most).
  assert sorted(os.listdir(two / "samples" / "final")) == GRIDS
  for name in GRIDS:
    assert np.abs(png(two / "samples" / "final" / name)
                  - png(one / "samples" / "final" / name)).max() <= 1, name
  lines = [json.loads(l) for l in (two / "metrics.jsonl").read_text().splitlines()]
  assert [l["step"] for l in lines] == [4, 8, 12, 16, 20, 24]
  want = [json.loads(l) for l in (one / "metrics.jsonl").read_text().splitlines()]
  np.testing.assert_allclose([l["loss"] for l in lines], [l["loss"] for l in want], rtol=1e-5)
  # Written once, by process 0.
  assert_only_process_0_writes(two_processes.folder, "train")
  by_0 = written(two_processes.folder, "train", 0)
  for name in [f"run/samples/final/{g}" for g in GRIDS] + ["run/eval.json", "run/config.json"]:
    assert by_0.get(name, 0) == 1, (name, by_0.get(name))


@pytest.mark.slow
def test_two_processes_on_gs_killed_and_resumed_end_bitwise(gcs, two_processes, one_process,
                                                           tmp_path):
  """SIGKILL on both processes after the first checkpoint, restart: bitwise the
  uninterrupted two-process run, in under 3 minutes; gs:// logged once, saves not stalled."""
  url = f"gs://{gcs_emulator.BUCKET}/mp"
  args = [f"--config={TEST_CONFIG}", f"--workdir={url}", "--config.train.fsdp=2"]
  start = time.time()
  procs = launch(args, processes=2, devices=2, env=gcs.env, folder=tmp_path, tag="killed")
  while not gcs.committed_steps("mp"):
    for p in procs:
      assert p.poll() is None, "a process ended before the first checkpoint:\n" + \
          p.communicate()[1][-3000:]
    assert time.time() - start < 180, "no checkpoint in the bucket after 180 s"
    time.sleep(0.05)
  for p in procs:
    p.send_signal(signal.SIGKILL)
  for p in procs:
    p.communicate(timeout=60)
  resumed_from = max(gcs.committed_steps("mp"))
  assert resumed_from == 12
  outs = finish(launch(args, processes=2, devices=2, env=gcs.env, folder=tmp_path,
                       tag="resumed"))
  elapsed = time.time() - start
  assert elapsed < 180, f"kill and resume took {elapsed:.0f} s"
  assert f"Restoring checkpoint of step {resumed_from} from {url}" in outs[0][1]
  for _, err in outs:
    # One line says how gs:// is reached; gcsfs's bucket-type warnings and tensorstore's
    # credential errors stay away.
    said = [l for l in err.splitlines() if "credentials" in l or "bucket type" in l]
    assert len(said) == 1 and "gs:// goes to the storage emulator" in said[0], said

  # Bitwise the uninterrupted two-process run (its local workdir); read back over the
  # emulator's API into a local folder.
  local = tmp_path / "downloaded"
  for name in gcs.names("mp/"):
    if not name.endswith("/"):
      target = local / name[len("mp/"):]
      target.parent.mkdir(parents=True, exist_ok=True)
      target.write_bytes(gcs.read(name))
  (step_a, a), (step_b, b) = load_state(two_processes.workdir), load_state(local)
  assert step_a == step_b == 24
  for name in ("params", "ema_params", "opt_state"):
    for x, y in zip(jax.tree.leaves(getattr(a, name)), jax.tree.leaves(getattr(b, name))):
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)
  assert json.loads((local / "eval.json").read_text()) == json.loads(
      (one_process.workdir / "eval.json").read_text())
  for name in GRIDS:
    np.testing.assert_array_equal(png(local / "samples" / "final" / name),
                                  png(two_processes.workdir / "samples" / "final" / name))
  assert [json.loads(l)["step"] for l in (local / "metrics.jsonl").read_text().splitlines()] \
      == [4, 8, 12, 16, 20, 24]
  # Each output uploaded once, in all (the killed launch never reached them).
  uploads = gcs.uploads("mp/")
  for name in ["mp/eval.json", "mp/config.json"] + [f"mp/samples/final/{g}" for g in GRIDS]:
    assert uploads.count(name) == 1, (name, uploads.count(name))


def _flat(d, prefix=""):
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


@pytest.mark.slow
def test_sample_and_evaluate_on_two_processes_write_what_one_process_writes(two_processes,
                                                                             tmp_path):
  workdir = two_processes.workdir
  env = dict(os.environ, PYTHONPATH=ROOT)
  # An uncertainty head, trained on two processes (the head trainer's multi-process path).
  head = tmp_path / "head"
  finish(launch([f"--config={HEAD_CONFIG}", f"--workdir={head}",
                 f"--config.uncertainty.model_workdir={workdir}",
                 *flags({"train.num_steps": 8, "train.batch_size": 16, "train.log_every": 4,
                         "train.checkpoint_every": 4, "train.progress_bar": False})],
                processes=2, devices=2, env=env, folder=tmp_path, tag="head"))
  assert_only_process_0_writes(tmp_path, "head")
  mask = np.zeros((16, 16), np.uint8)
  mask[:, :8] = 255
  Image.fromarray(mask).save(tmp_path / "mask.png")
  Image.fromarray(np.add.outer(np.arange(16), np.arange(16)).astype(np.uint8) * 8).save(
      tmp_path / "image.png")
  tasks = {
      "generate": {},
      "inpaint": {"sample.image": tmp_path / "image.png", "sample.mask": tmp_path / "mask.png"},
      "ipr": {"sample.ipr_rounds": 2},
      "adaptive": {"uncertainty.head_workdir": head},
  }
  for task, extra in tasks.items():
    overrides = {"sample.task": task, "sample.num_images": 8, **extra}
    out = {n: tmp_path / n / task for n in ("one", "two")}
    finish(launch(["--mode=sample", f"--workdir={workdir}",
                   *flags({**overrides, "sample.out_dir": out["two"]})],
                  processes=2, devices=2, env=env, folder=tmp_path, tag=task))
    assert_only_process_0_writes(tmp_path, task)
    sample_mode.sample_from_workdir(
        configs.with_overrides({**overrides, "sample.out_dir": out["one"]},
                               path=workdir / "config.json"),
        str(workdir))
    files = sorted(os.listdir(out["one"]))
    assert sorted(os.listdir(out["two"])) == files, task
    for name in files:
      a, b = out["one"] / name, out["two"] / name
      if name.endswith(".png"):
        assert np.abs(png(a) - png(b)).max() <= 1, (task, name)
      elif name.endswith(".npz"):
        np.testing.assert_allclose(np.load(a)["samples"], np.load(b)["samples"], atol=1e-5)
      else:
        sa, sb = (json.loads(p.read_text()) for p in (a, b))
        for d in (sa, sb):
          for key in ("grid", "npz", "out_dir", "rounds_grid", "steps_grid"):
            d.pop(key, None)
        assert sa == sb, task
    # Process 0 wrote each file once, in the staging folder that then became the task's
    # folder in one rename (data/storage.replaced_folder).
    by_0 = written(tmp_path, task, 0)
    staged = [p for p in by_0 if re.fullmatch(rf"two/\.{task}\.[0-9a-f]+\.tmp/[^./][^/]*", p)]
    assert sorted(os.path.basename(p) for p in staged) == files, by_0
    assert all(by_0[p] == 1 for p in staged) and by_0.get(f"two/{task}") == 1, by_0

  # --mode=evaluate: the same scores.
  out = {n: tmp_path / n / "evaluate.json" for n in ("one", "two")}
  finish(launch(["--mode=evaluate", f"--workdir={workdir}",
                 *flags({**EVALUATE, "evaluate.out": out["two"]})],
                processes=2, devices=2, env=env, folder=tmp_path, tag="evaluate"))
  assert_only_process_0_writes(tmp_path, "evaluate")
  evaluate_mode.evaluate_workdir(
      configs.with_overrides({**EVALUATE, "evaluate.out": out["one"]},
                             path=workdir / "config.json"), str(workdir))
  a, b = (json.loads(p.read_text()) for p in (out["one"], out["two"]))
  for d in (a, b):
    for key in ("seconds", "grid", "devices", "mesh"):
      d.pop(key)
    d["generation"].pop("sampling_seconds")
    for family in d["inpainting"]["families"].values():
      for key in [k for k in family if "seconds" in k]:
        family.pop(key)
  flat_a, flat_b = _flat(a), _flat(b)
  assert flat_a.keys() == flat_b.keys()
  for key, value in flat_a.items():       # Frechet distances to float32 rounding, the rest equal
    assert flat_b[key] == (pytest.approx(value, rel=1e-5) if isinstance(value, float)
                           else value), key
  assert np.abs(png(tmp_path / "one" / "evaluate.png")
                - png(tmp_path / "two" / "evaluate.png")).max() <= 1
