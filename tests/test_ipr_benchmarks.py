"""The IPR benchmarks (IPR Sec. 4.2-4.5): Sudoku rule and data, cell reading, Even
Pixels metrics, IPR's input checks, and the experiment's tiny run.

References: a brute-force Sudoku check over Python sets; the known count of 4x4 Sudokus
(288); the digits dataset's own images; Even Pixels images built in HSV with known counts
and spreads, scored by a NumPy/matplotlib re-implementation of the benchmark's evaluation.
"""

import colorsys
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from asyncpatch_jax.config import base_config
from asyncpatch_jax.data import datasets
from asyncpatch_jax.data import digits as digits_lib
from asyncpatch_jax.data import sudoku as sudoku_lib
from asyncpatch_jax.diffusion import gaussian
from asyncpatch_jax.diffusion import ipr
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.evaluation import constraints
from asyncpatch_jax.evaluation import digit_classifier
from asyncpatch_jax.training import train
from fixtures.readme import readme_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------- Sudoku


def _failing_units(grid):
  """Brute force: the kinds of unit ('row', 'col', 'box') that do not hold 1..n once."""
  n = grid.shape[0]
  b = int(round(np.sqrt(n)))
  digits = set(range(1, n + 1))
  units = {"row": [grid[r, :] for r in range(n)], "col": [grid[:, c] for c in range(n)],
           "box": [grid[b * (k // b):b * (k // b) + b, b * (k % b):b * (k % b) + b].ravel()
                   for k in range(n)]}
  return {kind for kind, us in units.items()
          if any(sorted(u.tolist()) != sorted(digits) for u in us)}


@pytest.mark.parametrize("n", [9, 4])
def test_sudoku_rule_against_brute_force_with_planted_violations(n):
  rng = np.random.default_rng(n)
  b = int(round(np.sqrt(n)))
  valid = np.stack([sudoku_lib.random_solution(rng, n) for _ in range(30)])
  planted, kinds = [], []
  for g in valid:
    # Two cells of one column and one box swapped: only rows break.
    r, c = b * rng.integers(b), rng.integers(n)
    x = g.copy()
    x[r, c], x[r + 1, c] = x[r + 1, c], x[r, c]
    planted.append(x), kinds.append({"row"})
    # Two cells of one row and one box swapped: only columns break.
    r, c = rng.integers(n), b * rng.integers(b)
    x = g.copy()
    x[r, c], x[r, c + 1] = x[r, c + 1], x[r, c]
    planted.append(x), kinds.append({"col"})
    # The cyclic Latin square (digits relabelled) is not a Sudoku: only boxes break.
    x = (np.arange(n)[:, None] + np.arange(n)[None, :]) % n + 1
    planted.append(rng.permutation(n)[x - 1] + 1), kinds.append({"box"})
    # One digit duplicated: row, column and box break.
    x = g.copy()
    r, c = rng.integers(n, size=2)
    x[r, c] = x[r, c] % n + 1
    planted.append(x), kinds.append({"row", "col", "box"})
  planted = np.stack(planted)
  assert [_failing_units(x) for x in planted] == kinds     # each violation is the planted kind
  assert not sudoku_lib.sudoku_valid(planted).any()
  assert all(_failing_units(g) == set() for g in valid)
  assert sudoku_lib.sudoku_valid(valid).all()
  noise = rng.integers(1, n + 1, (200, n, n))
  ref = np.array([not _failing_units(x) for x in noise])
  np.testing.assert_array_equal(sudoku_lib.sudoku_valid(noise), ref)
  assert sudoku_lib.sudoku_valid(planted.reshape(-1, 4, n, n)).shape == (len(planted) // 4, 4)


def test_4x4_dataset_holds_only_valid_grids_and_all_288():
  sols = sudoku_lib.all_4x4_solutions()
  assert sols.shape == (288, 4, 4)                        # the number of 4x4 Sudokus
  assert len({s.tobytes() for s in sols}) == 288
  assert all(not _failing_units(s) for s in sols)
  from sklearn.datasets import load_digits
  raw = load_digits()
  src = datasets.get_dataset("sudoku", "test", grid_size=4, num_examples=400, seed=3)
  assert src.image_shape == (32, 32, 1) and src.num_givens == (0, 5)   # 26/81 of 16 cells
  idx = digits_lib.split_indices("test")
  pool, pool_labels = raw.images[idx] / 8.0 - 1.0, raw.target[idx]
  seen, n_givens = set(), []
  for i in range(len(src)):
    ex = src[i]
    assert not _failing_units(ex["solution"])
    seen.add(ex["solution"].tobytes())
    n_givens.append(int(ex["cell_mask"].sum()))
    cells = ex["image"][..., 0].reshape(4, 8, 4, 8).swapaxes(1, 2)
    for r in range(4):
      for c in range(4):
        match = np.flatnonzero(np.all(np.abs(pool - cells[r, c]) < 1e-6, axis=(1, 2)))
        assert len(match) and set(pool_labels[match]) == {ex["solution"][r, c]}
    np.testing.assert_array_equal(ex["mask"], np.kron(ex["cell_mask"], np.ones((8, 8))))
  assert len(seen) > 200                                   # uniform over 288: ~250 of 400
  assert sorted(set(n_givens)) == [0, 1, 2, 3, 4, 5]


@pytest.mark.parametrize("n, k", [(4, 1), (4, 5), (9, 3)])
def test_k_corrupted_grids_swap_k_disjoint_pairs(n, k):
  src = datasets.get_dataset("sudoku", "test", grid_size=n, num_examples=6, seed=7)
  images = np.stack([src[i]["image"] for i in range(6)])
  sols = np.stack([src[i]["solution"] for i in range(6)])
  out, out_sols = sudoku_lib.corrupt_by_swaps(images, sols, k, np.random.default_rng(0))
  for img, sol, o, osol in zip(images, sols, out, out_sols):
    changed = np.argwhere(osol != sol)
    assert len(changed) == 2 * k                            # K disjoint pairs, all moved
    assert _failing_units(osol)                             # broken by the brute-force check
    assert sorted(osol.ravel()) == sorted(sol.ravel())
    cells, ocells = sudoku_lib.grid_cells(img, 8, n), sudoku_lib.grid_cells(o, 8, n)
    for r, c in changed:                                    # the cell image moved with its digit
      src_rc = [tuple(p) for p in changed if sol[tuple(p)] == osol[r, c]]
      assert any(np.array_equal(ocells[r, c], cells[p]) for p in src_rc)
    same = osol == sol
    np.testing.assert_array_equal(ocells[same], cells[same])
  with pytest.raises(ValueError, match="num_swaps=6"):
    sudoku_lib.corrupt_by_swaps(images[:1, :32, :32], sols[:1, :4, :4], 6, np.random.default_rng(0))


def test_cells_for_the_classifier_are_the_digits_dataset_images():
  src = datasets.get_dataset("sudoku", "test", grid_size=4, num_examples=8, seed=1)
  digits = datasets.get_dataset("digits", "test")          # 16x16 images the classifier reads
  for i in range(3):
    solution, pick, _ = src.example_params(i)
    cells = constraints.cells_for_classifier(src[i]["image"][None], 4)   # [16, 16, 16, 1]
    for k, (d, j) in enumerate(zip(solution.ravel(), pick.ravel())):
      # pick j is the j-th test digit with label d, in the digits dataset's order.
      np.testing.assert_array_equal(cells[k], digits.images[np.flatnonzero(digits.labels == d)[j]])
  big = datasets.get_dataset("sudoku", "test", num_examples=2, image_size=144)  # 16x16 cells
  small = datasets.get_dataset("sudoku", "test", num_examples=2)                # 8x8 cells
  np.testing.assert_allclose(constraints.cells_for_classifier(big[0]["image"][None], 9),
                             constraints.cells_for_classifier(small[0]["image"][None], 9))


@pytest.fixture(scope="module")
def cell_classifier():
  return digit_classifier.train_classifier(jax.random.key(0), num_steps=300)


@pytest.mark.slow
def test_cell_classifier_reads_rendered_grids(cell_classifier):
  params, held_out = cell_classifier
  for n in (4, 9):
    src = datasets.get_dataset("sudoku", "test", grid_size=n, num_examples=24, seed=2)
    images = np.stack([src[i]["image"] for i in range(len(src))])
    solutions = np.stack([src[i]["solution"] for i in range(len(src))])
    res = constraints.sudoku_validity(params, images, n)
    accuracy = float(np.mean(res["grids"] == solutions))
    # Measured: 0.995 (4x4), 0.972 (9x9) after 300 steps (held-out 10-class accuracy 0.969).
    assert accuracy >= (0.97 if n == 4 else 0.93), (n, accuracy, held_out)
    # The rate is the rule applied to what was read.
    np.testing.assert_array_equal(res["valid"], sudoku_lib.sudoku_valid(res["grids"]))
    assert res["rate"] == pytest.approx(res["valid"].mean())
  # Reading a corrupted grid: the swapped cells are read as swapped, so the grid is invalid.
  src = datasets.get_dataset("sudoku", "test", grid_size=4, num_examples=4, seed=2)
  image = src[0]["image"].copy()
  sol = src[0]["solution"]
  a, b = np.argwhere(sol != sol[0, 0])[0], (0, 0)
  cell = lambda rc: (slice(8 * rc[0], 8 * rc[0] + 8), slice(8 * rc[1], 8 * rc[1] + 8))
  image[cell(a)], image[cell(b)] = src[0]["image"][cell(b)], src[0]["image"][cell(a)]
  res = constraints.sudoku_validity(params, np.stack([src[0]["image"], image]), 4)
  assert res["valid"].tolist() == [True, False]


# --------------------------------------------------------------------------- Even Pixels


def _benchmark_reference(images):
  """The Even Pixels evaluation as the benchmark describes it (IPR App. C.4.3), in NumPy."""
  from matplotlib.colors import rgb_to_hsv
  hsv = rgb_to_hsv(np.clip((np.asarray(images, np.float64) + 1) / 2, 0, 1))
  errors = []
  for hue in hsv[..., 0]:
    hist = np.histogram(hue, bins=256, range=(0, 1))[0]
    p1 = int(hist.argmax())
    p2 = (p1 + 128) % 256
    lo, hi = sorted((p1, p2))
    b1, b2 = (lo + hi) // 2, (lo + hi + 256) // 2
    b1, b2 = sorted((b1, b2 % 256))
    errors.append(abs(int(hist[b1:b2].sum()) - hue.size // 2))
  errors = np.array(errors)
  return {"balance_accuracy": float(np.mean(errors == 0)), "mean_count_error": errors.mean(),
          "saturation_std": hsv[..., 1].std(axis=(1, 2)).mean(),
          "value_std": hsv[..., 2].std(axis=(1, 2)).mean()}


def test_even_pixels_metrics_on_constructed_images():
  rng = np.random.default_rng(0)
  n_img, side = 12, 32
  deltas = np.array([0, 0, 0, 3, -5, 40, -1, 0, 17, -200, 2, 0])   # N_c1 - 512 per image
  images, sats, vals = [], [], []
  for delta in deltas:
    h1 = (rng.integers(0, 128) + 0.5) / 256                          # bin centres
    n1 = side * side // 2 + delta
    hue = np.where(rng.permutation(side * side) < n1, h1, h1 + 0.5)
    sat = np.where(rng.random(side * side) < 0.3, 0.8, 1.0)          # known spreads
    val = 0.7 + 0.05 * rng.integers(-1, 2, side * side)
    rgb = np.array([colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hue, sat, val)])
    images.append(rgb.reshape(side, side, 3) * 2 - 1)
    sats.append(np.std(sat)), vals.append(np.std(val))
  images = np.stack(images).astype(np.float64)
  got = constraints.even_pixels_metrics(images)
  # Known answers: the planted counts and the spreads the images were built with.
  assert got["balance_accuracy"] == pytest.approx(np.mean(deltas == 0))
  assert got["balance_accuracy_search"] == pytest.approx(np.mean(deltas == 0))
  assert got["mean_count_error"] == pytest.approx(np.mean(np.abs(deltas)))
  assert got["saturation_std"] == pytest.approx(np.mean(sats), abs=1e-9)
  assert got["value_std"] == pytest.approx(np.mean(vals), abs=1e-9)
  ref = _benchmark_reference(images)
  for k, v in ref.items():
    assert got[k] == pytest.approx(v, abs=1e-9), k
  # Noisy dataset images: agrees with the benchmark's NumPy evaluation.
  src = datasets.get_dataset("even_pixels", "test", num_examples=16, seed=4)
  noisy = np.stack([src[i]["image"] for i in range(16)]) + rng.normal(0, 0.3, (16, 32, 32, 3))
  got, ref = constraints.even_pixels_metrics(noisy), _benchmark_reference(noisy)
  for k, v in ref.items():
    assert got[k] == pytest.approx(v, rel=1e-6, abs=1e-9), k
  assert got["saturation_std"] > 0.01 and got["mean_count_error"] > 0


# --------------------------------------------------------------------------- IPR inputs


@pytest.mark.parametrize("kwargs, message", [
    (dict(alpha=0.0), "alpha=0.0"),
    (dict(alpha=-0.25), "alpha=-0.25"),
    (dict(alpha=1.01), "alpha=1.01"),
    (dict(num_rounds=0), "num_rounds=0"),
    (dict(num_rounds=-3), "num_rounds=-3"),
    (dict(condition=np.ones(4, bool)), "condition set covers all 4 regions"),
    (dict(condition=[[0, 0, 0, 0], [1, 1, 1, 1]]), "image 1: the condition set covers all"),
])
def test_ipr_parameters_out_of_range_are_refused(kwargs, message):
  refiner = ipr.Refiner(gaussian.GaussianVelocity(np.zeros((4, 4, 1)), np.eye(16)), mesh=None)
  args = dict(key=jax.random.key(0), regions=schedules.grid_regions(4, 4, (2, 2)),
              num_rounds=1, alpha=0.25, num_steps=2)
  args.update(kwargs)
  with pytest.raises(ValueError, match=message):
    refiner.refine(np.zeros((2, 4, 4, 1), np.float32), **args)


# ---------------------------------------------------------------------- configs, script


@pytest.mark.parametrize("name", ["sudoku4.py", "sudoku4.py:cpu", "even_pixels.py:cpu",
                                  "polygons.py:cpu"])
def test_benchmark_configs_build_through_eval_shape(name):
  import importlib.util
  path, _, variant = name.partition(":")
  spec = importlib.util.spec_from_file_location("cfg", os.path.join(ROOT, "configs", path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(variant)
  setup = train.Setup(config)
  assert setup.image_shape == ((32, 32, 1) if "sudoku" in name else (32, 32, 3))
  assert sum(x.size for x in jax.tree.leaves(setup.abstract_state.params)) > 0
  with pytest.raises(ValueError, match="unknown variant"):
    module.get_config("gpu")
  assert isinstance(base_config.get_base_config(), type(config))


# Every field the README's IPR tables read (experiments/ipr/ipr_benchmarks.py).
SUDOKU_FIELDS = ["hard.validity", "hard.stderr", "corrupted.1.validity", "corrupted.3.validity",
                 "corrupted.5.validity", "ablations.alpha_0.1.validity",
                 "ablations.alpha_0.25.validity", "ablations.alpha_0.5.validity",
                 "ablations.fixed_noise.validity", "ablations.fixed_regions.validity",
                 "srm_order.hard.validity", "srm_order.hard.stderr"]
SUDOKU_SCALARS = ["classifier.held_out_accuracy_10_classes", "classifier.rendered_cell_accuracy",
                  "classifier.real_grid_validity", "model.train_steps", "model.parameters",
                  "model.train_time_s", "settings.init_budget", "settings.ipr_budget",
                  "total_wall_s", "srm_order.head.train_steps", "srm_order.head.parameters"]
EVEN_FIELDS = ["balance_accuracy", "balance_accuracy_stderr", "balance_accuracy_search",
               "mean_count_error", "saturation_std", "value_std", "srm_order.balance_accuracy"]
EVEN_SCALARS = ["data.balance_accuracy", "data.saturation_std", "data.value_std",
                "model.train_steps", "model.parameters", "model.train_time_s",
                "settings.init_budget", "settings.ipr_budget", "total_wall_s",
                "srm_order.head.train_steps"]
POLYGONS_FIELDS = ["count_accuracy", "count_accuracy_stderr", "mean_count_error",
                   "vertex_uniformity", "srm_order.count_accuracy", "srm_order.mean_count_error"]
# Per benchmark: the success rate the SRM-order comparison pairs, as (raster, SRM) curve paths.
PAIRED = {"ipr_sudoku": ("validity", "hard.validity", "srm_order.hard.validity"),
          "ipr_even_pixels": ("balance_accuracy", "balance_accuracy",
                              "srm_order.balance_accuracy"),
          "ipr_polygons": ("count_accuracy", "count_accuracy", "srm_order.count_accuracy")}
POLYGONS_SCALARS = ["data.count_accuracy", "data.vertex_uniformity", "model.train_steps",
                    "model.parameters", "model.train_time_s", "settings.init_budget",
                    "settings.ipr_budget", "settings.guidance", "total_wall_s"]


def _field(d, path):
  """d's value at a dotted path whose keys may themselves hold dots ('alpha_0.1')."""
  parts, node = path.split("."), d
  while parts:
    for j in range(len(parts), 0, -1):
      key = ".".join(parts[:j])
      if isinstance(node, dict) and key in node:
        node, parts = node[key], parts[j:]
        break
    else:
      raise KeyError(path)
  return node


@pytest.mark.slow
def test_tiny_run_writes_every_field_the_readme_reads(tmp_path):
  env = dict(os.environ, PYTHONPATH=ROOT)
  # One host device: the tiny run's batch of 2 (the suite's 8 fake devices are for sharding).
  env["XLA_FLAGS"] = " ".join(f for f in env.get("XLA_FLAGS", "").split()
                              if "force_host_platform_device_count" not in f)
  # The README's command, made tiny (later flags override earlier ones).
  cmd = readme_command("experiments/ipr/ipr_benchmarks.py")
  res = subprocess.run([sys.executable, *cmd[1:], "--tiny", f"--out={tmp_path}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-4000:]
  sudoku = json.load(open(tmp_path / "ipr_sudoku.json"))
  even = json.load(open(tmp_path / "ipr_even_pixels.json"))
  polygons = json.load(open(tmp_path / "ipr_polygons.json"))
  for result, fields, scalars in ((sudoku, SUDOKU_FIELDS, SUDOKU_SCALARS),
                                  (even, EVEN_FIELDS, EVEN_SCALARS),
                                  (polygons, POLYGONS_FIELDS, POLYGONS_SCALARS)):
    assert result["rounds"] == [0, 1, 2] and result["rounds_shown"] == [0, 1, 2]
    for f in fields:
      curve = np.asarray(_field(result, f))
      assert curve.shape == (3,) and np.isfinite(curve).all(), f
    for f in scalars:
      assert np.isfinite(float(_field(result, f))), f
    assert result["command"].startswith("python -m experiments.ipr.ipr_benchmarks ")
    assert "--tiny" in result["command"].split()
  # Table 1 budgets: x^(0) over 16 cells at 3 steps each; Even Pixels (16x16 in the tiny
  # run: 16 patches) at 30 steps a patch with overlap 0.9: 30 (15 * 0.1 + 1) = 75.
  assert sudoku["settings"]["init_budget"] == 48 and even["settings"]["init_budget"] == 75
  assert even["settings"]["ipr_budget"] == 39                # 4 patches: 30 (3 * 0.1 + 1)
  # Real Even Pixels images are perfect: balanced, one saturation and value.
  assert even["data"]["balance_accuracy"] == 1.0 and even["data"]["saturation_std"] < 1e-6
  # Counting Polygons (32x32, 64 patches of 4x4): x^(0) 10 (63 * 0.1 + 1) = 73 steps; a
  # round regenerates 16 patches in 10 (15 * 0.1 + 1) = 25; the real images read exactly.
  assert polygons["settings"]["init_budget"] == 73 and polygons["settings"]["ipr_budget"] == 25
  assert polygons["settings"]["counts"] == [1, 2, 3, 4]
  assert polygons["data"] == {"count_accuracy": 1.0, "mean_count_error": 0.0,
                              "vertex_uniformity": 1.0}
  assert set(polygons["by_count"]["last"]) == {"1", "2", "3", "4"}
  assert set(polygons["srm_order"]["by_count"]["last"]) == {"1", "2", "3", "4"}
  # The SRM run really orders by the head (the same keys in raster order give other samples).
  assert polygons["srm_order"]["mean_count_error"] != polygons["mean_count_error"]
  assert polygons["srm_order"]["order"] == "SRM uncertainty order (head)"
  # SRM order vs raster on the same samples: the paired difference of the per-sample successes
  # is the difference of the two curves' rates; its interval holds it; the verdict is the rule's.
  for name, result in (("ipr_sudoku", sudoku), ("ipr_even_pixels", even),
                       ("ipr_polygons", polygons)):
    metric, raster, srm = PAIRED[name]
    for r, i in (("x0", 0), ("last", -1)):
      d = result["srm_order"]["comparison"][metric][r]
      want = _field(result, srm)[i] - _field(result, raster)[i]
      assert abs(d["estimate"] - want) < 1e-12, (name, r)
      assert d["low"] <= d["estimate"] <= d["high"] and d["method"] == "percentile"
      assert d["verdict"] == ("within noise" if d["low"] <= 0 <= d["high"] else
                              "better" if d["low"] > 0 else "worse")
    if name == "ipr_sudoku":     # each ablation's last round against the main run's
      main = _field(result, "ablations.alpha_0.25.validity")[-1]
      for ablation in ("alpha_0.1", "alpha_0.5", "fixed_noise", "fixed_regions"):
        d = result["ablations"][ablation]["last_minus_main"]
        want = _field(result, f"ablations.{ablation}.validity")[-1] - main
        assert abs(d["estimate"] - want) < 1e-12 and d["low"] <= d["estimate"] <= d["high"]
    # What the rounds did, per order: last round - x^(0) on the same samples.
    for order, path in (("raster", raster), ("uncertainty", srm)):
      d = result["ipr_gain"][metric][order]
      assert abs(d["estimate"] - (_field(result, path)[-1] - _field(result, path)[0])) < 1e-12
      assert d["low"] <= d["estimate"] <= d["high"]
  for name in ("ipr_sudoku", "ipr_even_pixels", "ipr_polygons"):
    for ext in (".md", ".png", "_rounds.png"):
      assert os.path.getsize(tmp_path / f"{name}{ext}") > 0
  assert "| 2 |" in open(tmp_path / "ipr_sudoku.md").read()
