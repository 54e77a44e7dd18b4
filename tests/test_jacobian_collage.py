"""PIFS collage regulariser (Thm. 15): the probe estimate against the exact cross-block
Frobenius mass of a materialised Jacobian, and its parameter gradient against finite
differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.analysis import collage
from asyncpatch_jax.analysis.patch_stats import patch_permutation

SHAPE, P = (4, 4, 2), 2
N, M, NK = 32, 4, 8


def init(seed, hidden=40):
  rng = np.random.RandomState(seed)
  return {"w1": jnp.asarray(rng.randn(hidden, N) / np.sqrt(N)),
          "b1": jnp.asarray(0.3 * rng.randn(hidden)),
          "w2": jnp.asarray(rng.randn(N, hidden) / np.sqrt(hidden))}


def net(p, x):
  """A small nonlinear network on one image [4, 4, 2]."""
  h = jnp.tanh(p["w1"] @ x.reshape(-1) + p["b1"])
  return (p["w2"] @ h).reshape(x.shape) + 0.5 * x


def exact_cross_mass(p, x):
  j = np.asarray(jax.jacfwd(lambda z: net(p, z))(x)).reshape(N, N)
  perm = patch_permutation(SHAPE, P)
  blocks = j[perm][:, perm].reshape(M, NK, M, NK).transpose(0, 2, 1, 3)
  sq = np.sum(blocks**2, axis=(2, 3))
  return sq.sum() - np.trace(sq)


def test_collage_estimate_is_unbiased():
  with jax.enable_x64(True):
    p = init(0)
    x = jnp.asarray(np.random.RandomState(1).randn(*SHAPE))
    exact = exact_cross_mass(p, x)
    samples = np.asarray(collage.collage_penalty(lambda z: net(p, z), x, patch_size=P,
                                                 key=jax.random.key(0), num_probes=4000,
                                                 return_samples=True))
    se = samples.std() / np.sqrt(samples.size)
    assert abs(samples.mean() - exact) < 4 * se
    assert se < 0.05 * exact  # the check has teeth
    # Batched form: independent examples, one JVP per probe.
    xb = jnp.asarray(np.random.RandomState(2).randn(3, *SHAPE))
    exact_b = np.mean([exact_cross_mass(p, xi) for xi in xb])
    est_b = float(collage.collage_penalty_batch(jax.vmap(lambda z: net(p, z)), xb,
                                                patch_size=P, key=jax.random.key(1),
                                                num_probes=3000))
    assert est_b == pytest.approx(exact_b, rel=0.05)


def test_collage_vanishes_without_cross_blocks():
  """A map acting patch by patch has no cross blocks: every probe gives exactly 0."""
  x = jnp.asarray(np.random.RandomState(3).randn(*SHAPE), jnp.float32)
  samples = collage.collage_penalty(lambda z: jnp.tanh(z) * 3.0, x, patch_size=P,
                                    key=jax.random.key(0), num_probes=16,
                                    return_samples=True)
  assert float(jnp.abs(samples).max()) == 0.0


def test_collage_gradient_matches_finite_differences():
  with jax.enable_x64(True):
    p = init(4)
    x = jnp.asarray(np.random.RandomState(5).randn(2, *SHAPE))
    key = jax.random.key(7)
    loss = jax.jit(lambda q: collage.collage_penalty_batch(
        jax.vmap(lambda z: net(q, z)), x, patch_size=P, key=key, num_probes=4))
    grad = jax.jit(jax.grad(loss))(p)
    rng = np.random.RandomState(6)
    d = jax.tree_util.tree_map(lambda v: jnp.asarray(rng.randn(*v.shape)), p)
    h = 1e-6
    shift = lambda s: jax.tree_util.tree_map(lambda a, b: a + s * b, p, d)
    fd = (float(loss(shift(h))) - float(loss(shift(-h)))) / (2 * h)
    ad = sum(float(jnp.vdot(g, q)) for g, q in zip(jax.tree_util.tree_leaves(grad),
                                                   jax.tree_util.tree_leaves(d)))
    assert ad == pytest.approx(fd, rel=1e-6)


def test_bad_inputs():
  x = jnp.zeros(SHAPE)
  with pytest.raises(ValueError, match="does not divide"):
    collage.collage_penalty(lambda z: z, x, patch_size=3, key=jax.random.key(0))
  with pytest.raises(ValueError, match=r"batch \[B, H, W, C\]"):
    collage.collage_penalty_batch(lambda z: z, x, patch_size=2, key=jax.random.key(0))
  with pytest.raises(ValueError, match="same shape"):
    collage.collage_penalty_batch(lambda z: z[..., :1], x[None], patch_size=2,
                                  key=jax.random.key(0))


def test_collage_loss_for_velocity_model():
  """eps_hat = z + (1 - t) v_hat: cross blocks of d eps_hat / dz are (1 - t) times those
  of d v_hat / dz; the probe estimate matches the exact per-example mass (per-pixel t)."""
  with jax.enable_x64(True):
    p = init(8)
    z = jnp.asarray(np.random.RandomState(9).randn(2, *SHAPE))
    t = jnp.asarray(np.random.RandomState(10).uniform(0.1, 0.9, (2, 4, 4)))
    vel = lambda q, zz, tt: jax.vmap(lambda a, b: net(q, a) * (1.0 + b.mean()))(zz, tt)
    exact = []
    perm = patch_permutation(SHAPE, P)
    for b in range(2):
      eps_b = lambda zb: zb + (1 - t[b])[..., None] * net(p, zb) * (1.0 + t[b].mean())
      j = np.asarray(jax.jacfwd(eps_b)(z[b])).reshape(N, N)
      blocks = j[perm][:, perm].reshape(M, NK, M, NK).transpose(0, 2, 1, 3)
      sq = np.sum(blocks**2, axis=(2, 3))
      exact.append(sq.sum() - np.trace(sq))
    est = float(collage.collage_loss_for_velocity_model(
        vel, p, z, t, key=jax.random.key(3), patch_size=P, num_probes=3000))
    assert est == pytest.approx(np.mean(exact), rel=0.05)
    with pytest.raises(ValueError, match=r"t \[B\] or \[B, H, W\]"):
      collage.collage_loss_for_velocity_model(vel, p, z, t[:, :2], key=jax.random.key(0),
                                              patch_size=P)
