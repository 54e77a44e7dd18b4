"""Input validation at the API boundary: clear `ValueError`s before anything compiles.

Shape checks always run (shapes are static, also under `jax.jit`); value checks
(ranges, 0/1 masks) run whenever the array is concrete, i.e. outside a trace.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

import numpy as np


class InputError(ValueError):
  """Bad input caught at the library's boundary: the message says what is wrong and how to fix it.

  The command line prints it as one line (no traceback); any other exception keeps its
  traceback. A subclass of ValueError, so `except ValueError` still catches it.
  """


def is_concrete(x) -> bool:
  """True when `x` holds values (not a tracer inside jit/vmap/grad)."""
  # Imported here: the command line's --help loads this module and should not load jax.
  import jax  # pylint: disable=g-import-not-at-top
  return not isinstance(x, jax.core.Tracer)


def check_image(x, name: str = "x") -> None:
  """An image batch must be `[B, H, W, C]`."""
  if np.ndim(x) != 4:
    raise InputError(
        f"{name} has shape {tuple(np.shape(x))}; expected an image batch [B, H, W, C].")


def check_time(t, image_shape: Sequence[int], name: str = "t") -> None:
  """A time is `[B]` (per image) or `[B, H, W]` (per pixel) with values in [0, 1]."""
  b, h, w = image_shape[:3]
  shape = tuple(np.shape(t))
  if shape not in ((b,), (b, h, w)):
    raise InputError(
        f"{name} has shape {shape}; expected a per-image time [{b}] or a per-pixel "
        f"time map [{b}, {h}, {w}] matching the image of shape {tuple(image_shape)}.")
  if is_concrete(t):
    arr = np.asarray(t)
    if arr.size and (np.isnan(arr).any() or arr.min() < 0.0 or arr.max() > 1.0):
      raise InputError(
          f"{name} has values in [{np.nanmin(arr):.4g}, {np.nanmax(arr):.4g}]"
          f"{' (with NaN)' if np.isnan(arr).any() else ''}; times must lie in [0, 1] "
          "(0 = clean, 1 = noise).")


def check_mask(mask, shape: Sequence[int], name: str = "mask") -> np.ndarray:
  """A mask has the given shape and only 0/1 values (1 = known pixel). Returns it as float32."""
  arr = np.asarray(mask)
  if arr.shape != tuple(shape):
    raise InputError(f"{name} has shape {arr.shape}; expected {tuple(shape)} "
                     "(1 = known pixel, 0 = pixel to generate).")
  values = np.unique(arr)
  if not np.all(np.isin(values, (0, 1))):
    raise InputError(f"{name} has values {values[:8].tolist()}"
                     f"{'...' if values.size > 8 else ''}; a mask holds only 0 and 1 "
                     "(1 = known pixel, 0 = pixel to generate).")
  return arr.astype(np.float32)


def check_divisible(size: int, divisor: int, name: str, what: str) -> None:
  """`size` must be a multiple of `divisor`."""
  if divisor <= 0 or size % divisor:
    raise InputError(f"{name}={size} is not divisible by {divisor} ({what}).")


def did_you_mean(value, choices: Sequence[str]) -> str:
  """' Did you mean 'a', 'b'?' for the close matches of `value` among `choices`, or ''."""
  close = difflib.get_close_matches(str(value), [str(c) for c in choices], n=3, cutoff=0.5)
  return f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""


def check_choice(value: str, choices: Sequence[str], name: str) -> None:
  """`value` must be one of `choices`; the error names the close matches."""
  if value not in choices:
    raise InputError(f"Unknown {name} {value!r}; expected one of "
                     f"{', '.join(repr(c) for c in choices)}.{did_you_mean(value, choices)}")


def check_positive_int(value, name: str) -> int:
  """`value` must be an integer >= 1 (an int, a NumPy integer, or an integral float)."""
  try:
    ok = int(value) == value and value >= 1
  except (TypeError, ValueError):
    ok = False
  if not ok or isinstance(value, bool):
    raise InputError(f"{name}={value!r}; expected a positive integer.")
  return int(value)


def check_range(value, name: str, low=None, high=None, *, low_open: bool = False,
                high_open: bool = False, hint: str = "") -> float:
  """`value` must be a number in [low, high] (an end is excluded when `*_open`; None: unbounded).

  The error names the interval, e.g. "optim.b2=1.5; expected a number in [0, 1)."
  """
  try:
    x = float(value)
    ok = not isinstance(value, bool) and x == x
  except (TypeError, ValueError):
    ok, x = False, 0.0
  if ok and low is not None:
    ok = x > low if low_open else x >= low
  if ok and high is not None:
    ok = x < high if high_open else x <= high
  if not ok:
    where = interval(low, high, low_open=low_open, high_open=high_open)
    raise InputError(f"{name}={value!r}; expected a number{' ' + where if where else ''}."
                     f"{' ' + hint if hint else ''}")
  return x


def interval(low=None, high=None, *, low_open: bool = False, high_open: bool = False) -> str:
  """How check_range names [low, high]: 'in [0, 1)', '> 0', '<= 1'; '' when unbounded."""
  if low is not None and high is not None:
    return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
  if low is not None:
    return f"{'>' if low_open else '>='} {low:g}"
  if high is not None:
    return f"{'<' if high_open else '<='} {high:g}"
  return ""


def check_dataset_size(dataset: str, num_examples, default_num_examples: dict, split: str,
                       seed) -> int:
  """A generated dataset's `num_examples` (None: the split's default) and `seed`."""
  if num_examples is None:
    num_examples = default_num_examples[split]
  if num_examples < 1:
    raise InputError(f"{dataset}: num_examples must be >= 1, got {num_examples}.")
  if seed < 0:
    raise InputError(f"{dataset}: seed must be >= 0, got {seed}.")
  return int(num_examples)
