"""Dataset registry: `get_dataset(name, split, ...)` returns a random-access source.

A source follows grain's `RandomAccessDataSource` protocol (`__len__`,
`__getitem__(i) -> dict of NumPy arrays`, a stable `__repr__`) and carries
`name`, `split`, `image_shape` ([H, W, C]) and `num_classes` (None if
unlabelled). Images are float32 [H, W, C] in [-1, 1]; `label` (int32) is
present iff `num_classes` is not None.

Embedded, no download:
  digits       sklearn 8x8 digits upsampled to 16x16x1, labels 0..9 (1438 / 359)
  textures     32x32x3 crops of scikit-image's bundled photos and textures
  even_pixels  IPR App. C.4 two-colour 32x32x3 images, half the pixels per colour
  sudoku       72x72x1 grids of 8x8 digits forming valid Sudokus, given-cell mask
               (option grid_size=4: 32x32x1 4x4 grids with 2x2 boxes, digits 1..4)
  polygons     IPR App. C.3 Counting Polygons, 128x128x3: 1..9 regular polygons (3..7
               vertices) on white, label = the number of polygons (option image_size=32)
From a prepared TFDS data_dir (see `tfds_source.py`):
  imagenet64, imagenet256, lsun_bedroom, celeba_hq
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Protocol

from asyncpatch_jax.runtime import checks

# name -> (module, class). Modules are imported on first use so that importing
# this package pulls in neither scikit-learn, scikit-image nor TFDS.
_EMBEDDED = {
    "digits": ("digits", "DigitsSource"),
    "textures": ("textures", "TexturesSource"),
    "even_pixels": ("even_pixels", "EvenPixelsSource"),
    "sudoku": ("sudoku", "SudokuSource"),
    "polygons": ("polygons", "PolygonsSource"),
}
_TFDS = ("imagenet64", "imagenet256", "lsun_bedroom", "celeba_hq")
EMBEDDED_DATASETS = tuple(_EMBEDDED)
TFDS_DATASETS = _TFDS
DATASETS = EMBEDDED_DATASETS + TFDS_DATASETS


class Source(Protocol):
  """What the input pipeline consumes (grain `RandomAccessDataSource` protocol)."""

  name: str
  split: str
  image_shape: tuple[int, int, int]
  num_classes: int | None

  def __len__(self) -> int: ...

  def __getitem__(self, index: int) -> dict[str, Any]: ...


def _unknown_name_error(name: str) -> checks.InputError:
  return checks.InputError(f"Unknown dataset {name!r}.{checks.did_you_mean(name, DATASETS)} "
                    f"Known datasets: {', '.join(DATASETS)}.")


def get_dataset(name: str, split: str = "train", *, data_dir: str | None = None,
                **kwargs) -> Source:
  """Builds the random-access source of dataset `name`, split 'train' or 'test'.

  Args:
    name: one of `DATASETS`.
    split: 'train' or 'test' (TFDS datasets also take TFDS split strings).
    data_dir: prepared TFDS data directory (TFDS-backed datasets only).
    **kwargs: options of the dataset's source class, e.g. `image_size`,
      `seed` and `num_examples` for the generated ones, `num_givens` for
      sudoku, `images` for textures.

  Raises:
    ValueError: unknown name (with close matches), unknown split or option,
      unsupported image_size, missing or unprepared data_dir (with the
      command that prepares it). All before any compilation.
  """
  if name in _EMBEDDED:
    module, cls_name = _EMBEDDED[name]
    cls = getattr(importlib.import_module(f"asyncpatch_jax.data.{module}"), cls_name)
    if data_dir:
      raise checks.InputError(f"Dataset {name!r} is embedded and takes no data_dir "
                       f"(got {data_dir!r}).")
  elif name in _TFDS:
    from asyncpatch_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

    cls = tfds_source.TfdsSource
    kwargs = dict(kwargs, name=name, data_dir=data_dir)
  else:
    raise _unknown_name_error(name)
  params = inspect.signature(cls.__init__).parameters
  allowed = [p for p in params if p not in ("self", "name", "split", "data_dir")]
  unknown = sorted(set(kwargs) - set(allowed) - {"name", "data_dir"})
  if unknown:
    raise checks.InputError(f"Unknown option(s) {unknown} for dataset {name!r}; "
                     f"it accepts {allowed}.")
  return cls(split=split, **kwargs)
