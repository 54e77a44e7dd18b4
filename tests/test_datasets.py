"""Tests for asyncpatch_jax.datasets: embedded, generated and TFDS-backed sources."""

import colorsys
import importlib.util
import socket
import sys

import numpy as np
import pytest

from asyncpatch_jax.data import datasets
from asyncpatch_jax.data import digits as digits_lib
from asyncpatch_jax.data import even_pixels as ep_lib
from asyncpatch_jax.data import polygons as polygons_lib
from asyncpatch_jax.data import sudoku as sudoku_lib
from asyncpatch_jax.data import textures as textures_lib
from asyncpatch_jax.data import tfds_source
from asyncpatch_jax.evaluation import constraints
from asyncpatch_jax.evaluation import polygon_count


# ---------------------------------------------------------------- digits


def test_digits_equal_sklearn_upsampled_and_split_is_a_partition():
  from sklearn.datasets import load_digits

  raw = load_digits()
  ref_images = raw.images.astype(np.float64) / 16.0 * 2.0 - 1.0  # [1797, 8, 8]
  seen = []
  for split in ("train", "test"):
    src = datasets.get_dataset("digits", split)
    idx = digits_lib.split_indices(split)
    assert len(src) == len(idx)
    assert src.image_shape == (16, 16, 1) and src.num_classes == 10
    for j, i in enumerate(idx):
      ex = src[j]
      ref = np.kron(ref_images[i], np.ones((2, 2)))[..., None]
      np.testing.assert_allclose(ex["image"], ref, rtol=0, atol=1e-7)
      assert ex["image"].dtype == np.float32 and int(ex["label"]) == raw.target[i]
    seen.append(set(idx.tolist()))
    # Each class contributes its share: test holds ~20% of every class.
    labels = raw.target[idx]
    frac = np.bincount(labels, minlength=10) / np.bincount(raw.target, minlength=10)
    np.testing.assert_allclose(frac, 0.2 if split == "test" else 0.8, atol=0.02)
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(1797))
  assert (len(seen[0]), len(seen[1])) == (1438, 359)


def test_digits_image_size_32_is_4x_nearest():
  from sklearn.datasets import load_digits

  i = int(digits_lib.split_indices("test")[5])
  ex = datasets.get_dataset("digits", "test", image_size=32)[5]
  ref = np.kron(load_digits().images[i] / 8.0 - 1.0, np.ones((4, 4)))
  np.testing.assert_allclose(ex["image"][..., 0], ref, atol=1e-7)


# ---------------------------------------------------------------- textures


def test_textures_bundled_images_load_offline(monkeypatch):
  def no_network(*args, **kwargs):
    raise OSError("network disabled in this test")

  monkeypatch.setattr(socket, "socket", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  textures_lib.load_image.cache_clear()
  for name in textures_lib.BUNDLED_IMAGES:
    img = textures_lib.load_image(name)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[-1] == 3
    assert min(img.shape[:2]) >= 100


def test_textures_crops_are_slices_of_the_skimage_images_in_their_split_band():
  import skimage.data

  s = 32
  for split in ("train", "test"):
    src = datasets.get_dataset("textures", split, num_examples=300, seed=3)
    assert len(src) == 300 and src.image_shape == (s, s, 3)
    labels = []
    for i in range(0, 300, 10):
      k, y, x = src.crop_params(i)
      ref_img = getattr(skimage.data, src.images[k])().astype(np.float64)
      if ref_img.ndim == 2:
        ref_img = np.stack([ref_img] * 3, axis=-1)
      ref = ref_img[y:y + s, x:x + s, :3] / 127.5 - 1.0
      ex = src[i]
      np.testing.assert_allclose(ex["image"], ref, atol=1e-6)
      assert int(ex["label"]) == k
      cut = int(ref_img.shape[0] * 0.8)
      assert (y + s <= cut) if split == "train" else (y >= cut)
      labels.append(k)
    assert len(set(labels)) >= 5  # crops come from many images
  # Same seed, same crops; another seed, other crops.
  a = datasets.get_dataset("textures", "train", seed=3)[7]["image"]
  b = datasets.get_dataset("textures", "train", seed=3)[7]["image"]
  c = datasets.get_dataset("textures", "train", seed=4)[7]["image"]
  assert np.array_equal(a, b) and not np.array_equal(a, c)


# ---------------------------------------------------------------- even pixels


def _two_colour_breakdown(image):
  rgb = (image.astype(np.float64) + 1.0) / 2.0
  colours, counts = np.unique(rgb.reshape(-1, 3), axis=0, return_counts=True)
  return colours, counts


def test_even_pixels_follow_ipr_appendix_c4():
  src = datasets.get_dataset("even_pixels", "train", num_examples=64, seed=1)
  assert src.image_shape == (32, 32, 3)
  images = np.stack([src[i]["image"] for i in range(len(src))])
  h1s = []
  for img in images:
    colours, counts = _two_colour_breakdown(img)
    assert len(colours) == 2 and counts.tolist() == [512, 512]
    hsv = [colorsys.rgb_to_hsv(*c) for c in colours]
    assert abs(abs(hsv[0][0] - hsv[1][0]) - 0.5) < 1e-6  # hues 180 degrees apart
    for _, sat, val in hsv:
      assert abs(sat - 1.0) < 1e-6 and abs(val - 0.7) < 1e-6
    h1s.append(min(h for h, _, _ in hsv))
  assert 0.0 <= min(h1s) and max(h1s) < 0.5 and np.std(h1s) > 0.08  # h1 ~ U[0, 0.5)
  for mode in ("search", "antipodal"):
    stats = ep_lib.even_pixels_stats(images, second_peak=mode)
    assert stats["balanced"].all() and stats["count_error"].max() == 0
    assert stats["saturation_std"].max() < 1e-6 and stats["value_std"].max() < 1e-6
  # Same seed -> same images; the test split is a different stream.
  again = datasets.get_dataset("even_pixels", "train", num_examples=64, seed=1)[5]["image"]
  other = datasets.get_dataset("even_pixels", "test", num_examples=64, seed=1)[5]["image"]
  assert np.array_equal(images[5], again) and not np.array_equal(images[5], other)


@pytest.mark.parametrize("k", [1, 3, 40])
def test_even_pixels_rule_counts_moved_pixels(k):
  src = datasets.get_dataset("even_pixels", "test", num_examples=8, seed=2)
  images = np.stack([src[i]["image"] for i in range(8)])
  flat = images.reshape(8, -1, 3).copy()
  for b in range(8):
    colours, _ = _two_colour_breakdown(images[b])
    first = np.flatnonzero(np.all(np.isclose((flat[b] + 1) / 2, colours[0]), axis=-1))
    flat[b, first[:k]] = colours[1] * 2.0 - 1.0  # k pixels change colour
  for mode in ("search", "antipodal"):
    stats = ep_lib.even_pixels_stats(flat.reshape(images.shape), second_peak=mode)
    assert stats["count_error"].tolist() == [k] * 8
    assert not ep_lib.even_pixels_valid(flat.reshape(images.shape), second_peak=mode).any()


# ---------------------------------------------------------------- sudoku


def _brute_force_valid(grid):
  digits = set(range(1, 10))
  rows = [set(grid[r, :].tolist()) for r in range(9)]
  cols = [set(grid[:, c].tolist()) for c in range(9)]
  boxes = [set(grid[3 * (b // 3):3 * (b // 3) + 3, 3 * (b % 3):3 * (b % 3) + 3].ravel().tolist())
           for b in range(9)]
  return all(u == digits for u in rows + cols + boxes)


def test_sudoku_rule_checker_matches_brute_force():
  rng = np.random.default_rng(0)
  grids = np.stack([sudoku_lib.random_solution(rng) for _ in range(100)])
  corrupted = grids.copy()
  for g in corrupted[:60]:  # swap two random cells
    (a, b), (c, d) = rng.integers(0, 9, (2, 2))
    g[a, b], g[c, d] = g[c, d], g[a, b]
  corrupted[60:80] = rng.integers(1, 10, (20, 9, 9))
  ref = np.array([_brute_force_valid(g) for g in corrupted])
  assert np.array_equal(sudoku_lib.sudoku_valid(corrupted), ref)
  assert ref[80:].all() and not ref[60:80].any() and 0 < ref[:60].sum() < 60
  assert sudoku_lib.sudoku_valid(corrupted.reshape(5, 20, 9, 9)).shape == (5, 20)


def test_sudoku_examples_are_valid_digit_grids_with_given_mask():
  from sklearn.datasets import load_digits

  raw = load_digits()
  for split in ("train", "test"):
    src = datasets.get_dataset("sudoku", split, num_examples=40, seed=5)
    idx = digits_lib.split_indices(split)
    pool = raw.images[idx] / 8.0 - 1.0  # this split's digits, [N, 8, 8]
    pool_labels = raw.target[idx]
    n_givens, solutions = [], []
    for i in range(len(src)):
      ex = src[i]
      assert ex["image"].shape == (72, 72, 1) and ex["mask"].shape == (72, 72)
      assert _brute_force_valid(ex["solution"])
      cells = ex["image"][..., 0].reshape(9, 8, 9, 8).swapaxes(1, 2)
      for r in range(0, 9, 4):
        for c in range(9):
          match = np.flatnonzero(np.all(np.abs(pool - cells[r, c]) < 1e-6, axis=(1, 2)))
          assert len(match) and set(pool_labels[match]) == {ex["solution"][r, c]}
      np.testing.assert_array_equal(ex["mask"], np.kron(ex["cell_mask"], np.ones((8, 8))))
      n_givens.append(int(ex["cell_mask"].sum()))
      solutions.append(ex["solution"].tobytes())
    assert 0 <= min(n_givens) and max(n_givens) <= 26 and len(set(n_givens)) > 5
    assert len(set(solutions)) == len(src)  # random solutions, not one pattern
  fixed = datasets.get_dataset("sudoku", "test", num_examples=5, num_givens=30)
  assert [int(fixed[i]["cell_mask"].sum()) for i in range(5)] == [30] * 5
  ex = fixed[0]
  cells = sudoku_lib.grid_cells(ex["image"][None])
  assert cells.shape == (1, 9, 9, 8, 8, 1)
  np.testing.assert_array_equal(cells[0, 4, 7], ex["image"][32:40, 56:64])


# ---------------------------------------------------------------- counting polygons

POLYGONS_CPU = dict(image_size=32, max_polygons=4, radius=(0.11, 0.15))   # configs/polygons.py:cpu


@pytest.mark.parametrize("options, num", [({}, 150), (POLYGONS_CPU, 400)],
                         ids=["paper_128", "cpu_32"])
def test_polygons_follow_ipr_appendix_c3_and_read_exactly(options, num):
  src = datasets.get_dataset("polygons", "test", num_examples=num, seed=3, **options)
  size = options.get("image_size", 128)
  n_max = options.get("max_polygons", 9)
  r_lo, r_hi = (x * size for x in options.get("radius", (0.05, 0.1)))
  assert src.image_shape == (size, size, 3) and src.num_classes == n_max + 1
  examples = [src[i] for i in range(num)]
  images = np.stack([e["image"] for e in examples])
  labels = np.array([e["label"] for e in examples])
  sides = np.array([e["num_vertices"] for e in examples])
  assert images.dtype == np.float32 and images.min() >= -1.0 and images.max() == 1.0
  assert labels.dtype == np.int32 and sides.dtype == np.int32
  # Counts 1..n_max and vertices 3..7, each uniform (every value drawn, none far from 1/k).
  for values, lo, hi in ((labels, 1, n_max), (sides, 3, 7)):
    freq = np.bincount(values - lo, minlength=hi - lo + 1) / num
    assert len(freq) == hi - lo + 1 and freq.min() > 0.5 / len(freq), freq
  hues = []
  for i, (image, e) in enumerate(zip(images, examples)):
    p = src.example_params(i)
    circles, v = p["circles"], p["num_vertices"]
    assert len(circles) == e["label"] and v == e["num_vertices"]
    # Geometry: radii in range, circles 1 pixel inside the image and 2 pixels apart.
    x, y, r = circles.T
    assert (r >= r_lo).all() and (r <= r_hi).all() and r_lo >= 3.5
    assert (np.minimum(x, y) - r >= 1).all() and (np.maximum(x, y) + r <= size - 1).all()
    d = np.hypot(x[:, None] - x[None], y[:, None] - y[None]) - r[:, None] - r[None]
    assert (d[~np.eye(len(r), dtype=bool)] >= 2).all()
    # Colour: every pixel is white blended with one colour, HSL(hue, S = 1, L = 0.25), by
    # its coverage a = 1 - min(R, G, B) = 2 (1 - max(R, G, B)), the reader's ink; the
    # coverage sums to the polygons' area.
    rgb = (image.astype(np.float64) + 1) / 2
    a = 1 - rgb.min(axis=-1)
    full = rgb[a > 1 - 1e-6]
    hue, lightness, saturation = colorsys.rgb_to_hls(*full[0])
    assert abs(lightness - 0.25) < 1e-6 and abs(saturation - 1) < 1e-6
    np.testing.assert_allclose(full, np.broadcast_to(full[0], full.shape), atol=1e-6)
    np.testing.assert_allclose(rgb, 1 - a[..., None] * (1 - full[0]), atol=1e-6)
    np.testing.assert_allclose(polygon_count.ink(image[None])[0], a, atol=1e-6)
    area = v / 2 * np.sin(2 * np.pi / v) * (r ** 2).sum()
    assert abs(a.sum() / area - 1) < 0.01
    hues.append(hue)
  assert np.std(hues) > 0.2                                        # hue ~ U[0, 1): std 0.29
  # The reader gets every data image right: count = label, every vertex number = V.
  read = polygon_count.read_polygons(images)
  np.testing.assert_array_equal(read["count"], labels)
  for got, v in zip(read["vertices"], sides):
    assert got.tolist() == [v] * len(got)
  assert constraints.polygons_metrics(images, labels) == {
      "count_accuracy": 1.0, "mean_count_error": 0.0, "vertex_uniformity": 1.0}


def test_polygons_are_deterministic_per_seed_split_and_index():
  src = datasets.get_dataset("polygons", "train", num_examples=20, seed=1, **POLYGONS_CPU)
  again = datasets.get_dataset("polygons", "train", num_examples=20, seed=1, **POLYGONS_CPU)
  other_split = datasets.get_dataset("polygons", "test", num_examples=20, seed=1, **POLYGONS_CPU)
  other_seed = datasets.get_dataset("polygons", "train", num_examples=20, seed=2, **POLYGONS_CPU)
  for i in (0, 7, 19):
    a, b = src[i], again[i]
    assert all(np.array_equal(a[k], b[k]) for k in ("image", "label", "num_vertices"))
    assert not np.array_equal(a["image"], other_split[i]["image"])
    assert not np.array_equal(a["image"], other_seed[i]["image"])
  batch = src.__getitems__([3, 5])
  assert np.array_equal(batch[1]["image"], src[5]["image"])
  assert repr(src) == repr(again) and repr(src) != repr(other_seed)
  with pytest.raises(IndexError):
    src[20]


# ---------------------------------------------------------------- registry errors


@pytest.mark.parametrize("call, message", [
    (lambda: datasets.get_dataset("digit"), "Did you mean 'digits'"),
    (lambda: datasets.get_dataset("imagenet_64"), "Did you mean 'imagenet64'"),
    (lambda: datasets.get_dataset("mnist"), "Known datasets: digits"),
    (lambda: datasets.get_dataset("digits", "validation"), "Unknown split 'validation'"),
    (lambda: datasets.get_dataset("digits", image_size=20), "multiple of 8"),
    (lambda: datasets.get_dataset("even_pixels", image_size=31), "even int"),
    (lambda: datasets.get_dataset("sudoku", image_size=80), "multiple of 72"),
    (lambda: datasets.get_dataset("textures", "test", image_size=256), "does not fit"),
    (lambda: datasets.get_dataset("textures", images=("lena",)), "Unknown texture image"),
    (lambda: datasets.get_dataset("digits", batch_size=3), "Unknown option(s) ['batch_size']"),
    (lambda: datasets.get_dataset("digits", data_dir="/data"), "takes no data_dir"),
    (lambda: datasets.get_dataset("sudoku", num_givens=(5, 90)), "num_givens"),
    (lambda: datasets.get_dataset("even_pixels", num_examples=0), "num_examples must be >= 1"),
    (lambda: datasets.get_dataset("textures", seed=-1), "seed must be >= 0"),
    (lambda: datasets.get_dataset("sudoku", num_examples=-3), "sudoku: num_examples"),
    (lambda: datasets.get_dataset("polygons", image_size=8), "image_size must be an int >= 16"),
    (lambda: datasets.get_dataset("polygons", max_polygons=20), "do not fit"),
    (lambda: datasets.get_dataset("polygons", image_size=32), "below 3.5"),
    (lambda: datasets.get_dataset("polygons", min_polygons=5, max_polygons=3), "min_polygons"),
    (lambda: datasets.get_dataset("polygons", min_vertices=2), "min_vertices"),
    (lambda: datasets.get_dataset("polygons", radius=(0.1, 0.6)), "radius"),
    (lambda: datasets.get_dataset("polygons", radius=(0.1,)), "radius must be (min, max)"),
    (lambda: datasets.get_dataset("polygons", lightness=0.8), "Unknown option(s) ['lightness']"),
    (lambda: datasets.get_dataset("polygons", "val"), "Unknown split 'val'"),
])
def test_bad_input_raises_clear_errors(call, message):
  with pytest.raises(ValueError) as err:
    call()
  assert message in str(err.value)


# ---------------------------------------------------------------- TFDS


def _tiny_imagenet64(data_dir, n_train=13, n_val=4):
  rng = np.random.default_rng(0)
  examples = {
      "train": [dict(image=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), label=int(i % 7))
                for i in range(n_train)],
      "validation": [dict(image=rng.integers(0, 256, (64, 64, 3), dtype=np.uint8), label=3)
                     for _ in range(n_val)],
  }
  tfds_source.write_prepared_dataset("imagenet64", str(data_dir), examples)
  return examples


def test_missing_or_unprepared_data_dir_says_how_to_prepare(tmp_path):
  for data_dir, message in [(None, "data_dir is not set"),
                            (str(tmp_path / "nope"), "does not exist"),
                            (str(tmp_path), "is not prepared")]:
    with pytest.raises(ValueError) as err:
      datasets.get_dataset("imagenet64", "train", data_dir=data_dir)
    assert message in str(err.value)
    assert "tfds build imagenet_resized/64x64" in str(err.value)
    assert "--file_format=array_record" in str(err.value)
  with pytest.raises(ValueError, match="manual download"):
    datasets.get_dataset("imagenet256", data_dir=str(tmp_path))


def test_tfrecord_prepared_dataset_is_rejected_with_conversion_hint(tmp_path):
  import tensorflow_datasets as tfds

  builder = tfds.builder("imagenet_resized/64x64", data_dir=str(tmp_path), file_format="tfrecord")
  builder.info.set_splits(tfds.core.SplitDict([tfds.core.SplitInfo(
      name="train", shard_lengths=[0], num_bytes=0)]))
  builder.data_path.mkdir(parents=True)
  builder.info.write_to_directory(builder.data_dir)
  with pytest.raises(ValueError, match="tfds convert_format"):
    datasets.get_dataset("imagenet64", data_dir=str(tmp_path))


def test_prepared_tfds_dataset_reads_back_exactly_without_tensorflow(tmp_path):
  examples = _tiny_imagenet64(tmp_path)
  src = datasets.get_dataset("imagenet64", "train", data_dir=str(tmp_path))
  assert len(src) == 13 and src.num_classes == 1000 and src.image_shape == (64, 64, 3)
  for i, ex in enumerate(examples["train"]):
    got = src[i]
    np.testing.assert_allclose(got["image"], ex["image"] / 127.5 - 1.0, atol=1e-6)
    assert int(got["label"]) == ex["label"]
  batch = src.__getitems__([4, 0, 12])
  assert [int(b["label"]) for b in batch] == [4 % 7, 0, 12 % 7]
  assert len(datasets.get_dataset("imagenet64", "test", data_dir=str(tmp_path))) == 4
  assert len(datasets.get_dataset("imagenet64", "train[:5]", data_dir=str(tmp_path))) == 5
  # Downsampling 64 -> 32: Pillow's 2x2 box filter, i.e. the mean of each 2x2 block.
  small = datasets.get_dataset("imagenet64", "test", data_dir=str(tmp_path), image_size=32)[1]
  ref = examples["validation"][1]["image"].astype(np.float64).reshape(32, 2, 32, 2, 3).mean((1, 3))
  np.testing.assert_allclose(small["image"], ref / 127.5 - 1.0, atol=1.01 / 127.5)
  with pytest.raises(ValueError, match="Unknown split 'val'"):
    datasets.get_dataset("imagenet64", "val", data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="image_size must be an int in"):
    datasets.get_dataset("imagenet64", data_dir=str(tmp_path), image_size=128)
  assert "tensorflow" not in sys.modules


def test_tfds_mock_data_reads_through_the_source_without_tensorflow(tmp_path):
  import tensorflow_datasets as tfds

  # Real metadata (what `tfds build` writes), records mocked by TFDS.
  _tiny_imagenet64(tmp_path, n_train=1, n_val=1)
  with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_FILES,
                              data_dir=str(tmp_path)):
    src = datasets.get_dataset("imagenet64", "train", data_dir=str(tmp_path))
    raw = tfds.data_source("imagenet_resized/64x64", split="train", data_dir=str(tmp_path),
                           download=False)
    assert len(src) == len(raw) == 12
    for i in range(12):
      ref = raw[i]
      np.testing.assert_array_equal(src[i]["image"],
                                    ref["image"].astype(np.float32) / np.float32(127.5) - 1)
      assert int(src[i]["label"]) == int(ref["label"])
    assert np.ptp(src[3]["image"]) > 1.0  # real random content, not a constant
  assert importlib.util.find_spec("tensorflow") is None and "tensorflow" not in sys.modules
