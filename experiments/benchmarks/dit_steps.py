"""The DiT train step and Euler sampler on both stacks, for bench_dit_peer.py and gpu_dit.py.

Ours is models/dit.py in flax (each program one jit); the peer is the PyTorch reference
(torch_dit.py, eager, NCHW). No flags here, so both scripts import it; torch is imported
only inside the torch functions. Both stacks do the same work:

* train step: rectified flow (z = (1 - t) x + t eps, velocity target eps - x, the library's
  conventions) with one uniform time per image, plain MSE; CFG label dropout p = 0.1 (the
  reference's LabelEmbedder in train mode; ours the same rule with jax.random); AdamW with
  DiT's settings (lr 1e-4, no weight decay, betas (0.9, 0.999), eps 1e-8) on every trainable
  parameter. Fresh t, eps and dropout every step on both sides.
* sampling: `steps` Euler steps of the velocity from t = 1 to 0 (one time per image, the
  same float32 grid on both sides), given labels, no guidance; ours one `lax.fori_loop` in
  one jit, torch a Python loop under `torch.inference_mode`.

bf16: ours sets the model's compute dtype (parameters stay float32); torch runs the forward
pass under `torch.autocast` (its standard mixed precision). Losses and the sampler's state are
float32 on both sides.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from asyncpatch_jax.models import dit

LEARNING_RATE = 1e-4          # DiT's train.py: AdamW, lr 1e-4, weight decay 0
LABEL_DROPOUT = 0.1           # DiT's class_dropout_prob
# A tiny DiT for smoke runs (--tiny): depth, width, heads, as dit.SIZES.
TINY = (2, 64, 4)


def make_model(size: str, patch: int, channels: int, num_classes: int,
               dtype: str = "float32") -> dit.DiT:
  """DiT-<size>/<patch> (dit.SIZES, or "T": TINY) with adaLN-Zero and no learned sigma."""
  depth, hidden, heads = TINY if size == "T" else dit.SIZES[size]
  return dit.DiT(patch_size=patch, hidden_size=hidden, depth=depth, num_heads=heads,
                 out_channels=channels, num_classes=num_classes, modulation="adaln_zero",
                 dtype=jnp.dtype(dtype))


def random_params(model: dit.DiT, image_shape, key, scale: float = 0.02):
  """Flax's initial parameters plus `scale` N(0, 1) on every leaf: adaLN-Zero starts its
  modulations and final layer at zero, which would hide them from an agreement check
  (and gives the attention and MLP branches no work that differs from later training)."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  params = jax.jit(model.init)(key, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32))["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.fold_in(key, 1), len(leaves))
  return jax.tree.unflatten(tree, [p + scale * jax.random.normal(k, p.shape, p.dtype)
                                   for p, k in zip(leaves, keys)])


def count(params) -> int:
  return int(sum(np.prod(p.shape) for p in jax.tree.leaves(params)))


def optimizer() -> optax.GradientTransformation:
  return optax.adamw(LEARNING_RATE, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0)


def ours_train_step(model: dit.DiT, tx: optax.GradientTransformation, root_key):
  """`step(params, opt_state, x [B, H, W, C], y [B], step) -> (params, opt_state, loss)`,
  one jit with params and optimizer state donated; the step's key is fold_in(root, step)."""

  def loss_fn(params, x, y, key):
    kt, ke, kd = jax.random.split(key, 3)
    b = x.shape[0]
    t = jax.random.uniform(kt, (b,))
    eps = jax.random.normal(ke, x.shape)
    tb = t[:, None, None, None]
    z = (1 - tb) * x + tb * eps
    y = jnp.where(jax.random.uniform(kd, (b,)) < LABEL_DROPOUT, model.null_label, y)
    v = model.apply({"params": params}, z, t, y)
    return jnp.mean((v - (eps - x)) ** 2)

  def step(params, opt_state, x, y, step):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y, jax.random.fold_in(root_key, step))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return jax.jit(step, donate_argnums=(0, 1))


def euler_times(steps: int) -> np.ndarray:
  """The sampler's time grid [steps + 1], 1 -> 0, float32 (both stacks use these values)."""
  return np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)


def ours_sampler(model: dit.DiT, steps: int):
  """`sample(params, z [B, H, W, C], y [B]) -> x_0`: `steps` Euler steps, one jit."""
  ts = jnp.asarray(euler_times(steps))

  def sample(params, z, y):
    def body(k, z):
      t = ts[k]
      v = model.apply({"params": params}, z, jnp.full((z.shape[0],), t), y)
      return z + (ts[k + 1] - t) * v
    return jax.lax.fori_loop(0, steps, body, z)

  return jax.jit(sample)


# ----------------------------------------------------------------------------- PyTorch


def _autocast(device, dtype: str):
  import torch  # pylint: disable=import-outside-toplevel
  if dtype == "float32":
    return contextlib.nullcontext()
  return torch.autocast(device_type=device.type, dtype=getattr(torch, dtype))


def torch_optimizer(tmodel):
  import torch  # pylint: disable=import-outside-toplevel
  return torch.optim.AdamW([p for p in tmodel.parameters() if p.requires_grad],
                           lr=LEARNING_RATE, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                           foreach=True)


def torch_train_step(tmodel, opt, x, y, dtype: str = "float32"):
  """One step of the same loss on NCHW x (tmodel in train mode: the reference drops labels)."""
  import torch  # pylint: disable=import-outside-toplevel
  b = x.shape[0]
  t = torch.rand(b, device=x.device)
  eps = torch.randn_like(x)
  tb = t[:, None, None, None]
  z = (1 - tb) * x + tb * eps
  with _autocast(x.device, dtype):
    v = tmodel(z, 1000.0 * t, y)
  loss = ((v.float() - (eps - x)) ** 2).mean()
  opt.zero_grad(set_to_none=True)
  loss.backward()
  opt.step()
  return loss


def torch_sample(tmodel, z, y, steps: int, dtype: str = "float32"):
  """`steps` Euler steps from NCHW z (tmodel in eval mode), the same grid as ours."""
  import torch  # pylint: disable=import-outside-toplevel
  ts = euler_times(steps)
  with torch.inference_mode(), _autocast(z.device, dtype):
    for k in range(steps):
      t, s = float(ts[k]), float(ts[k + 1])
      v = tmodel(z, torch.full((z.shape[0],), 1000.0 * t, device=z.device), y)
      z = z + (s - t) * v.float()
  return z
