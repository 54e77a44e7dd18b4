"""Digits: scikit-learn's bundled 8x8 handwritten digits, upsampled (no download).

The 1797 images of `sklearn.datasets.load_digits` (values 0..16) are scaled to
float32 in [-1, 1] (`x / 8 - 1`) and upsampled by pixel repetition (nearest
neighbour) to `image_size` x `image_size`, with labels 0..9.

Hold-out split (fixed forever, independent of any run seed): for every class,
its examples in the order scikit-learn stores them are split 80/20, the last
20% going to `test` (no random number generator involved, so the split cannot
drift with NumPy versions). Train has 1438 images, test 359.
"""

from __future__ import annotations

import functools

import numpy as np

from asyncpatch_jax.runtime import checks

NUM_CLASSES = 10
RAW_SIZE = 8
RAW_MAX = 16.0  # sklearn digits pixel values are integers 0..16
TEST_FRACTION = 0.2
SPLITS = ("train", "test")


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise checks.InputError(f"Unknown split {split!r} for digits; expected one of {SPLITS}.")


@functools.lru_cache(maxsize=1)
def _load_raw() -> tuple[np.ndarray, np.ndarray]:
  """Returns sklearn's digits: images [1797, 8, 8] float32 in 0..16, labels [1797] int32."""
  from sklearn import datasets as sk_datasets  # pylint: disable=g-import-not-at-top

  d = sk_datasets.load_digits()
  images = np.asarray(d.images, np.float32)
  labels = np.asarray(d.target, np.int32)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


@functools.lru_cache(maxsize=2)
def split_indices(split: str) -> np.ndarray:
  """Indices into sklearn's digits array that form `split` (sorted, int64).

  Per class, the last `TEST_FRACTION` of that class's examples are `test`.
  """
  _check_split(split)
  _, labels = _load_raw()
  chosen = []
  for c in range(NUM_CLASSES):
    idx = np.flatnonzero(labels == c)
    n_train = int(round(len(idx) * (1.0 - TEST_FRACTION)))
    chosen.append(idx[:n_train] if split == "train" else idx[n_train:])
  out = np.sort(np.concatenate(chosen)).astype(np.int64)
  out.setflags(write=False)
  return out


def load_split(split: str = "train") -> tuple[np.ndarray, np.ndarray]:
  """Raw-resolution digits of a split.

  Returns:
      images: [N, 8, 8] float32 in [-1, 1]; labels: [N] int32 in 0..9.
  """
  images, labels = _load_raw()
  idx = split_indices(split)
  return images[idx] * (2.0 / RAW_MAX) - 1.0, labels[idx]


def upsample_nearest(images: np.ndarray, factor: int) -> np.ndarray:
  """Nearest-neighbour upsampling of [..., H, W] by an integer factor."""
  return np.repeat(np.repeat(images, factor, axis=-2), factor, axis=-1)


class DigitsSource:
  """Random-access source of digits (grain `RandomAccessDataSource` protocol).

  Each example is `dict(image=[S, S, 1] float32 in [-1, 1], label=int32 ())`
  with `S = image_size`. Materialised once in memory (1438 or 359 images).
  """

  name = "digits"
  num_classes = NUM_CLASSES

  def __init__(self, split: str = "train", image_size: int = 16):
    _check_split(split)
    if (not isinstance(image_size, (int, np.integer)) or image_size < RAW_SIZE
            or image_size % RAW_SIZE):
      raise checks.InputError(
              f"digits: image_size must be a positive multiple of {RAW_SIZE} "
              f"(nearest-neighbour upsampling of 8x8 digits), got {image_size!r}.")
    self.split = split
    self.image_size = int(image_size)
    self.image_shape = (self.image_size, self.image_size, 1)
    raw, labels = load_split(split)
    images = upsample_nearest(raw, self.image_size // RAW_SIZE)[..., None]
    self.images = np.ascontiguousarray(images, np.float32)  # [N, S, S, 1]
    self.labels = np.ascontiguousarray(labels, np.int32)  # [N]
    self.images.setflags(write=False)
    self.labels.setflags(write=False)

  def __len__(self) -> int:
    return len(self.labels)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self.images[index], "label": self.labels[index]}

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self[int(i)] for i in indices]

  def __repr__(self) -> str:
    return f"DigitsSource(split={self.split!r}, image_size={self.image_size})"
