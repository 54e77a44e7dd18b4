"""Constraint metrics of the IPR benchmarks: Sudoku validity and Even Pixels balance / spread.

IPR App. C.2.3 and C.4.3, after SRM (Wewer et al. 2025):

  Sudoku validity   each cell of a generated grid is read by a digit classifier (here the
                    in-project one, evaluation/digit_classifier.py, trained on the bundled
                    digits' train split; the benchmark's pretrained MNIST CNN is not
                    available offline), restricted to the digits 1..n of the grid; a grid is
                    valid iff every row, column and box holds each digit once
                    (`data.sudoku.sudoku_valid`). Validity rate = share of valid grids.
  Even Pixels       balance accuracy = share of images whose hue clusters hold exactly half
                    the pixels each (`data.even_pixels.even_pixels_stats`, Eq. 6; `antipodal`
                    second peak as the SRM benchmark code, `search` as the paper's text),
                    the mean pixel-count error |N_c1 - HW/2|, and the saturation / value
                    spread: the per-image standard deviation of S and V over all pixels,
                    averaged over images (the benchmark code's `saturation_std`, `value_std`;
                    0 for a perfect two-colour image, whose colours share S and V).
  Counting Polygons count accuracy = share of images whose polygon count, read exactly
                    (evaluation/polygon_count.py: 8-connected components of ink), equals the
                    condition (the class label: the number of polygons asked for; the paper's
                    Number Match Accuracy compares the count with a digit the model drew);
                    vertex uniformity = share of images whose polygons all read the same
                    number of vertices; the mean |count - label|.
"""

from __future__ import annotations

import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.data import even_pixels as even_pixels_lib
from asyncpatch_jax.data import sudoku as sudoku_lib
from asyncpatch_jax.evaluation import digit_classifier
from asyncpatch_jax.evaluation import polygon_count

CLASSIFIER_SIZE = 16   # the in-project classifier reads 16x16 digits (data/digits.py)


def cells_for_classifier(images: np.ndarray, grid_size: int) -> np.ndarray:
  """Grid images [B, nc, nc, 1] -> cells [B * n * n, 16, 16, 1] in [-1, 1], row-major.

  A cell of c pixels is brought to the classifier's 16 pixels by pixel repetition (c
  divides 16: the 8x8 cells of the embedded grids become exactly the 16x16 images of the
  digits dataset) or by block averaging (16 divides c). Values are clipped to [-1, 1].
  """
  images = np.asarray(images, np.float32)
  checks.check_image(images, "sudoku images")
  n = sudoku_lib.check_grid_size(grid_size)
  b, h, w, ch = images.shape
  if ch != 1 or h != w or h % n:
    raise checks.InputError(f"sudoku images must be [B, S, S, 1] with S a multiple of {n}, got "
                            f"shape {images.shape}.")
  c = h // n
  if CLASSIFIER_SIZE % c and c % CLASSIFIER_SIZE:
    raise checks.InputError(f"cell size {c} must divide {CLASSIFIER_SIZE} or be a multiple of "
                            f"it (the cell classifier reads {CLASSIFIER_SIZE}x{CLASSIFIER_SIZE}).")
  cells = sudoku_lib.grid_cells(np.clip(images, -1.0, 1.0), c, n)   # [B, n, n, c, c, 1]
  cells = cells.reshape(b * n * n, c, c, 1)
  if c <= CLASSIFIER_SIZE:
    k = CLASSIFIER_SIZE // c
    return np.repeat(np.repeat(cells, k, axis=1), k, axis=2)
  k = c // CLASSIFIER_SIZE
  return cells.reshape(-1, CLASSIFIER_SIZE, k, CLASSIFIER_SIZE, k, 1).mean(axis=(2, 4))


def read_grids(classifier_params, images: np.ndarray, grid_size: int,
               batch_size: int = 4096) -> np.ndarray:
  """The digits the classifier reads in every cell: [B, n, n] int32 in 1..n.

  Each cell is the digit d in 1..n with the highest class probability (IPR App. C.2.3: map
  each cell to d in {1, ..., 9}; for the 4x4 variant d in {1, ..., 4}).
  """
  n = sudoku_lib.check_grid_size(grid_size)
  cells = cells_for_classifier(images, n)
  probs = np.concatenate([np.asarray(digit_classifier.classify(classifier_params,
                                                                cells[i:i + batch_size]))
                          for i in range(0, len(cells), batch_size)])
  digits = np.argmax(probs[:, 1:n + 1], axis=-1) + 1
  return digits.reshape(-1, n, n).astype(np.int32)


def sudoku_validity(classifier_params, images: np.ndarray, grid_size: int) -> dict:
  """Per-image Sudoku validity of generated grids (IPR App. C.2.3).

  Returns dict(valid=[B] bool, grids=[B, n, n] the digits read, rate=float).
  """
  grids = read_grids(classifier_params, images, grid_size)
  valid = sudoku_lib.sudoku_valid(grids)
  return {"valid": valid, "grids": grids, "rate": float(valid.mean())}


def even_pixels_metrics(images: np.ndarray) -> dict[str, float]:
  """Even Pixels scores of images [B, H, W, 3] in [-1, 1] (IPR Sec. 4.4, App. C.4.3).

  Returns floats: balance_accuracy (antipodal second peak, the benchmark code),
  balance_accuracy_search (the paper's text), mean_count_error (antipodal), and
  saturation_std / value_std (per-image std over pixels, averaged over images).
  """
  anti = even_pixels_lib.even_pixels_stats(images, second_peak="antipodal")
  search = even_pixels_lib.even_pixels_stats(images, second_peak="search")
  return {
      "balance_accuracy": float(anti["balanced"].mean()),
      "balance_accuracy_search": float(search["balanced"].mean()),
      "mean_count_error": float(anti["count_error"].mean()),
      "saturation_std": float(anti["saturation_std"].mean()),
      "value_std": float(anti["value_std"].mean()),
  }


def polygons_metrics(images: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """Counting Polygons scores of images [B, H, W, 3] in [-1, 1] asked for `labels` [B]
  polygons (IPR Sec. 4.3, App. C.3.3, with the count as the condition).

  Returns floats: count_accuracy (read count == label: the validity), mean_count_error
  (mean |count - label|), vertex_uniformity (all polygons of an image read the same V).
  """
  labels = np.asarray(labels)
  if labels.shape != (np.shape(images)[0],):
    raise checks.InputError(f"labels has shape {labels.shape}; expected [{np.shape(images)[0]}] "
                            "(one polygon count per image).")
  read = polygon_count.read_polygons(images)
  return {
      "count_accuracy": float(np.mean(read["count"] == labels)),
      "mean_count_error": float(np.mean(np.abs(read["count"] - labels))),
      "vertex_uniformity": float(np.mean(read["uniform"])),
  }
