"""Images at the file boundary: PNG grids out, PNG images and masks in (uint8 <-> [-1, 1]).

Paths may be local or gs:// URLs: files are read and written as bytes through
etils.epath (runtime/storage.py), Pillow only encodes and decodes.
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.runtime import multihost
from asyncpatch_jax.runtime import storage


def to_uint8(images) -> np.ndarray:
  """[-1, 1] floats -> uint8 (round to nearest, clipped)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def from_uint8(images) -> np.ndarray:
  """uint8 -> float32 in [-1, 1]; exact inverse of to_uint8 on uint8 values."""
  return np.asarray(images, np.float32) / 127.5 - 1.0


def make_grid(images, ncols: int | None = None, pad: int = 1) -> np.ndarray:
  """[N, H, W, C] in [-1, 1] -> one uint8 grid image [rows*(H+pad)+pad, ..., C]."""
  images = to_uint8(images)
  n, h, w, c = images.shape
  ncols = ncols or int(math.ceil(math.sqrt(n)))
  nrows = int(math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
  for i in range(n):
    r, q = divmod(i, ncols)
    grid[pad + r * (h + pad):pad + r * (h + pad) + h,
         pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
  return grid


def save_png(array: np.ndarray, path, scale: int = 1) -> None:
  """Writes a uint8 [H, W, C] (C = 1 or 3) array as PNG, upscaled by `scale` (nearest).

  path: a local path or a gs:// URL; missing folders are created.
  """
  out = storage.path(path, "image path")
  img = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
  if scale > 1:
    img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
  buf = io.BytesIO()
  img.save(buf, format="PNG")
  out.parent.mkdir(parents=True, exist_ok=True)
  storage.write_bytes_atomic(out, buf.getvalue())


def save_grid(images, path, ncols: int | None = None, scale: int = 1) -> None:
  save_png(make_grid(images, ncols), path, scale)


def display_scale(height: int) -> int:
  """The upscaling of a grid of images `height` pixels high: x4 up to 32 pixels, else 1."""
  return 4 if height <= 32 else 1


def write_grid(images, path, ncols: int | None = None) -> None:
  """The run's grid PNG of `images` [N, H, W, C], at `display_scale(H)`, from process 0 alone.

  Every process computes the images (they may come from a sharded sampler); only process 0
  writes, atomically (`save_png`).
  """
  if multihost.is_writer():
    images = np.asarray(images)
    save_grid(images, path, ncols=ncols, scale=display_scale(images.shape[1]))


# Pillow's single-channel 16- and 32-bit integer modes (a 16-bit grayscale PNG opens as one).
WIDE_GRAY_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def open_image(path, what: str = "image file") -> Image.Image:
  """The image file at `path` (local or gs://), decoded by Pillow.

  InputError if it is missing or is not an image Pillow can decode (e.g. a text file
  named .png, or a truncated file).
  """
  p = storage.check_bucket(path, what)
  if not p.is_file():
    raise checks.InputError(f"{what} {str(path)!r} does not exist.")
  try:
    img = Image.open(io.BytesIO(p.read_bytes()))
    img.load()
  except Image.UnidentifiedImageError:
    raise checks.InputError(f"{what} {str(path)!r} is not an image file (Pillow does not "
                            "recognise its format); give a PNG or JPEG file.") from None
  except (OSError, SyntaxError, ValueError) as e:
    raise checks.InputError(f"{what} {str(path)!r} cannot be decoded ({type(e).__name__}: "
                            f"{' '.join(str(e).split())[:120]}); give an intact PNG or JPEG "
                            "file.") from None
  return img


def _gray_uint8(img: Image.Image, name: str) -> np.ndarray:
  """A 16-bit (or 32-bit integer) grayscale image scaled to uint8: v -> round(v * 255 / 65535)."""
  arr = np.asarray(img).astype(np.int64)
  if arr.min() < 0 or arr.max() > 65535:
    raise checks.InputError(f"image {name!r} (mode {img.mode!r}) has values in "
                            f"[{arr.min()}, {arr.max()}]; expected 8- or 16-bit grayscale.")
  return np.round(arr * (255.0 / 65535.0)).astype(np.uint8)


def load_image(path, shape) -> np.ndarray:
  """A PNG/JPEG as float32 [H, W, C] in [-1, 1]; InputError if its size or channels differ.

  8-bit grayscale, palette and RGB(A) images are accepted for their channel count; a
  16-bit grayscale PNG is scaled to 8 bits (65535 -> 255) for a grayscale model.
  """
  h, w, c = shape
  name = str(path)
  img = open_image(path)
  if img.mode not in (("L", "P", "1", "LA") + WIDE_GRAY_MODES if c == 1 else
                      ("RGB", "RGBA", "P")):
    raise checks.InputError(f"image {name!r} has mode {img.mode!r}; the model expects {c} "
                            f"channel{'s' if c > 1 else ''} "
                            f"({'grayscale' if c == 1 else 'RGB'}).")
  if img.mode in WIDE_GRAY_MODES:
    arr = _gray_uint8(img, name)
  else:
    arr = np.asarray(img.convert("L" if c == 1 else "RGB"))
  if arr.shape[:2] != (h, w):
    raise checks.InputError(f"image {name!r} is {arr.shape[1]}x{arr.shape[0]} (WxH); "
                            f"expected {w}x{h}.")
  return from_uint8(arr.reshape(h, w, c))


def load_mask(path, hw) -> np.ndarray:
  """A mask PNG as float32 [H, W]: white (255) or 1 = known, black (0) = generate."""
  name = str(path)
  img = open_image(path, "mask file")
  if img.mode in WIDE_GRAY_MODES:
    arr = np.asarray(img).astype(np.int64)
    arr = np.where(arr == 65535, 255, arr)     # a 16-bit white is the mask's 255
  else:
    arr = np.asarray(img.convert("L"))
  if arr.shape != tuple(hw):
    raise checks.InputError(f"mask {name!r} is {arr.shape[1]}x{arr.shape[0]} (WxH); "
                            f"expected {hw[1]}x{hw[0]}.")
  values = np.unique(arr)
  if set(values.tolist()) <= {0, 255}:
    return (arr == 255).astype(np.float32)
  if set(values.tolist()) <= {0, 1}:
    return arr.astype(np.float32)
  raise checks.InputError(f"mask {name!r} has values {values[:6].tolist()}...; a mask must be "
                          "binary: 255 (or 1) = known pixel, 0 = pixel to generate.")
