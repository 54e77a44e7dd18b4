"""A sample folder holds exactly one call's outputs (runtime/storage.py, `replaced_folder`).

References: the folder's own files (a call's `settings.json` names its image count, which
the PNGs and `samples.npz` beside it must match), after a second call, after Ctrl-C sent
from the test at several moments of a call, and after a disk that fills up (a real tmpfs);
on gs://, the emulator's listing against the `manifest.json` written last.
"""

import json
import os
import signal
import subprocess
import time

import numpy as np
import pytest

from asyncpatch_jax.runtime import storage
from fixtures import gcs_emulator
from fixtures import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIG = os.path.join(ROOT, "configs", "test.py")


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path):
  dest = tmp_path / "out"
  with storage.replaced_folder(dest) as folder:
    for name in ("a.txt", "b.txt", "c.txt"):
      folder.file(name).write_text("first")
  assert sorted(os.listdir(dest)) == ["a.txt", "b.txt", "c.txt"]
  with storage.replaced_folder(dest) as folder:
    folder.file("a.txt").write_text("second")
    assert folder.final("a.txt") == str(dest / "a.txt")
  assert sorted(os.listdir(dest)) == ["a.txt"] and (dest / "a.txt").read_text() == "second"
  with pytest.raises(KeyboardInterrupt):
    with storage.replaced_folder(dest) as folder:
      folder.file("z.txt").write_text("third")
      raise KeyboardInterrupt
  assert sorted(os.listdir(dest)) == ["a.txt"] and (dest / "a.txt").read_text() == "second"
  assert sorted(os.listdir(tmp_path)) == ["out"]                 # no temporary folder left


def test_a_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
  dest = tmp_path / "out"
  with storage.replaced_folder(dest) as folder:
    folder.file("a.txt").write_text("first")
  cls = type(storage.path(dest))
  rename = cls.rename

  def failing(self, target):
    if self.name.endswith(".tmp"):        # the new folder cannot take the old one's place
      raise OSError(28, "No space left on device")
    return rename(self, target)

  monkeypatch.setattr(cls, "rename", failing)
  with pytest.raises(storage.WriteError, match="No space left on device"):
    with storage.replaced_folder(dest) as folder:
      folder.file("a.txt").write_text("second")
  assert sorted(os.listdir(tmp_path)) == ["out"] and (dest / "a.txt").read_text() == "first"


def test_files_in_a_shared_folder_are_replaced_together(tmp_path):
  """--mode=evaluate's evaluate.png and evaluate.json, beside a workdir's other files."""
  (tmp_path / "keep.txt").write_text("other")
  for version in ("first", "second"):
    with storage.replaced_files(tmp_path) as folder:
      folder.file("evaluate.png").write_text(version)
      folder.file("evaluate.json").write_text(version)
  with pytest.raises(KeyboardInterrupt):
    with storage.replaced_files(tmp_path) as folder:
      folder.file("evaluate.png").write_text("third")
      raise KeyboardInterrupt                   # before the JSON: nothing is replaced
  assert {p: (tmp_path / p).read_text() for p in sorted(os.listdir(tmp_path))} == {
      "evaluate.json": "second", "evaluate.png": "second", "keep.txt": "other"}


def test_on_gs_the_manifest_is_written_last_and_lists_the_call(gcs):
  dest = f"gs://{gcs_emulator.BUCKET}/outputs"
  with storage.replaced_folder(dest) as folder:
    for name in ("a.txt", "b.txt"):
      folder.file(name).write_text("first")
  with storage.replaced_folder(dest) as folder:
    assert "outputs/manifest.json" not in gcs.names("outputs/")   # gone while writing
    folder.file("b.txt").write_text("second")
  assert gcs.names("outputs/") == ["outputs/b.txt", "outputs/manifest.json"]
  assert json.loads(gcs.read("outputs/manifest.json")) == {"files": ["b.txt"]}
  uploads = gcs.uploads("outputs/")
  assert uploads[-1] == "outputs/manifest.json" and uploads.count("outputs/b.txt") == 2


@pytest.fixture(scope="module")
def workdir(tiny_workdir):
  return tiny_workdir


def sample(workdir, out, n, **kw):
  return cli.start("--mode=sample", f"--workdir={workdir}", f"--config.sample.num_images={n}",
                   "--config.sample.batch_size=4", f"--config.sample.out_dir={out}", **kw)


def one_call(out) -> int:
  """The image count of the one call whose files the folder holds (asserted consistent)."""
  n = json.loads((out / "settings.json").read_text())["num_images"]
  assert sorted(os.listdir(out)) == sorted(
      ["samples.png", "samples.npz", "settings.json"]
      + [f"sample_{i:03d}.png" for i in range(min(n, 16))])
  assert len(np.load(out / "samples.npz")["samples"]) == n
  assert not [p for p in os.listdir(out.parent) if p.startswith(".")]   # no leftovers
  return n


@pytest.mark.slow
def test_second_call_interrupted_calls_and_a_full_disk_leave_one_calls_files(workdir, tmp_path):
  out = tmp_path / "samples"
  for n in (8, 3):                        # fewer images the second time: no stale PNGs
    proc = sample(workdir, out, n)
    assert proc.wait(timeout=300) == 0, proc.communicate()[1][-2000:]
    assert one_call(out) == n
  # Ctrl-C at several moments of a 12-image call (start-up, sampling, writing): the folder
  # holds the 3-image call's files or the 12-image call's, never a mix.
  seen = set()
  for delay in (0.5, 3.0, 5.0, 6.5, 8.0):
    proc = sample(workdir, out, 12)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    # 130: interrupted in Python; -SIGINT: interrupted while XLA compiles, whose LLVM
    # re-raises SIGINT with the default action (no Python handler runs). Either way the
    # folder must hold one call's files.
    assert proc.returncode in (0, 130, -signal.SIGINT), err[-2000:]
    seen.add(one_call(out))
    if proc.returncode == 0:
      break
  assert seen <= {3, 12}
  # A disk that fills up while writing: one error line, the previous outputs intact.
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(disk)],
                    capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here")
  try:
    small = disk / "samples"
    assert sample(workdir, small, 2).wait(timeout=300) == 0
    proc = sample(workdir, small, 64)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: writing ") and "No space left on device" in last, last
    assert "Traceback" not in err
    assert one_call(small) == 2
  finally:
    subprocess.run(["umount", str(disk)], check=True)
