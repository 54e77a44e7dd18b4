"""Even Pixels: two-colour images with exactly half the pixels of each colour.

IPR (Kang, Yoon, Ahn) Appendix C.4, after Wewer et al. (2025, SRM):
  * colours in HSV: base hue h1 ~ U[0, 0.5), second hue h2 = h1 + 0.5 (180
    degrees apart); saturation S = 1.0 and value V = 0.7 constant over the image;
  * a random binary mask M with sum(M) = H * W / 2 (512 for the paper's 32x32):
    pixels with M = 0 get h1, pixels with M = 1 get h2.
Example `i` of a split is a pure function of `(seed, split, i)`, generated on
demand, so the split's (virtual) length costs no memory.

The ground-truth rule (C.4.3) is `even_pixels_stats` / `even_pixels_valid`: hue
histogram (256 bins), the two most prominent peaks p1, p2, decision boundaries
b1 = (p1 + p2) / 2 and b2 = (p1 + p2 + 256) / 2 mod 256 (Eq. 6, integer
division), count N_c1 of the pixels whose hue bin lies between them
([min(b1, b2), max(b1, b2)), which holds exactly one peak); an image is balanced iff
|N_c1 - H W / 2| = 0 ("Balance Accuracy" is the fraction of balanced images).
"""

from __future__ import annotations

import colorsys

import numpy as np

from asyncpatch_jax.runtime import checks

SPLITS = ("train", "test")
DEFAULT_NUM_EXAMPLES = {"train": 60_000, "test": 10_000}
DEFAULT_SATURATION = 1.0
DEFAULT_VALUE = 0.7
NUM_HUE_BINS = 256
_SPLIT_ID = {"train": 0, "test": 1}


class EvenPixelsSource:
  """Random-access source of Even Pixels images (grain `RandomAccessDataSource`).

  Each example is `dict(image=[S, S, 3] float32 in [-1, 1])`, `S = image_size`
  (32 in the paper). No label.
  """

  name = "even_pixels"
  num_classes = None

  def __init__(self, split: str = "train", image_size: int = 32, num_examples: int | None = None,
               seed: int = 0, saturation: float = DEFAULT_SATURATION,
               value: float = DEFAULT_VALUE):
    if split not in SPLITS:
      raise checks.InputError(f"Unknown split {split!r} for even_pixels; expected one of {SPLITS}.")
    if not isinstance(image_size, (int, np.integer)) or image_size < 2 or image_size % 2:
      raise checks.InputError(
          f"even_pixels: image_size must be an even int >= 2 (half the pixels per colour), "
          f"got {image_size!r}.")
    num_examples = checks.check_dataset_size("even_pixels", num_examples, DEFAULT_NUM_EXAMPLES,
                                             split, seed)
    if not (0.0 < saturation <= 1.0 and 0.0 < value <= 1.0):
      raise checks.InputError(f"even_pixels: saturation and value must lie in (0, 1], got "
                       f"{saturation}, {value}.")
    self.split = split
    self.image_size = int(image_size)
    self.image_shape = (self.image_size, self.image_size, 3)
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self.saturation = float(saturation)
    self.value = float(value)

  def __len__(self) -> int:
    return self.num_examples

  def example_params(self, index: int) -> tuple[float, np.ndarray]:
    """(h1, M) of example `index`: base hue in [0, 0.5) and mask M [S, S] bool."""
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], int(index)])
    h1 = float(rng.uniform(0.0, 0.5))
    n = self.image_size * self.image_size
    mask = np.zeros(n, bool)
    mask[rng.permutation(n)[: n // 2]] = True
    return h1, mask.reshape(self.image_size, self.image_size)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    h1, mask = self.example_params(int(index))
    c1 = colorsys.hsv_to_rgb(h1, self.saturation, self.value)
    c2 = colorsys.hsv_to_rgb(h1 + 0.5, self.saturation, self.value)
    rgb = np.where(mask[..., None], np.asarray(c2), np.asarray(c1))  # [S, S, 3] in [0, 1]
    return {"image": (rgb * 2.0 - 1.0).astype(np.float32)}

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self[int(i)] for i in indices]

  def __repr__(self) -> str:
    return (f"EvenPixelsSource(split={self.split!r}, image_size={self.image_size}, "
            f"num_examples={self.num_examples}, seed={self.seed}, "
            f"saturation={self.saturation}, value={self.value})")


def _to_hsv(images: np.ndarray) -> np.ndarray:
  """[B, H, W, 3] in [-1, 1] -> HSV [B, H, W, 3] in [0, 1] (clipped, like the benchmark)."""
  from skimage import color  # pylint: disable=g-import-not-at-top

  images = np.asarray(images, np.float64)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise checks.InputError(f"Even Pixels images must be [B, H, W, 3], got shape {images.shape}.")
  if (images.shape[1] * images.shape[2]) % 2:
    raise checks.InputError(f"Even Pixels images need an even pixel count, got {images.shape[1:3]}.")
  rgb = np.clip((images + 1.0) / 2.0, 0.0, 1.0)
  return color.rgb2hsv(rgb, channel_axis=-1)


def even_pixels_stats(images: np.ndarray, num_bins: int = NUM_HUE_BINS,
                      second_peak: str = "search") -> dict[str, np.ndarray]:
  """Per-image Even Pixels evaluation (IPR App. C.4.3, Eq. 6).

  Args:
    images: [B, H, W, 3] RGB in [-1, 1] (clipped to the range first).
    num_bins: hue histogram bins (256 in the paper).
    second_peak: how p2 is found. "search" (the paper's text): the highest
      bin at circular distance > num_bins / 4 from the highest bin p1.
      "antipodal" (the SRM benchmark code): p2 = p1 + num_bins / 2.

  Returns:
    dict of [B] arrays: `count_error` |N_c1 - H W / 2| (int64), `balanced`
    (count_error == 0), `saturation_std` and `value_std` (std over all
    pixels of the image; both colours share S and V by construction).
  """
  if second_peak not in ("search", "antipodal"):
    raise checks.InputError(f"second_peak must be 'search' or 'antipodal', got {second_peak!r}.")
  if num_bins < 4 or num_bins % 2:
    raise checks.InputError(f"num_bins must be an even int >= 4, got {num_bins}.")
  hsv = _to_hsv(images)
  b = hsv.shape[0]
  n_pix = hsv.shape[1] * hsv.shape[2]
  hue_bin = np.minimum((hsv[..., 0] * num_bins).astype(np.int64), num_bins - 1).reshape(b, -1)
  hist = np.stack([np.bincount(row, minlength=num_bins) for row in hue_bin])  # [B, num_bins]
  p1 = hist.argmax(axis=1)
  if second_peak == "antipodal":
    p2 = (p1 + num_bins // 2) % num_bins
  else:
    bins = np.arange(num_bins)
    d = np.abs(bins[None, :] - p1[:, None])
    circ = np.minimum(d, num_bins - d)
    p2 = np.where(circ > num_bins // 4, hist, -1).argmax(axis=1)
  lo, hi = np.minimum(p1, p2), np.maximum(p1, p2)
  b1 = (lo + hi) // 2
  b2 = ((lo + hi + num_bins) // 2) % num_bins
  start, stop = np.minimum(b1, b2), np.maximum(b1, b2)
  cum = np.concatenate([np.zeros((b, 1), np.int64), np.cumsum(hist, axis=1)], axis=1)
  rows = np.arange(b)
  n_c1 = cum[rows, stop] - cum[rows, start]
  count_error = np.abs(n_c1 - n_pix // 2)
  return {
      "count_error": count_error,
      "balanced": count_error == 0,
      "saturation_std": hsv[..., 1].reshape(b, -1).std(axis=1),
      "value_std": hsv[..., 2].reshape(b, -1).std(axis=1),
  }


def even_pixels_valid(images: np.ndarray, **kwargs) -> np.ndarray:
  """[B] bool: the image's two hue clusters hold exactly half the pixels each."""
  return even_pixels_stats(images, **kwargs)["balanced"]
