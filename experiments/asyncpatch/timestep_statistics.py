"""AsyncPatch Fig. 3: the distribution of the per-image mean time of each training sampler.

  python -m experiments.asyncpatch.timestep_statistics --out=results/timesteps/timestep_statistics.json

For each sampler at 32x32 over 8192 images: a histogram PNG of the per-image mean
time (beside the JSON, with one example map per sampler) and
{"samplers": {name: {"mean_of_means", "std_of_means", "mean_spread"}}}, where the
spread of an image is max t - min t. `--tiny`: 1024 images.
"""

from __future__ import annotations

import os

from absl import flags
import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from asyncpatch_jax.diffusion import timesteps  # noqa: E402
from experiments import common  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("out", None, "Output JSON path; PNGs are written beside it.")
flags.DEFINE_integer("num_images", 8192, "Images per sampler.")
flags.DEFINE_integer("size", 32, "Image side.")
flags.DEFINE_integer("seed", 0, "Root seed.")
common.define_tiny(dict(num_images=1024))


def main(argv):
  del argv
  out_dir = os.path.dirname(os.path.abspath(FLAGS.out))
  os.makedirs(out_dir, exist_ok=True)
  n, s = FLAGS.num_images, FLAGS.size
  stats, maps, means_all = {}, {}, {}
  for i, name in enumerate(timesteps.SAMPLER_NAMES):
    sampler = timesteps.get_sampler(name)
    draw = jax.jit(sampler, static_argnums=(1, 2, 3))
    t = np.concatenate([np.asarray(draw(jax.random.fold_in(jax.random.key(FLAGS.seed), 1000 * i + j),
                                        1024, s, s)) for j in range(n // 1024)])
    means = t.mean((1, 2))
    spread = t.max((1, 2)) - t.min((1, 2))
    stats[name] = {"mean_of_means": float(means.mean()), "std_of_means": float(means.std()),
                   "mean_spread": float(spread.mean())}
    maps[name], means_all[name] = t[:4], means
    print(f"{name:12s} mean {means.mean():.4f}  std of means {means.std():.4f}  "
          f"mean spread {spread.mean():.4f}")
  fig, axes = plt.subplots(2, 5, figsize=(16, 6))
  for k, name in enumerate(timesteps.SAMPLER_NAMES):
    axes[0, k].imshow(maps[name][0], cmap="gray", vmin=0, vmax=1)
    axes[0, k].set_title(name)
    axes[0, k].axis("off")
    axes[1, k].hist(means_all[name], bins=50, range=(0, 1), density=True)
    axes[1, k].set_xlabel("per-image mean t")
  fig.suptitle(f"Training timestep samplers at {s}x{s}, {n} images (AsyncPatch Fig. 3)")
  fig.tight_layout()
  fig.savefig(os.path.join(out_dir, "timestep_statistics.png"), dpi=80)
  common.write_json(FLAGS.out, {"size": s, "num_images": n, "samplers": stats})


if __name__ == "__main__":
  common.run(main, required=("out",))
