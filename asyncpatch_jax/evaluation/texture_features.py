"""The in-project feature network of the embedded textures: a small CNN trained to tell the
source image of a crop.

The textures dataset (data/textures.py) cuts crops from a few bundled scikit-image
photos and textures and labels each crop with the index of its source image. The proxy
task is that label: which of the (default 7) source images a crop comes from (chance
1/7). Training crops come from the top 80 % of every image's rows (the `train` split),
the held-out accuracy is measured on crops from the bottom 20 % (`test`), which share
no pixel with them. The penultimate 128-d layer (after a global average pool, so the
features describe local texture statistics and any crop size works) is the feature
space of `fd_textures`, `precision_textures`, ... (evaluation/feature_nets.py): the
offline stand-in for a pretrained extractor, only ever called what it is.

Deterministic per key (one compiled step, batches and flips drawn from fold_in(key, i)).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from asyncpatch_jax.data import datasets

FEATURE_DIM = 128


class TextureClassifier(nn.Module):
  """logits = TextureClassifier(num_classes)(images [B, S, S, 3] in [-1, 1]) -> [B, num_classes]."""
  num_classes: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(32, (4, 4), strides=(2, 2))(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Conv(64, (3, 3))(x))
    x = jnp.mean(x, axis=(1, 2))                      # global average pool: any crop size
    x = nn.relu(nn.Dense(FEATURE_DIM)(x))
    self.sow("intermediates", "features", x)          # penultimate features (feature_nets.py)
    return nn.Dense(self.num_classes)(x)


def crops(split: str, num: int, options: dict | None = None):
  """(the first `num` crops [N, S, S, 3] of a textures split, their source-image labels [N],
  the number of source images)."""
  src = datasets.get_dataset("textures", split, **dict(options or {}))
  examples = [src[i] for i in range(min(num, len(src)))]
  return (np.stack([e["image"] for e in examples]).astype(np.float32),
          np.array([e["label"] for e in examples], np.int32), src.num_classes)


def _optimizer(learning_rate: float, num_steps: int) -> optax.GradientTransformation:
  return optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))


@functools.partial(jax.jit, static_argnames=("batch_size", "learning_rate", "num_steps"))
def _train_step(params, opt_state, key, x_train, y_train, *, batch_size: int,
                learning_rate: float, num_steps: int):
  """One Adam step on a random batch (random horizontal flips). The data are arguments,
  not closed-over constants: a 50 MB constant would be compiled into the program."""
  k_idx, k_flip = jax.random.split(key)
  idx = jax.random.randint(k_idx, (batch_size,), 0, x_train.shape[0])
  flip = jax.random.bernoulli(k_flip, 0.5, (batch_size, 1, 1, 1))
  x = jnp.where(flip, x_train[idx][:, :, ::-1], x_train[idx])

  def loss_fn(p):
    return optax.softmax_cross_entropy_with_integer_labels(
        _model(p).apply({"params": p}, x), y_train[idx]).mean()

  grads = jax.grad(loss_fn)(params)
  updates, opt_state = _optimizer(learning_rate, num_steps).update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def train_classifier(key: jax.Array, num_steps: int = 600, *, options: dict | None = None,
                     num_train: int = 4096, num_test: int = 1024, batch_size: int = 64,
                     learning_rate: float = 2e-3):
  """Trains on `num_train` textures 'train' crops (random horizontal flips).

  options: the dataset options of the model being scored (data.options: image_size,
  images, ...), so the network sees the crops the model was trained on.
  Returns (params, crop shape [S, S, 3], held-out accuracy on `num_test` 'test' crops).
  """
  x_train, y_train, num_classes = crops("train", num_train, options)
  x_test, y_test, _ = crops("test", num_test, options)
  params = jax.jit(TextureClassifier(num_classes).init)(
      key, jnp.zeros((1, *x_train.shape[1:])))["params"]
  opt_state = _optimizer(learning_rate, num_steps).init(params)
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)
  # A host loop over one compiled step, as digit_classifier.py: XLA:CPU runs the backward
  # convolutions several times slower inside a scan.
  for i in range(num_steps):
    params, opt_state = _train_step(params, opt_state, jax.random.fold_in(key, i + 1), x_train,
                                    y_train, batch_size=batch_size, learning_rate=learning_rate,
                                    num_steps=num_steps)
  predicted = np.concatenate([np.argmax(np.asarray(logits(params, x_test[i:i + 256])), -1)
                              for i in range(0, len(x_test), 256)])
  return params, x_test.shape[1:], float(np.mean(predicted == y_test))


def _model(params) -> TextureClassifier:
  return TextureClassifier(params["Dense_1"]["bias"].shape[0])    # classes from the output layer


@jax.jit
def logits(params, images: jax.Array) -> jax.Array:
  """Logits [B, num_classes] (which source image) of crops [B, S, S, 3] in [-1, 1]."""
  return _model(params).apply({"params": params}, images)


@jax.jit
def features(params, images: jax.Array) -> jax.Array:
  """Penultimate (128-d, post-ReLU) features [B, 128] of crops [B, S, S, 3] in [-1, 1]."""
  _, state = _model(params).apply({"params": params}, images, mutable=["intermediates"])
  return state["intermediates"]["features"][0]
