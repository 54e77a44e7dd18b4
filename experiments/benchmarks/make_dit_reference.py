"""Writes the PyTorch reference DiT's output on a tiny DiT as a test fixture (needs torch).

  pip install -e '.[bench]'
  python -m experiments.benchmarks.make_dit_reference --out=tests/fixtures/dit_torch_reference.npz

The reference is `torch_dit.py` (the port of facebookresearch/DiT's models.py, next to this
file). Weights are drawn with NumPy from a fixed seed, independently of flax's initialisers
(every parameter nonzero: adaLN-Zero starts its modulations and its final layer at zero,
which would hide them), stored under "param/<flax path>", loaded into the torch DiT with
`torch_dit.load_flax_params`, and run in float32 on fixed inputs: x [B, H, W, C] (NHWC; the
torch model sees NCHW), t [B] in [0, 1] (the torch model sees 1000 t) including both ends,
labels including the null label. tests/test_dit_peer.py checks that our flax DiT
(models/dit.py) with the same weights reproduces "output" [B, H, W, C_out] without torch.
`--tiny` writes the same file (it is tiny already).
"""

from __future__ import annotations

import json

from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.models import dit
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output .npz path.")
flags.DEFINE_integer("seed", 0, "NumPy seed of the weights and inputs.")
common.define_tiny({})

# Non-square channel counts (3 in, 6 out: learned sigma's layout), 16 tokens, 5 classes.
CONFIG = dict(patch_size=2, hidden_size=32, depth=2, num_heads=4, mlp_ratio=4.0,
              out_channels=6, num_classes=5)
IMAGE = (8, 8, 3)


def random_params(model, rng: np.random.Generator):
  """Every parameter drawn from N(0, 1 / fan_in) (kernels, tables) or N(0, 0.1^2) (biases)."""
  x = jax.ShapeDtypeStruct((1, *IMAGE), jnp.float32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), x,
                          jax.ShapeDtypeStruct((1,), jnp.float32),
                          jax.ShapeDtypeStruct((1,), jnp.int32))["params"]

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if "bias" in name:
      return (0.1 * rng.standard_normal(leaf.shape)).astype(np.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if "embedding" not in name else 1
    return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, shapes)


def flatten(params) -> dict[str, np.ndarray]:
  """{"param/a/b/kernel": array} for a nested parameter dict."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    out["param/" + "/".join(k.key for k in path)] = np.asarray(leaf)
  return out


def unflatten(arrays) -> dict:
  """The nested parameter dict of `flatten`'s keys (the ones starting with "param/")."""
  params = {}
  for key, value in arrays.items():
    if not key.startswith("param/"):
      continue
    *parents, leaf = key.split("/")[1:]
    node = params
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = np.asarray(value)
  return params


def main(argv):
  del argv
  import torch  # pylint: disable=import-outside-toplevel
  from experiments.benchmarks import torch_dit  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(FLAGS.seed)
  model = dit.DiT(**CONFIG)
  params = random_params(model, rng)
  b = 4
  x = rng.standard_normal((b, *IMAGE)).astype(np.float32)
  t = np.array([0.0, 0.25, 0.7, 1.0], np.float32)
  y = np.array([0, 3, 4, CONFIG["num_classes"]], np.int32)       # the last: the null label
  tmodel = torch_dit.from_flax_model(model, IMAGE[0], IMAGE[2])
  torch_dit.load_flax_params(tmodel, params)
  tmodel.eval()
  with torch.no_grad():
    out = torch_dit.velocity(tmodel, x, t, y)
  meta = dict(config=CONFIG, image=IMAGE, seed=FLAGS.seed, torch=torch.__version__,
              command=common.command())
  np.savez_compressed(FLAGS.out, x=x, t=t, y=y, output=out.astype(np.float32),
                      meta=np.array(json.dumps(meta)), **flatten(params))
  print(f"wrote {FLAGS.out}: output {out.shape}, max |output| {np.abs(out).max():.3f}")


if __name__ == "__main__":
  common.run(main, required=("out",))
