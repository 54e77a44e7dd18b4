"""experiments/benchmarks/bench_memory.py as its README writes it, with --tiny.

Checks the JSON's fields against the script's own definitions: each point's peak is
`memory.StepMemory.peak` of its parts, the fitted line reproduces the points it was fitted
to, the check point's error is the line's, the largest batches are where the line crosses
each limit, the search from there finds a batch that fits and its successor that does
not, and fsdp=8 splits the state. A two-block DiT: 27 compiles, 80 s on the 2-core
development machine when quiet, 8 minutes under load (slow: a subprocess).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fixtures.readme import readme_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2 ** 30


@pytest.fixture(scope="module")
def result(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench_memory") / "memory.json"
  cmd = readme_command("experiments/benchmarks/bench_memory.py")
  res = subprocess.run([sys.executable, *cmd[1:], "--tiny", f"--out={out}"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True,
                       timeout=900)
  assert res.returncode == 0, res.stderr[-4000:]
  with open(out) as f:
    return json.load(f)


@pytest.mark.slow
def test_records_how_it_was_made(result):
  assert result["command"].startswith("python -m experiments.benchmarks.bench_memory ")
  assert "--tiny" in result["command"]
  import jax  # pylint: disable=g-import-not-at-top
  assert result["jax"] == jax.__version__ and len(result["date"]) == 10
  assert (result["platform"], result["devices"]) == ("cpu", 8)
  assert (result["fit_batches"], result["check_batch"]) == ([1, 2], 4)
  assert result["limits_gib"] == [0.02, 0.03]
  assert result["wall_seconds"] > 0
  # The backend optimisation level leaves XLA:CPU's buffer assignment as it is.
  [check] = result["opt_level_checks"]
  assert check["same"] and check["at_opt_level"] == {
      **check["at_default_level"], "compile_seconds": check["at_opt_level"]["compile_seconds"]}


@pytest.mark.slow
def test_points_fit_and_largest_batches(result):
  model = result["models"]["tiny-DiT"]
  assert set(model["fsdp"]) == {"1", "8"}
  for fsdp, entry in model["fsdp"].items():
    assert entry["mesh"] == {"data": 8 // int(fsdp), "fsdp": int(fsdp)}
    assert set(entry["remat"]) == {"none", "full"}
    for remat, s in entry["remat"].items():
      points = s["points"]
      assert [p["per_device_batch"] for p in points] == [1, 2]
      for p in points + [s["check"]]:
        assert p["global_batch"] == 8 * p["per_device_batch"]
        assert p["peak"] == p["arguments"] + p["outputs"] - p["aliased"] + p["temporaries"]
        assert p["aliased"] >= entry["state_bytes_per_device"]["total"]   # donated state
      a, b = s["fit"]["a_bytes"], s["fit"]["b_bytes_per_example"]
      for p in points:
        assert abs(a + b * p["per_device_batch"] - p["peak"]) <= 1e-6 * p["peak"], (fsdp, remat)
      assert s["fit"]["max_rel_residual"] < 1e-6
      check = s["check"]
      assert check["predicted_peak"] == pytest.approx(a + 4 * b, rel=1e-12)
      assert check["rel_error"] == pytest.approx(
          (check["predicted_peak"] - check["peak"]) / check["peak"], rel=1e-9)
      assert abs(check["rel_error"]) < 0.1, (fsdp, remat, check)
      for key, n in s["largest_per_device_batch"].items():
        limit = float(key.removesuffix("GiB")) * GIB
        assert (n == 0 and a + b > limit) or a + b * n <= limit < a + b * (n + 1)
        # The search from the line's batch: a compiled batch that fits, the next does not.
        found = s["largest_compiled"][key]
        lo, hi = found["largest"], found["smallest_not_fitting"]
        assert found["line"] == n and found["exact"] and hi == lo + 1
        assert lo == 0 or found["peak_at_largest"] <= limit
        assert found["peak_at_smallest_not_fitting"] > limit
        assert 0 <= found["compiles"] <= 6
    # remat full keeps less per example than none.
    per_example = {r: s["fit"]["b_bytes_per_example"] for r, s in entry["remat"].items()}
    assert per_example["full"] < per_example["none"]
  # The same two points with float32 compute (the config's is bfloat16).
  [f32] = result["float32_checks"]
  none = model["fsdp"]["1"]["remat"]["none"]["points"]
  assert model["dtype"] == "bfloat16" and f32["model"] == "tiny-DiT"
  assert f32["bfloat16_peaks"] == [p["peak"] for p in none]
  assert f32["bfloat16_b"] == none[1]["peak"] - none[0]["peak"]       # batches 1 and 2
  assert f32["float32_b"] == f32["float32_peaks"][1] - f32["float32_peaks"][0]
  # fsdp=8: the parameters, EMA and Adam state split over 8 devices (small leaves whole).
  one, eight = (model["fsdp"][k]["state_bytes_per_device"] for k in ("1", "8"))
  assert one["params"] == 4 * model["parameters"]
  for part in ("params", "ema_params", "opt_state", "total"):
    assert one[part] / 8 <= eight[part] < 0.2 * one[part], part
