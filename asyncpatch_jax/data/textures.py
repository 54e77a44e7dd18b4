"""Textures: random crops of scikit-image's bundled photos and textures (no download).

The source images ship inside the scikit-image wheel (`skimage/data/*.png|jpg`)
and load offline. Grayscale textures (brick, grass, gravel) are replicated to
three channels. Every image is split by rows: crops for `train` lie entirely
in its top 80% of rows, crops for `test` entirely in its bottom 20%, so the two
splits never share a pixel.

Example `i` of a split is a pure function of `(seed, split, i)`: the image
(uniform over `images`, also returned as `label`) and the crop's top-left
corner (uniform over the valid positions of that split's band). The split has a
fixed virtual length `num_examples`; crops are cut on demand, so memory holds
only the source images (a few MB).
"""

from __future__ import annotations

import functools

import numpy as np

from asyncpatch_jax.runtime import checks

DEFAULT_IMAGES = ("brick", "grass", "gravel", "astronaut", "coffee", "chelsea", "rocket")
# Bundled in scikit-image's wheel (checked offline in tests/test_datasets.py).
BUNDLED_IMAGES = DEFAULT_IMAGES + (
    "camera", "moon", "coins", "hubble_deep_field", "immunohistochemistry", "retina", "cat")
TRAIN_FRACTION = 0.8
SPLITS = ("train", "test")
DEFAULT_NUM_EXAMPLES = {"train": 50_000, "test": 5_000}
_SPLIT_ID = {"train": 0, "test": 1}


@functools.lru_cache(maxsize=None)
def load_image(name: str) -> np.ndarray:
  """A bundled scikit-image image as uint8 [H, W, 3] (grayscale replicated)."""
  if name not in BUNDLED_IMAGES:
    raise checks.InputError(
        f"Unknown texture image {name!r}; bundled images are {BUNDLED_IMAGES}.")
  import skimage.data  # pylint: disable=g-import-not-at-top

  img = np.asarray(getattr(skimage.data, name)())
  if img.dtype != np.uint8:
    raise checks.InputError(f"skimage.data.{name}() is {img.dtype}, expected uint8.")
  if img.ndim == 2:
    img = np.repeat(img[..., None], 3, axis=-1)
  img = np.ascontiguousarray(img[..., :3])
  img.setflags(write=False)
  return img


def split_rows(height: int, split: str) -> tuple[int, int]:
  """Row band [r0, r1) of an image of `height` rows that `split` crops from."""
  cut = int(height * TRAIN_FRACTION)
  return (0, cut) if split == "train" else (cut, height)


class TexturesSource:
  """Random-access source of texture/photo crops (grain `RandomAccessDataSource`).

  Each example is `dict(image=[S, S, 3] float32 in [-1, 1], label=int32 ())`,
  `S = image_size`, `label` = index of the source image in `images`.
  """

  name = "textures"

  def __init__(self, split: str = "train", image_size: int = 32, num_examples: int | None = None,
               seed: int = 0, images: tuple[str, ...] = DEFAULT_IMAGES):
    if split not in SPLITS:
      raise checks.InputError(f"Unknown split {split!r} for textures; expected one of {SPLITS}.")
    images = tuple(images)
    if not images:
      raise checks.InputError("textures: `images` must name at least one bundled image.")
    self._pixels = [load_image(n) for n in images]
    checks.check_positive_int(image_size, "textures: image_size")
    for n, img in zip(images, self._pixels):
      r0, r1 = split_rows(img.shape[0], split)
      if image_size > min(r1 - r0, img.shape[1]):
        raise checks.InputError(
            f"textures: image_size={image_size} does not fit the {split!r} band of "
            f"{n!r} ({r1 - r0} rows x {img.shape[1]} columns); use a smaller crop.")
    num_examples = checks.check_dataset_size("textures", num_examples, DEFAULT_NUM_EXAMPLES,
                                             split, seed)
    self.split = split
    self.image_size = int(image_size)
    self.image_shape = (self.image_size, self.image_size, 3)
    self.images = images
    self.num_classes = len(images)
    self.num_examples = int(num_examples)
    self.seed = int(seed)

  def __len__(self) -> int:
    return self.num_examples

  def crop_params(self, index: int) -> tuple[int, int, int]:
    """(image id, top row, left column) of example `index`."""
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], int(index)])
    k = int(rng.integers(len(self._pixels)))
    h, w, _ = self._pixels[k].shape
    r0, r1 = split_rows(h, self.split)
    s = self.image_size
    y = int(rng.integers(r0, r1 - s + 1))
    x = int(rng.integers(0, w - s + 1))
    return k, y, x

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    k, y, x = self.crop_params(int(index))
    s = self.image_size
    crop = self._pixels[k][y:y + s, x:x + s]
    image = crop.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    return {"image": image, "label": np.int32(k)}

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self[int(i)] for i in indices]

  def __repr__(self) -> str:
    return (f"TexturesSource(split={self.split!r}, image_size={self.image_size}, "
            f"num_examples={self.num_examples}, seed={self.seed}, images={self.images!r})")
