"""Pretrained weights from a user's file (npz or safetensors), checked against a flax module.

Files hold tensors under the reference implementation's PyTorch state-dict names and
layouts (convolutions [O, I, kH, kW]); `tools/convert_weights.py` writes them
from the official checkpoints. A flax module whose submodule names spell those names
(a `__` in a flax name stands for a `.`) is filled by `load_variables`: every expected
tensor must be present with its exact shape, else an InputError names the first
missing or mis-shaped one. Nothing is downloaded.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from asyncpatch_jax.runtime import checks

# flax leaf name -> PyTorch suffix (BatchNorm scale/bias/statistics, conv/dense weights)
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight", "mean": "running_mean",
         "var": "running_var"}


def read_tensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of an .npz or .safetensors file, by name."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise checks.InputError(f"weights file {path!r} does not exist (nothing is downloaded; convert "
                            "the official checkpoint with tools/convert_weights.py).")
  if path.endswith(".npz"):
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
    return load_file(path)
  raise checks.InputError(f"weights file {path!r}: expected a .npz or .safetensors file.")


def torch_name(path: tuple[str, ...]) -> str:
  """('params', 'Mixed_5b', 'branch1x1', 'conv', 'kernel') -> 'Mixed_5b.branch1x1.conv.weight'."""
  modules = [p.replace("__", ".") for p in path[1:-1]]
  return ".".join(modules + [_LEAF[path[-1]]])


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == "kernel" and len(shape) == 4:      # HWIO -> OIHW
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:      # [in, out] -> [out, in]
    return (shape[1], shape[0])
  return shape


def _to_flax(leaf: str, array: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and array.ndim == 4:
    return np.transpose(array, (2, 3, 1, 0))
  if leaf == "kernel" and array.ndim == 2:
    return array.T
  return array


def expected_tensors(variable_shapes) -> dict[str, tuple[int, ...]]:
  """{torch name: torch shape} of a flax variable tree (e.g. from `jax.eval_shape(init)`)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(variable_shapes)[0]:
    keys = tuple(k.key for k in path)
    out[torch_name(keys)] = _torch_shape(keys[-1], tuple(leaf.shape))
  return out


def load_variables(tensors: dict[str, np.ndarray], variable_shapes, what: str):
  """Flax variables with the structure of `variable_shapes`, filled from torch-named tensors.

  Extra tensors in the file (e.g. a classifier head, `num_batches_tracked`) are ignored.
  Raises InputError naming the first expected tensor that is missing or mis-shaped.
  """
  leaves, treedef = jax.tree_util.tree_flatten_with_path(variable_shapes)
  arrays = []
  for path, leaf in leaves:
    keys = tuple(k.key for k in path)
    name, shape = torch_name(keys), _torch_shape(keys[-1], tuple(leaf.shape))
    if name not in tensors:
      raise checks.InputError(f"{what} weights: tensor {name!r} {shape} is missing from the file "
                              f"(it holds {len(tensors)} tensors); is it the right network?")
    value = np.asarray(tensors[name])
    if value.shape != shape:
      raise checks.InputError(f"{what} weights: tensor {name!r} has shape {value.shape}; expected "
                              f"{shape}.")
    arrays.append(_to_flax(keys[-1], value).astype(np.float32))
  return jax.tree_util.tree_unflatten(treedef, arrays)
