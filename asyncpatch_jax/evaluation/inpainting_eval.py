"""The measurements behind the benchmark tables: samples, inpainting methods with their cost, quality.

Used by experiments/asyncpatch/sampler_ablation.py (AsyncPatch Table 1) and
experiments/asyncpatch/inpainting_benchmark.py (Tables 3-4). Quality is PSNR/SSIM against the
original images, the Frechet distance and PRDC on a feature extractor (named for it,
e.g. `fd_digits`), and LPIPS when weights are given (images smaller than 64 x 64 are
bilinearly upsampled to 64 first: AlexNet's strides need the room). Cost is network
evaluations per image (counted from the schedule) and wall seconds per image (compiled
calls; the first batch, which compiles, is timed apart).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from asyncpatch_jax.runtime import checks
from asyncpatch_jax.data import datasets
from asyncpatch_jax.diffusion import guidance
from asyncpatch_jax.diffusion import repaint
from asyncpatch_jax.diffusion import schedules
from asyncpatch_jax.evaluation import feature_nets
from asyncpatch_jax.evaluation import metrics
from asyncpatch_jax.evaluation import statistics

METHODS = ("asyncpatch", "asyncpatch_input_guidance", "progressive", "repaint")


def dataset_images(name: str, split: str, num: int | None = None, *, data_dir: str | None = None,
                   options: dict | None = None) -> np.ndarray:
  """The first `num` images [N, H, W, C] in [-1, 1] of a registered dataset split.

  data_dir, options: the run's `data.data_dir` and `data.options` (image size, ...).
  """
  src = datasets.get_dataset(name, split, data_dir=data_dir or None, **dict(options or {}))
  n = len(src) if num is None else min(num, len(src))
  return np.stack([np.asarray(src[i]["image"], np.float32) for i in range(n)])


def sample(generator, params, num: int, image_shape, *, num_steps: int, eta: float,
           key: jax.Array, batch: int, guidance_weight: float = 0.0, bar=None,
           multiple_of: int = 1) -> np.ndarray:
  """`num` synchronous samples [N, H, W, C]; labels cycle over the classes of a conditional model.

  image_shape: the pixels' [H, W, C] (a latent model's generator samples tokens and
  decodes them). The batch is min(batch, num) rounded up to a multiple of `multiple_of`
  (the device count of the generator's mesh, so that every batch is split over it); batch
  i (images i .. i + batch) draws from fold_in(key, i); a ragged last batch is padded to
  the batch (so one compilation serves all) and the padding dropped. bar: an optional
  progress bar, advanced once per batch.
  """
  h, w, _ = image_shape
  task = generator.task(schedules.synchronous(num_steps, h, w), image_shape=image_shape)
  batch = -(-min(batch, num) // multiple_of) * multiple_of
  num_classes = generator.model.num_classes
  out = []
  for i in range(0, num, batch):
    labels = (np.arange(i, i + batch) % num_classes).astype(np.int32) if num_classes else None
    images = generator.generate(params, task, key=jax.random.fold_in(key, i), num=batch,
                                labels=labels, guidance_weight=guidance_weight, eta=eta)
    out.append(images[:num - i])
    if bar is not None:
      bar.update(1)
  return np.concatenate(out)


# The methods that run on a latent diffusion model (their schedule maps to tokens).
LATENT_METHODS = ("asyncpatch", "asyncpatch_input_guidance", "progressive")


def method(name: str, generator, params, *, num_steps: int, eta: float,
           input_guidance: float = 1.0, num_stripes: int = 4,
           repaint_params: tuple[int, int, int] = (250, 10, 10)) -> tuple[Callable, int]:
  """(fn(x [B, H, W, C], masks [B, H, W], key) -> inpainted, network evaluations per image).

  asyncpatch: the Eq. 4 schedule, `num_steps` steps; asyncpatch_input_guidance: the same
  with input guidance of the known region (Eq. 8, two evaluations a step); progressive:
  `num_stripes` stripes from the known boundary inward, num_steps / num_stripes steps
  each (Growing Images Sec. 2); repaint: RePaint's resampling (diffusion/repaint.py) with
  `repaint_params` = (num_steps, jump_length, jump_n_sample), eta = 1 (its DDPM step).
  Conditional models get their null label (unconditional inpainting).
  A latent diffusion model's generator (one with a codec; LATENT_METHODS only) runs the
  pixel schedule on tokens (a token is known only if its cell and halo are), its known
  tokens the masked images' encodings; the decoded output gets the known pixels back.
  """
  checks.check_choice(name, METHODS, "inpainting method")
  if generator.codec is not None:
    checks.check_choice(name, LATENT_METHODS, "inpainting method of a latent model")
  extra = dict(input_guidance=input_guidance) if name == "asyncpatch_input_guidance" else {}

  def scheduled(schedule):
    """fn(x, m, k) running the pixel schedule(m) (on tokens for a latent model)."""
    return lambda x, m, k: generator.generate(params, generator.task(schedule(m), x, m),
                                              key=k, eta=eta, **extra)

  if name in ("asyncpatch", "asyncpatch_input_guidance"):
    return (scheduled(lambda m: schedules.inpainting(m, num_steps)),
            (2 if extra else 1) * num_steps)
  if name == "progressive":
    per = max(num_steps // num_stripes, 1)
    # Random masks' holes may be shallower than num_stripes: such stripes stay empty.
    return (scheduled(lambda m: schedules.progressive(m, num_stripes, per, allow_empty=True)),
            per * num_stripes)
  model = generator.model
  inpaint = repaint.RePaint(guidance.model_velocity_fn(model), mesh=generator.mesh)
  ns, jl, jn = repaint_params
  nfe = repaint.num_model_steps(repaint.jump_schedule(ns, jl, jn))

  def run(x, m, k):
    cond = {"params": params}
    if model.num_classes:
      cond["y"] = jnp.full((x.shape[0],), model.null_label, jnp.int32)
    return inpaint(x, m, key=k, num_steps=ns, jump_length=jl, jump_n_sample=jn, **cond)

  return run, nfe


def run_inpainting(fn: Callable, images: np.ndarray, masks: np.ndarray, key: jax.Array,
                   batch: int, bar=None, multiple_of: int = 1) -> tuple[np.ndarray, dict]:
  """Inpaints all images in batches; (outputs, {'seconds_per_image', 'first_batch_seconds'}).

  The batch is min(batch, #images) rounded up to a multiple of `multiple_of` (the
  device count of a mesh); a ragged batch is padded to it (repeating its last image) so
  that one compilation serves every batch. bar: an optional progress bar, advanced per
  batch.
  """
  batch = -(-min(batch, len(images)) // multiple_of) * multiple_of
  out, first, later, n_later = [], 0.0, 0.0, 0
  for i in range(0, len(images), batch):
    x, m = images[i:i + batch], masks[i:i + batch]
    n = len(x)
    if n < batch:
      pad = lambda a: np.concatenate([a, np.repeat(a[-1:], batch - n, axis=0)])
      x, m = pad(x), pad(m)
    t = time.perf_counter()
    res = np.asarray(jax.block_until_ready(fn(x, m, jax.random.fold_in(key, i))))[:n]
    dt = time.perf_counter() - t
    if i == 0:
      first = dt
    else:
      later, n_later = later + dt * n / len(x), n_later + n
    out.append(res)
    if bar is not None:
      bar.update(1)
  per_image = later / n_later if n_later else first / batch     # (compile time included)
  return np.concatenate(out), {"seconds_per_image": per_image, "first_batch_seconds": first}


def _lpips_mean(lpips_fn, a: np.ndarray, b: np.ndarray, batch: int) -> float:
  if a.shape[1] < 64:
    size = (64, 64 * a.shape[2] // a.shape[1])
    up = lambda z: jax.image.resize(jnp.asarray(z), (z.shape[0], *size, z.shape[3]), "bilinear")
  else:
    up = jnp.asarray
  return float(np.mean(np.concatenate([np.asarray(lpips_fn(up(a[i:i + batch]), up(b[i:i + batch])))
                                       for i in range(0, len(a), batch)])))


def quality(outputs: np.ndarray, originals: np.ndarray, extractor, *, lpips_fn=None,
            batch: int = 256, k: int = 5, mesh: jax.sharding.Mesh | None = None,
            real_features: dict | None = None, interval_resamples: int = 0,
            per_image: bool = False) -> dict:
  """PSNR/SSIM vs the originals, Frechet distance and PRDC vs the originals, LPIPS if given.

  extractor: one feature extractor or a sequence of them (each adds its named metrics).
  mesh: feature extraction and PRDC split over its devices. real_features: {extractor
  name: features of the originals} already extracted (reused across mask families).
  interval_resamples > 0 adds 'psnr_interval', 'ssim_interval' (BCa bootstrap over the
  images) and each Frechet distance's paired interval (statistics.py). per_image=True adds
  'per_image': {'psnr', 'ssim'} arrays [N] (for paired comparisons; not JSON).
  """
  window = min(11, *outputs.shape[1:3])
  window -= 1 - window % 2                               # an odd SSIM window that fits
  psnr = np.asarray(metrics.psnr(outputs, originals))                  # float32 [N]
  ssim = np.asarray(metrics.ssim(outputs, originals, filter_size=window))
  out = {"psnr": float(np.mean(psnr)), "ssim": float(np.mean(ssim))}
  psnr, ssim = psnr.astype(np.float64), ssim.astype(np.float64)
  if interval_resamples:
    for name, v in (("psnr", psnr), ("ssim", ssim)):
      out[name + "_interval"] = statistics.interval(v, resamples=interval_resamples).as_dict()
  for ex in (extractor if isinstance(extractor, (list, tuple)) else [extractor]):
    out.update(feature_nets.feature_metrics(
        ex, originals, outputs, k=k, batch_size=batch, mesh=mesh,
        real_features=(real_features or {}).get(ex.name),
        interval_resamples=interval_resamples, paired=True))
  if per_image:
    out["per_image"] = {"psnr": psnr, "ssim": ssim}
  if lpips_fn is not None:
    out["lpips"] = _lpips_mean(lpips_fn, outputs, originals, batch)
  return out
