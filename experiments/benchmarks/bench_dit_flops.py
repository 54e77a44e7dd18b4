"""What per-token time conditioning costs a DiT, in FLOPs, against the per-image DiT.

  python -m experiments.benchmarks.bench_dit_flops --out=results/dit/dit_flops.json

For DiT-B/2 and DiT-XL/2 on 32 x 32 x 4 latents with 1000 classes (the DiT paper's
ImageNet 256 setting, learned sigma: 8 output channels), one image: the XLA
cost-analysis FLOPs of the forward pass (models/dit.py, lowered on abstract
parameters: nothing is allocated or compiled) with a per-image time [B] and with a
per-token time map [B, H, W], for both modulation designs. Beside each ratio, the
closed-form one: the per-token model computes for every one of the N tokens what DiT
computes once per image, the time embedder (256 D + D^2 multiply-adds) and the
modulation MLPs (adaln_zero: depth x 6 D^2 + 2 D^2; adaln_single: 6 D^2, shared by all
blocks). `--tiny`: DiT-S/2 on 16 x 16 x 4.
"""

from __future__ import annotations

from absl import flags

from asyncpatch_jax.models import dit
from experiments import common

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path.")
flags.DEFINE_list("sizes", ["B", "XL"], "DiT sizes (S, B, L, XL).")
flags.DEFINE_integer("patch", 2, "Patch size p.")
flags.DEFINE_integer("image", 32, "Latent side (32: ImageNet 256 through the f = 8 VAE).")
flags.DEFINE_integer("channels", 4, "Latent channels.")
flags.DEFINE_integer("classes", 1000, "Class labels.")
common.define_tiny(dict(sizes=["S"], image=16))


def main(argv):
  del argv
  result = {"image": [FLAGS.image, FLAGS.image, FLAGS.channels], "patch": FLAGS.patch,
            "classes": FLAGS.classes, "batch": 1, "models": {}}
  tokens = (FLAGS.image // FLAGS.patch) ** 2
  shape = (FLAGS.image, FLAGS.image, FLAGS.channels)
  for size in FLAGS.sizes:
    depth, d, heads = dit.SIZES[size]
    for modulation in dit.MODULATIONS:
      model = dit.DiT(patch_size=FLAGS.patch, hidden_size=d, depth=depth, num_heads=heads,
                      out_channels=2 * FLAGS.channels, num_classes=FLAGS.classes,
                      modulation=modulation)
      image = dit.forward_flops(model, shape, per_token=False)
      token = dit.forward_flops(model, shape, per_token=True)
      predicted = dit.per_token_extra_flops(model, tokens)
      name = f"DiT-{size}/{FLAGS.patch} {modulation}"
      result["models"][name] = {
          "gflops_per_image_time": image / 1e9, "gflops_per_token_time": token / 1e9,
          "ratio": token / image, "closed_form_ratio": (image + predicted) / image,
          "closed_form_extra_gflops": predicted / 1e9}
      print(name, f"{image / 1e9:.2f} -> {token / 1e9:.2f} GFLOPs: {token / image:.3f}x "
            f"(closed form {(image + predicted) / image:.3f}x)")
  common.write_json(FLAGS.out, result)


if __name__ == "__main__":
  common.run(main, required=("out",))
