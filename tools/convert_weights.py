"""Converts the official FID Inception and LPIPS checkpoints (local files) to this library's .npz.

  python tools/convert_weights.py --inception=pt_inception-2015-12-05-6726825d.pth \
      --out=weights/inception_fid.npz
  python tools/convert_weights.py --lpips_lin=<site-packages>/lpips/weights/v0.1/alex.pth \
      --lpips_trunk=alexnet-owt-7be5be79.pth --out=weights/lpips_alex.npz
  python tools/convert_weights.py --lpips_lin=<site-packages>/lpips/weights/v0.1/vgg.pth \
      --lpips_trunk=vgg16-397923af.pth --out=weights/lpips_vgg.npz

Inputs are files you already have (nothing is downloaded): pytorch-fid's release
`pt_inception-2015-12-05-6726825d.pth` (FID_WEIGHTS_URL in pytorch_fid/inception.py);
the `lpips` package's linear-layer weights (shipped inside the pip package) with
torchvision's ImageNet AlexNet / VGG-16 checkpoint for the trunk. This script needs
torch (`pip install torch`); the library reads the .npz without it. The tensors keep
their PyTorch names and layouts; the output is checked against the flax modules'
expected names and shapes before it is written.
"""

from __future__ import annotations

import os

from absl import app, flags
import numpy as np

from asyncpatch_jax.evaluation import inception
from asyncpatch_jax.evaluation import lpips

FLAGS = flags.FLAGS
flags.DEFINE_string("inception", None, "pytorch-fid Inception checkpoint (.pth).")
flags.DEFINE_string("lpips_lin", None, "lpips package linear weights (weights/v0.1/<net>.pth).")
flags.DEFINE_string("lpips_trunk", None, "torchvision AlexNet or VGG-16 checkpoint (.pth).")
flags.DEFINE_string("out", None, "Output .npz path.")

# torchvision `features` indices of each LPIPS slice (lpips/pretrained_networks.py).
SLICE_RANGES = {"alex": (range(0, 2), range(2, 5), range(5, 8), range(8, 10), range(10, 12)),
                "vgg": (range(0, 4), range(4, 9), range(9, 16), range(16, 23), range(23, 30))}


def _numpy(state_dict) -> dict[str, np.ndarray]:
  return {k: v.detach().cpu().numpy() for k, v in state_dict.items()}


def convert_inception(state_dict) -> dict[str, np.ndarray]:
  """pytorch-fid FID Inception state dict -> the tensors FIDInceptionV3 needs."""
  tensors = _numpy(state_dict)
  return {name: tensors[name] for name in inception.expected_tensors() if name in tensors}


def convert_lpips(lin_state_dict, trunk_state_dict) -> tuple[dict[str, np.ndarray], str]:
  """lpips linear layers + torchvision trunk (`features.{i}.*`) -> LPIPS tensors, and the net."""
  trunk = _numpy(trunk_state_dict)
  net = "alex" if trunk["features.0.weight"].shape[-1] == 11 else "vgg"
  out = {k: v for k, v in _numpy(lin_state_dict).items() if k.startswith("lin")}
  for s, indices in enumerate(SLICE_RANGES[net]):
    for i in indices:
      for leaf in ("weight", "bias"):
        if f"features.{i}.{leaf}" in trunk:
          out[f"net.slice{s + 1}.{i}.{leaf}"] = trunk[f"features.{i}.{leaf}"]
  return out, net


def check(tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], what: str) -> None:
  for name, shape in expected.items():
    if name not in tensors:
      raise ValueError(f"{what}: the checkpoint has no tensor {name!r}; is it the right file?")
    if tuple(tensors[name].shape) != shape:
      raise ValueError(f"{what}: {name!r} has shape {tensors[name].shape}; expected {shape}.")


def main(_):
  import torch  # pylint: disable=g-import-not-at-top
  if not FLAGS.out or bool(FLAGS.inception) == bool(FLAGS.lpips_lin or FLAGS.lpips_trunk):
    raise app.UsageError("pass --out and either --inception or --lpips_lin with --lpips_trunk.")
  load = lambda p: torch.load(p, map_location="cpu", weights_only=True)
  if FLAGS.inception:
    tensors = convert_inception(load(FLAGS.inception))
    check(tensors, inception.expected_tensors(), "FID Inception")
  else:
    tensors, net = convert_lpips(load(FLAGS.lpips_lin), load(FLAGS.lpips_trunk))
    check(tensors, lpips.expected_tensors(net), f"LPIPS-{net}")
  os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
  np.savez(FLAGS.out, **{k: v.astype(np.float32) for k, v in tensors.items()})
  print(f"wrote {len(tensors)} tensors to {FLAGS.out}")


if __name__ == "__main__":
  app.run(main)
