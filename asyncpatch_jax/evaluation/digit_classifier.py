"""The in-project digit classifier that scores samples of the default digits model.

A small CNN trained on the digits train split (with +-1 pixel shifts) and
evaluated on the held-out test split; it is the offline stand-in for a
pretrained feature extractor and is only ever called what it is.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from asyncpatch_jax.data import datasets


class DigitClassifier(nn.Module):
  """logits = DigitClassifier()(images [B, 16, 16, 1] in [-1, 1]) -> [B, 10]."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.relu(nn.Conv(32, (3, 3))(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Conv(64, (3, 3), strides=(2, 2))(x))
    x = nn.relu(nn.Dense(128)(x.reshape(x.shape[0], -1)))
    self.sow("intermediates", "features", x)     # penultimate features (feature_nets.py)
    return nn.Dense(self.num_classes)(x)


def _arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
  src = datasets.get_dataset("digits", split)
  examples = [src[i] for i in range(len(src))]
  return (np.stack([e["image"] for e in examples]).astype(np.float32),
          np.array([e["label"] for e in examples], np.int32))


def _shift(key, images):
  """Random +-1 pixel translations (zero = background -1 padding)."""
  padded = jnp.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-1.0)
  offsets = jax.random.randint(key, (images.shape[0], 2), 0, 3)
  h, w = images.shape[1:3]
  return jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, im.shape[-1])))(
      padded, offsets)


def train_classifier(key: jax.Array, num_steps: int = 600, batch_size: int = 128,
                     learning_rate: float = 2e-3):
  """Trains on digits 'train'; returns (params, held-out accuracy on 'test')."""
  x_train, y_train = _arrays("train")
  x_test, y_test = _arrays("test")
  model = DigitClassifier()
  params = jax.jit(model.init)(key, jnp.zeros((1, *x_train.shape[1:])))["params"]
  tx = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps))
  x_train, y_train = jnp.asarray(x_train), jnp.asarray(y_train)

  @jax.jit
  def step(params, opt_state, k):
    k_idx, k_aug = jax.random.split(k)
    idx = jax.random.randint(k_idx, (batch_size,), 0, x_train.shape[0])
    x = _shift(k_aug, x_train[idx])

    def loss_fn(p):
      logits = model.apply({"params": p}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y_train[idx]).mean()

    grads = jax.grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  # A host loop over one compiled step: XLA:CPU runs the transposed convolutions of a
  # backward pass several times slower inside a scan/while loop.
  opt_state = tx.init(params)
  for i in range(num_steps):
    params, opt_state = step(params, opt_state, jax.random.fold_in(key, i + 1))
  accuracy = float(np.mean(np.argmax(np.asarray(classify(params, x_test)), -1) == y_test))
  return params, accuracy


@jax.jit
def classify(params, images: jax.Array) -> jax.Array:
  """Class probabilities [B, 10] of images [B, 16, 16, 1] in [-1, 1]."""
  return jax.nn.softmax(DigitClassifier().apply({"params": params}, images), axis=-1)


@jax.jit
def features(params, images: jax.Array) -> jax.Array:
  """Penultimate (128-d, post-ReLU) features [B, 128] of images [B, 16, 16, 1] in [-1, 1]."""
  _, state = DigitClassifier().apply({"params": params}, images, mutable=["intermediates"])
  return state["intermediates"]["features"][0]
