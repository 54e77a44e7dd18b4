"""Digit Sudoku: 9x9 grids of bundled 8x8 digit images forming a valid Sudoku.

The MNIST-Sudoku benchmark of SRM (Wewer et al., 2025) as used by IPR
(papers/004, Section 4.2 and Appendix C.2), with scikit-learn's bundled 8x8
digits in place of 28x28 MNIST so that it needs no download: each of the 81
cells shows an image of its digit 1..9 (the digit-0 images are not used), the
grid is a valid Sudoku solution (every row, column and 3x3 box holds 1..9
once), and a random subset of cells is given. The HARD setting of the paper
(the default) draws the number of givens uniformly from {0, ..., 26} and their
positions uniformly from the 81 cells.

Solutions are random validity-preserving transforms of one base solution:
digit relabelling, row permutations within bands, band permutations, column
permutations within stacks, stack permutations and transposition. Example `i`
of a split is a pure function of `(seed, split, i)`, built on demand; cell
images for `train` come from the digits train split and for `test` from the
held-out digits (see `datasets/digits.py`).
"""

from __future__ import annotations

import numpy as np

from asyncpatch_jax import checks
from asyncpatch_jax.data import digits as digits_lib

GRID = 9
CELL = digits_lib.RAW_SIZE  # 8
SPLITS = ("train", "test")
DEFAULT_NUM_EXAMPLES = {"train": 60_000, "test": 10_000}
HARD_GIVENS = (0, 26)  # IPR App. C.2.2: N_hint ~ U{0, ..., 26}
_SPLIT_ID = {"train": 0, "test": 1}


def base_solution() -> np.ndarray:
  """The classic pattern solution, [9, 9] int32 with entries 1..9."""
  r = np.arange(GRID)[:, None]
  c = np.arange(GRID)[None, :]
  return ((3 * (r % 3) + r // 3 + c) % GRID + 1).astype(np.int32)


def random_solution(rng: np.random.Generator) -> np.ndarray:
  """A random valid Sudoku solution [9, 9] int32 (validity-preserving transforms)."""
  g = base_solution()
  g = rng.permutation(GRID).astype(np.int32)[g - 1] + 1  # relabel digits

  def line_order():  # a band (stack) order, then an order inside each
    bands = rng.permutation(3)
    return np.concatenate([3 * b + rng.permutation(3) for b in bands])

  g = g[line_order()][:, line_order()]
  if rng.integers(2):
    g = g.T
  return np.ascontiguousarray(g)


def sudoku_valid(grid: np.ndarray) -> np.ndarray:
  """Sudoku rule check (IPR App. C.2.3): every row, column and 3x3 box holds 1..9 once.

  Args:
    grid: [..., 9, 9] integer digits (e.g. the cell classifier's predictions).
  Returns:
    [...] bool.
  """
  grid = np.asarray(grid)
  if grid.shape[-2:] != (GRID, GRID):
    raise checks.InputError(f"sudoku grid must be [..., 9, 9], got shape {grid.shape}.")
  lead = grid.shape[:-2]
  boxes = grid.reshape(lead + (3, 3, 3, 3)).swapaxes(-3, -2).reshape(lead + (GRID, GRID))
  target = np.arange(1, GRID + 1)
  ok = np.ones(lead, bool)
  for units in (grid, np.swapaxes(grid, -1, -2), boxes):
    ok &= np.all(np.sort(units, axis=-1) == target, axis=(-2, -1))
  return ok


def grid_cells(images: np.ndarray, cell_size: int = CELL) -> np.ndarray:
  """Cuts grid images [..., 9c, 9c, C] into cells [..., 9, 9, c, c, C] (for a cell classifier)."""
  images = np.asarray(images)
  h, w, ch = images.shape[-3:]
  if h != GRID * cell_size or w != GRID * cell_size:
    raise checks.InputError(f"sudoku images must be [..., {GRID * cell_size}, {GRID * cell_size}, C], "
                     f"got shape {images.shape}.")
  lead = images.shape[:-3]
  x = images.reshape(lead + (GRID, cell_size, GRID, cell_size, ch))
  return np.moveaxis(x, -4, -3)


def cell_mask_to_pixels(cell_mask: np.ndarray, cell_size: int = CELL) -> np.ndarray:
  """[..., 9, 9] cell mask -> [..., 9c, 9c] pixel mask (m = 1 known)."""
  return np.repeat(np.repeat(cell_mask, cell_size, axis=-2), cell_size, axis=-1)


class SudokuSource:
  """Random-access source of Digit Sudoku grids (grain `RandomAccessDataSource`).

  Each example is a dict:
    image:     [72, 72, 1] float32 in [-1, 1] (cell size 8; `image_size` a
               multiple of 72 upsamples by pixel repetition),
    solution:  [9, 9] int32, the digits 1..9 shown in the cells,
    cell_mask: [9, 9] float32, 1 = given cell,
    mask:      [S, S] float32 pixel mask, 1 = pixel of a given cell (SPEC: m = 1 known).
  """

  name = "sudoku"
  num_classes = None

  def __init__(self, split: str = "train", image_size: int = GRID * CELL,
               num_examples: int | None = None, seed: int = 0,
               num_givens: int | tuple[int, int] = HARD_GIVENS):
    if split not in SPLITS:
      raise checks.InputError(f"Unknown split {split!r} for sudoku; expected one of {SPLITS}.")
    if (not isinstance(image_size, (int, np.integer)) or image_size < GRID * CELL
            or image_size % (GRID * CELL)):
      raise checks.InputError(f"sudoku: image_size must be a positive multiple of {GRID * CELL} "
                       f"(9 cells of 8x8 digits), got {image_size!r}.")
    lo, hi = (num_givens, num_givens) if np.isscalar(num_givens) else tuple(num_givens)
    if not 0 <= lo <= hi <= GRID * GRID:
      raise checks.InputError(f"sudoku: num_givens must be an int or (lo, hi) with "
                       f"0 <= lo <= hi <= 81, got {num_givens!r}.")
    num_examples = checks.check_dataset_size("sudoku", num_examples, DEFAULT_NUM_EXAMPLES,
                                             split, seed)
    self.split = split
    self.image_size = int(image_size)
    self.cell_size = self.image_size // GRID
    self.image_shape = (self.image_size, self.image_size, 1)
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self.num_givens = (int(lo), int(hi))
    raw, labels = digits_lib.load_split(split)  # [N, 8, 8] in [-1, 1]
    cells = digits_lib.upsample_nearest(raw, self.cell_size // CELL).astype(np.float32)
    # Pool of cell images per digit 1..9 (index d - 1); digit-0 images unused.
    self._pool = [cells[labels == d] for d in range(1, GRID + 1)]

  def __len__(self) -> int:
    return self.num_examples

  def example_params(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(solution [9, 9], pool index of each cell's image [9, 9], cell_mask [9, 9] bool)."""
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], int(index)])
    solution = random_solution(rng)
    sizes = np.array([len(p) for p in self._pool])
    pick = rng.integers(0, sizes[solution - 1])  # per cell, uniform within its digit's pool
    n_given = int(rng.integers(self.num_givens[0], self.num_givens[1] + 1))
    cell_mask = np.zeros(GRID * GRID, bool)
    cell_mask[rng.permutation(GRID * GRID)[:n_given]] = True
    return solution, pick, cell_mask.reshape(GRID, GRID)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    solution, pick, cell_mask = self.example_params(int(index))
    c = self.cell_size
    cells = np.stack([self._pool[d - 1][k] for d, k in zip(solution.ravel(), pick.ravel())])
    image = cells.reshape(GRID, GRID, c, c).swapaxes(1, 2).reshape(GRID * c, GRID * c)
    cell_mask = cell_mask.astype(np.float32)
    return {
        "image": image[..., None].astype(np.float32),
        "solution": solution.astype(np.int32),
        "cell_mask": cell_mask,
        "mask": cell_mask_to_pixels(cell_mask, c),
    }

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self[int(i)] for i in indices]

  def __repr__(self) -> str:
    return (f"SudokuSource(split={self.split!r}, image_size={self.image_size}, "
            f"num_examples={self.num_examples}, seed={self.seed}, "
            f"num_givens={self.num_givens})")
