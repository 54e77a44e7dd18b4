"""FSDP (runtime/sharding.py): DiT-XL/2's train state split over an fsdp axis of 8.

On abstract shapes only (`train.Setup` traces the model with jax.eval_shape): nothing of
the 675M-parameter model is allocated. Independent reference: the closed form, each leaf's
bytes from its shape, divided by 8 where it is sharded.
"""

import math

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

from asyncpatch_jax.runtime import sharding
from asyncpatch_jax.training import memory
from asyncpatch_jax.training import train
from experiments import common

FSDP = 8


def _leaf_bytes(leaf) -> int:
  return math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize


def test_dit_xl2_state_is_split_over_fsdp_8():
  """Every parameter, EMA and optimizer leaf of MIN_FSDP_SIZE or more elements is sharded
  along one axis over 'fsdp' (the others replicated), and a device holds 1/8 of those
  leaves' bytes exactly; with the small leaves the state per device is within 1 % of 1/8."""
  config = common.updated(common.load_config("configs/dit.py:imagenet256,XL/2"),
                          {"latent": {"autoencoder_workdir": ""},
                           "model": {"out_channels": 4}, "train": {"fsdp": FSDP}})
  devices = jax.devices()[:FSDP]
  setup = train.Setup(config, devices, image_shape=(32, 32, 4))
  mesh = sharding.make_mesh(FSDP, devices)
  assert dict(mesh.shape) == {"data": 1, "fsdp": FSDP}
  state = setup.abstract_state
  shardings = sharding.state_shardings(state, mesh)
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(state.params))
  assert 660e6 < num_params < 690e6                   # DiT-XL/2: 675M (4 output channels)
  total, big_bytes = 0, {}
  for part in ("params", "ema_params", "opt_state"):
    leaves = jax.tree_util.tree_leaves_with_path(getattr(state, part))
    specs = jax.tree.leaves(getattr(shardings, part))
    assert len(leaves) == len(specs)
    big = small = scalars = 0
    for (path, leaf), s in zip(leaves, specs):
      name = f"{part}{jax.tree_util.keystr(path)} {leaf.shape}"
      scalars += leaf.ndim == 0
      if math.prod(leaf.shape) >= sharding.MIN_FSDP_SIZE:
        assert list(s.spec).count("fsdp") == 1 and set(s.spec) <= {"fsdp", None}, name
        assert leaf.shape[list(s.spec).index("fsdp")] % FSDP == 0, name
        assert math.prod(s.shard_shape(leaf.shape)) * FSDP == math.prod(leaf.shape), name
        big += _leaf_bytes(leaf)
      else:
        assert s.spec == P(), name
        small += _leaf_bytes(leaf)
    per_device = memory.bytes_per_device(memory.with_shardings(getattr(state, part),
                                                               getattr(shardings, part)))
    assert per_device == big // FSDP + small, part
    assert small < 0.002 * big, part                  # biases, norms, Adam's step count
    # float32 parameters and EMA; Adam's mu and nu, and its int32 step counts.
    copies = 2 if part == "opt_state" else 1
    assert big + small == copies * 4 * num_params + 4 * scalars, part
    big_bytes[part] = big
    total += big + small
  assert big_bytes["ema_params"] == big_bytes["params"]
  assert big_bytes["opt_state"] == 2 * big_bytes["params"]
  per_device = memory.bytes_per_device(memory.with_shardings(state, shardings))
  assert abs(per_device - total / FSDP) <= 0.01 * total / FSDP
  # fsdp=1 (mesh data=8): every leaf whole on every device.
  replicated = sharding.state_shardings(state, sharding.make_mesh(1, devices))
  whole = memory.bytes_per_device(memory.with_shardings(state, replicated))
  assert whole == total + 2 * 4                     # and step, nonfinite_step: int32
