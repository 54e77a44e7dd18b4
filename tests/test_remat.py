"""model.remat (models/blocks.py) on the real train step: same numbers, less memory.

remat none | block | full keeps the parameter tree and recomputes the same operations, so
three steps of the train step that training runs (loop.jit_step: jit, donated state, Adam,
EMA) give the same losses and parameters: bitwise for the DiT, to float32 rounding for the
UNet (XLA:CPU fuses its unrolled blocks differently around the checkpoints). The parameters are
perturbed first: adaLN-Zero and the UNet's zero-initialised output layers make the network
output zero at initialisation, which would hide any difference in the blocks. Memory: the
DiT's blocks are one scan, and XLA:CPU's temp allocation of its compiled train step falls
from none to block to full (the UNet's unrolled blocks show no such fall on XLA:CPU, whose
schedule hoists the recomputation: experiments/benchmarks/README.md, "Memory").
"""

import jax
import numpy as np
import pytest

from asyncpatch_jax.runtime import sharding
from asyncpatch_jax.training import loop
from asyncpatch_jax.training import memory
from asyncpatch_jax.training import train
from experiments import common

REMAT = ("none", "block", "full")
STEPS = 3


def _dit_config(remat: str, batch: int):
  """configs/dit.py:digits made tiny: 4 adaLN-Zero blocks of width 64 on 16x16x4 (64 tokens)."""
  config = common.load_config("configs/dit.py:digits")
  with config.unlocked():
    config.model.update(depth=4, hidden_size=64, num_heads=2, patch_size=2, out_channels=4,
                        modulation="adaln_zero", remat=remat)
    config.train.update(batch_size=batch, fsdp=1)
  return config, (16, 16, 4)


def _unet_config(remat: str, batch: int):
  """configs/test.py with a second level and attention at 8x8: residual and attention blocks."""
  config = common.load_config("test")
  with config.unlocked():
    config.model.update(channel_mult=(1, 2), num_res_blocks=(1, 1), attention_resolutions=(8,),
                        remat=remat)
    config.train.update(batch_size=batch, fsdp=1)
  return config, (16, 16, 1)


CONFIGS = {"dit": _dit_config, "unet": _unet_config}


def _step(name: str, remat: str, batch: int):
  """(setup, the jitted train step, its abstract arguments) on one device."""
  config, shape = CONFIGS[name](remat, batch)
  devices = jax.devices()[:1]
  setup = train.Setup(config, devices, image_shape=shape)
  assert setup.model.remat == remat
  mesh = sharding.make_mesh(1, devices)
  jitted, abstract_args = loop.jit_step(setup, mesh, jax.random.key(config.seed), ())
  return setup, jitted, abstract_args


def _train(name: str, remat: str):
  """Losses of STEPS steps and the final parameters, from perturbed initial parameters."""
  batch = 8
  setup, jitted, _ = _step(name, remat, batch)
  state = jax.jit(setup.init_state)(jax.random.key(0))
  leaves, tree = jax.tree.flatten(state.params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape, p.dtype)
                                     for p, k in zip(leaves, keys)])
  state = state.replace(params=params, ema_params=jax.tree.map(jax.numpy.copy, params))
  rng = np.random.default_rng(0)
  h, w, c = setup.image_shape
  losses = []
  for _ in range(STEPS):
    batch_data = {"image": rng.uniform(-1, 1, (batch, h, w, c)).astype(np.float32),
                  "label": rng.integers(0, setup.model.num_classes, batch).astype(np.int32)}
    state, metrics = jitted(state, batch_data)
    losses.append(np.asarray(metrics["loss"]))
  return np.array(losses), jax.device_get(state.params)


def test_dit_remat_gives_bitwise_the_same_training():
  """The DiT's blocks are one scan: its body is compiled alone, the same with every policy."""
  ref_losses, ref_params = _train("dit", "none")
  assert np.all(np.isfinite(ref_losses)) and len(set(ref_losses.tolist())) == STEPS
  for remat in REMAT[1:]:
    losses, params = _train("dit", remat)
    np.testing.assert_array_equal(losses, ref_losses, err_msg=remat)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_params),
                            jax.tree.leaves(params)):
      np.testing.assert_array_equal(b, a, err_msg=f"{remat} {jax.tree_util.keystr(path)}")


def test_unet_remat_gives_the_same_training_to_float32_rounding():
  """Not bitwise on XLA:CPU: the UNet's blocks are unrolled into the step's one program, and
  XLA fuses the forward pass differently once checkpointed blocks are in it (without remat
  too, the forward inside the train step differs in the last bits from the forward alone).
  Measured: the first step's loss is the same; the losses of steps 2 and 3 differ by up to
  2.3e-7 relative; the parameters by up to 5.7e-6, where Adam's normalised update turns a
  rounding difference of a near-zero gradient into a step of up to the learning rate
  (configs/test.py: 0, 5e-4, 1e-3 over the three steps; the bound below is 1e-4).
  """
  ref_losses, ref_params = _train("unet", "none")
  assert np.all(np.isfinite(ref_losses)) and len(set(ref_losses.tolist())) == STEPS
  for remat in REMAT[1:]:
    losses, params = _train("unet", remat)
    assert losses[0] == ref_losses[0], remat
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-6, err_msg=remat)
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ref_params),
                            jax.tree.leaves(params)):
      np.testing.assert_allclose(b, a, rtol=0, atol=1e-4,
                                 err_msg=f"{remat} {jax.tree_util.keystr(path)}")


def test_dit_remat_lowers_the_train_steps_temporaries():
  """XLA:CPU temp bytes of the compiled DiT train step: none > block > full.

  Independent floor: whatever the policy, the step's temporaries hold at least the
  gradients (one float32 copy of the parameters, the optimizer's input).
  """
  batch = 32
  temps, params_bytes = {}, None
  for remat in REMAT:
    setup, jitted, abstract_args = _step("dit", remat, batch)
    step_memory = memory.StepMemory.of(jitted.lower(*abstract_args(batch)).compile())
    temps[remat] = step_memory.temporaries
    params_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(setup.abstract_state.params))
  print({k: f"{v / 2 ** 20:.1f} MiB" for k, v in temps.items()},
        f"parameters {params_bytes / 2 ** 20:.1f} MiB")
  assert temps["none"] > temps["block"] > temps["full"] >= params_bytes
