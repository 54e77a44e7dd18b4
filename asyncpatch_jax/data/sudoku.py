"""Digit Sudoku: 9x9 (or 4x4) grids of bundled 8x8 digit images forming a valid Sudoku.

The MNIST-Sudoku benchmark of SRM (Wewer et al., 2025) as used by IPR
(IPR, Kang, Yoon, Ahn, Sec. 4.2 and App. C.2), with scikit-learn's bundled 8x8
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

The 4x4 variant (`grid_size=4`, for CPU budgets): 2x2 boxes, digits 1..4, 32x32 images
of 8x8 cells, the same rules, solutions uniform over all 288 valid 4x4 grids, and
HARD-style givens in the same proportion
of the cells: N_hint ~ U{0, ..., floor(26 * 16 / 81)} = U{0, ..., 5} (`hard_givens`).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.data import digits as digits_lib

GRID = 9
GRID_SIZES = (4, 9)           # n x n grids of sqrt(n) x sqrt(n) boxes
CELL = digits_lib.RAW_SIZE  # 8
SPLITS = ("train", "test")
DEFAULT_NUM_EXAMPLES = {"train": 60_000, "test": 10_000}
HARD_GIVENS = (0, 26)  # IPR App. C.2.2: N_hint ~ U{0, ..., 26}
_SPLIT_ID = {"train": 0, "test": 1}


def check_grid_size(grid_size) -> int:
  """The side n of an n x n Sudoku (one of GRID_SIZES); InputError otherwise."""
  if not isinstance(grid_size, (int, np.integer)) or int(grid_size) not in GRID_SIZES:
    raise checks.InputError(f"sudoku: grid_size must be one of {GRID_SIZES} (9: the classic "
                            f"9x9 grid; 4: the 4x4 variant with 2x2 boxes), got {grid_size!r}.")
  return int(grid_size)


def box_size(grid_size: int) -> int:
  """sqrt(n): the side of a box of an n x n Sudoku."""
  return int(round(np.sqrt(grid_size)))


def hard_givens(grid_size: int = GRID) -> tuple[int, int]:
  """The HARD setting's range of givens (IPR App. C.2.2: 0..26 of 81), scaled to n x n cells."""
  return (HARD_GIVENS[0], (HARD_GIVENS[1] * grid_size * grid_size) // (GRID * GRID))


def base_solution(grid_size: int = GRID) -> np.ndarray:
  """The classic pattern solution, [n, n] int32 with entries 1..n."""
  b = box_size(grid_size)
  r = np.arange(grid_size)[:, None]
  c = np.arange(grid_size)[None, :]
  return ((b * (r % b) + r // b + c) % grid_size + 1).astype(np.int32)


@functools.lru_cache(maxsize=1)
def all_4x4_solutions() -> np.ndarray:
  """Every valid 4x4 Sudoku, [288, 4, 4] int32, by depth-first search over rows."""
  rows = [np.array(p, np.int32) for p in itertools.permutations(range(1, 5))]
  found = []

  def extend(grid):
    if len(grid) == 4:
      found.append(np.stack(grid))
      return
    for row in rows:
      cols_ok = all(not np.any(row == g) for g in grid)   # no digit twice in a column
      box_ok = len(grid) % 2 == 0 or all(                 # second row of a band: boxes
          set(row[2 * k:2 * k + 2]).isdisjoint(grid[-1][2 * k:2 * k + 2]) for k in range(2))
      if cols_ok and box_ok:
        extend(grid + [row])

  extend([])
  out = np.stack(found)
  out.setflags(write=False)
  return out


def random_solution(rng: np.random.Generator, grid_size: int = GRID) -> np.ndarray:
  """A random valid Sudoku solution [n, n] int32.

  9x9: validity-preserving transforms of `base_solution`; 4x4: uniform over all 288
  valid grids (the transforms reach only 192 of them).
  """
  n, b = grid_size, box_size(grid_size)
  if n == 4:
    sols = all_4x4_solutions()
    return np.array(sols[rng.integers(len(sols))])
  g = base_solution(n)
  g = rng.permutation(n).astype(np.int32)[g - 1] + 1  # relabel digits

  def line_order():  # a band (stack) order, then an order inside each
    bands = rng.permutation(b)
    return np.concatenate([b * k + rng.permutation(b) for k in bands])

  g = g[line_order()][:, line_order()]
  if rng.integers(2):
    g = g.T
  return np.ascontiguousarray(g)


def sudoku_valid(grid: np.ndarray) -> np.ndarray:
  """Sudoku rule check (IPR App. C.2.3): every row, column and box holds 1..n once.

  Args:
    grid: [..., n, n] integer digits, n = 9 (3x3 boxes) or 4 (2x2 boxes), e.g. the cell
      classifier's predictions.
  Returns:
    [...] bool.
  """
  grid = np.asarray(grid)
  n = grid.shape[-1] if grid.ndim >= 2 else 0
  if grid.ndim < 2 or grid.shape[-2] != n or n not in GRID_SIZES:
    raise checks.InputError(f"sudoku grid must be [..., n, n] with n in {GRID_SIZES}, got "
                            f"shape {grid.shape}.")
  b = box_size(n)
  lead = grid.shape[:-2]
  boxes = grid.reshape(lead + (b, b, b, b)).swapaxes(-3, -2).reshape(lead + (n, n))
  target = np.arange(1, n + 1)
  ok = np.ones(lead, bool)
  for units in (grid, np.swapaxes(grid, -1, -2), boxes):
    ok &= np.all(np.sort(units, axis=-1) == target, axis=(-2, -1))
  return ok


def grid_cells(images: np.ndarray, cell_size: int = CELL, grid_size: int = GRID) -> np.ndarray:
  """Cuts grid images [..., nc, nc, C] into cells [..., n, n, c, c, C] (for a cell classifier)."""
  images = np.asarray(images)
  n = grid_size
  h, w, ch = images.shape[-3:]
  if h != n * cell_size or w != n * cell_size:
    raise checks.InputError(f"sudoku images must be [..., {n * cell_size}, {n * cell_size}, C], "
                     f"got shape {images.shape}.")
  lead = images.shape[:-3]
  x = images.reshape(lead + (n, cell_size, n, cell_size, ch))
  return np.moveaxis(x, -4, -3)


def cell_mask_to_pixels(cell_mask: np.ndarray, cell_size: int = CELL) -> np.ndarray:
  """[..., n, n] cell mask -> [..., nc, nc] pixel mask (m = 1 known)."""
  return np.repeat(np.repeat(cell_mask, cell_size, axis=-2), cell_size, axis=-1)


class SudokuSource:
  """Random-access source of Digit Sudoku grids (grain `RandomAccessDataSource`).

  Each example is a dict (n = grid_size, 9 or 4):
    image:     [8n, 8n, 1] float32 in [-1, 1] (cell size 8; `image_size` a
               multiple of 8n upsamples by pixel repetition),
    solution:  [n, n] int32, the digits 1..n shown in the cells,
    cell_mask: [n, n] float32, 1 = given cell,
    mask:      [S, S] float32 pixel mask, 1 = pixel of a given cell (docs/conventions.md: m = 1 known).
  num_givens: an int or (lo, hi) range; default the HARD setting (`hard_givens(n)`).
  """

  name = "sudoku"
  num_classes = None

  def __init__(self, split: str = "train", image_size: int | None = None,
               num_examples: int | None = None, seed: int = 0,
               num_givens: int | tuple[int, int] | None = None, grid_size: int = GRID):
    if split not in SPLITS:
      raise checks.InputError(f"Unknown split {split!r} for sudoku; expected one of {SPLITS}.")
    n = check_grid_size(grid_size)
    image_size = n * CELL if image_size is None else image_size
    if (not isinstance(image_size, (int, np.integer)) or image_size < n * CELL
            or image_size % (n * CELL)):
      raise checks.InputError(f"sudoku: image_size must be a positive multiple of {n * CELL} "
                       f"({n} cells of 8x8 digits), got {image_size!r}.")
    num_givens = hard_givens(n) if num_givens is None else num_givens
    lo, hi = (num_givens, num_givens) if np.isscalar(num_givens) else tuple(num_givens)
    if not 0 <= lo <= hi <= n * n:
      raise checks.InputError(f"sudoku: num_givens must be an int or (lo, hi) with "
                       f"0 <= lo <= hi <= {n * n}, got {num_givens!r}.")
    num_examples = checks.check_dataset_size("sudoku", num_examples, DEFAULT_NUM_EXAMPLES,
                                             split, seed)
    self.split = split
    self.grid_size = n
    self.image_size = int(image_size)
    self.cell_size = self.image_size // n
    self.image_shape = (self.image_size, self.image_size, 1)
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self.num_givens = (int(lo), int(hi))
    raw, labels = digits_lib.load_split(split)  # [N, 8, 8] in [-1, 1]
    cells = digits_lib.upsample_nearest(raw, self.cell_size // CELL).astype(np.float32)
    # Pool of cell images per digit 1..n (index d - 1); digit-0 images unused.
    self._pool = [cells[labels == d] for d in range(1, n + 1)]

  def __len__(self) -> int:
    return self.num_examples

  def example_params(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(solution [n, n], pool index of each cell's image [n, n], cell_mask [n, n] bool)."""
    if not 0 <= index < self.num_examples:
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    n = self.grid_size
    rng = np.random.default_rng([self.seed, _SPLIT_ID[self.split], int(index)])
    solution = random_solution(rng, n)
    sizes = np.array([len(p) for p in self._pool])
    pick = rng.integers(0, sizes[solution - 1])  # per cell, uniform within its digit's pool
    n_given = int(rng.integers(self.num_givens[0], self.num_givens[1] + 1))
    cell_mask = np.zeros(n * n, bool)
    cell_mask[rng.permutation(n * n)[:n_given]] = True
    return solution, pick, cell_mask.reshape(n, n)

  def render(self, solution: np.ndarray, pick: np.ndarray) -> np.ndarray:
    """The grid image [S, S, 1] showing digit solution[r, c] with pool image pick[r, c]."""
    n, c = self.grid_size, self.cell_size
    cells = np.stack([self._pool[d - 1][k] for d, k in zip(np.ravel(solution), np.ravel(pick))])
    image = cells.reshape(n, n, c, c).swapaxes(1, 2).reshape(n * c, n * c)
    return image[..., None].astype(np.float32)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    solution, pick, cell_mask = self.example_params(int(index))
    cell_mask = cell_mask.astype(np.float32)
    return {
        "image": self.render(solution, pick),
        "solution": solution.astype(np.int32),
        "cell_mask": cell_mask,
        "mask": cell_mask_to_pixels(cell_mask, self.cell_size),
    }

  def __getitems__(self, indices) -> list[dict[str, np.ndarray]]:
    return [self[int(i)] for i in indices]

  def __repr__(self) -> str:
    grid = "" if self.grid_size == GRID else f", grid_size={self.grid_size}"
    return (f"SudokuSource(split={self.split!r}, image_size={self.image_size}, "
            f"num_examples={self.num_examples}, seed={self.seed}, "
            f"num_givens={self.num_givens}{grid})")


def corrupt_by_swaps(images: np.ndarray, solutions: np.ndarray, num_swaps: int,
                     rng: np.random.Generator, cell_size: int = CELL
                     ) -> tuple[np.ndarray, np.ndarray]:
  """K-corrupted Sudoku (IPR Sec. 4.2): swap K disjoint pairs of cells holding different digits.

  Any such swap breaks the rule (the column of the first cell now holds the second digit
  twice), and disjoint pairs cannot undo each other.

  Args:
    images: [B, nc, nc, C] valid grid images; solutions: [B, n, n] their digits.
    num_swaps: K >= 0, at most n * n / 2 - n + 1 (pairs always find a different digit).
  Returns:
    (corrupted images [B, nc, nc, C], their digits [B, n, n]).
  """
  images, solutions = np.array(images), np.array(solutions)
  n = solutions.shape[-1]
  if not 0 <= int(num_swaps) <= n * n // 2 - n + 1:
    raise checks.InputError(f"num_swaps={num_swaps}; expected 0..{n * n // 2 - n + 1} for a "
                            f"{n}x{n} grid (disjoint pairs of cells with different digits).")
  c = cell_size
  for img, sol in zip(images, solutions):
    flat = sol.reshape(-1)
    free = list(rng.permutation(n * n))
    for _ in range(int(num_swaps)):
      a = free.pop(0)
      b = next(j for j in free if flat[j] != flat[a])
      free.remove(b)
      (ra, ca), (rb, cb) = divmod(int(a), n), divmod(int(b), n)
      cell_a = img[ra * c:(ra + 1) * c, ca * c:(ca + 1) * c].copy()
      img[ra * c:(ra + 1) * c, ca * c:(ca + 1) * c] = img[rb * c:(rb + 1) * c, cb * c:(cb + 1) * c]
      img[rb * c:(rb + 1) * c, cb * c:(cb + 1) * c] = cell_a
      flat[a], flat[b] = flat[b], flat[a]
  return images, solutions
