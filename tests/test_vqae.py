"""The localized VQ autoencoder: exact locality (VJPs), straight-through VQ and its loss vs NumPy,
codebook usage, the adaptive GAN weight vs two full gradients, paper sizes, bad input."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.config import base_config
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.models import vqae
from asyncpatch_jax.training import autoencoder_losses as ae_losses
from asyncpatch_jax.training import autoencoder_train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# f = 4, encoder kernels (3, 3, 1), one block per level: halo = 3 * 1 + 2 * 2 = 7 pixels.
TINY = vqae.VQAutoencoder(image_channels=3, base_channels=4, channel_mult=(1, 2, 4),
                          num_res_blocks=1, latent_channels=3, codebook_size=16,
                          encoder_kernels=(3, 3, 1), mask_embed_dim=8)
S = 32


def _compiled_init(ae, shape):
  init = jax.jit(lambda k: vqae.init_variables(ae, k, shape))
  key = jax.random.key(0)
  return init.lower(key).compile({"xla_backend_optimization_level": 0})(key)


@pytest.fixture(scope="module")
def tiny_variables():
  variables = _compiled_init(TINY, (S, S, 3))
  # Zero-initialised FiLM projections would hide the mask; randomise every parameter.
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda a: jnp.asarray(np.asarray(a) + 0.3 * rng.normal(size=a.shape),
                                            jnp.float32), variables)


def _cell_and_halo(i, j, halo, size=S, f=4):
  allowed = np.zeros((size, size), bool)
  allowed[max(f * i - halo, 0):f * i + f + halo, max(f * j - halo, 0):f * j + f + halo] = True
  return allowed


def test_halo_formula():
  # Level l adds (k - 1) / 2 * 2^l per k x k conv: conv_in + 2 per block at level 0, 2 per
  # block at level 1, 2 per block + 4 (middle) + 1 (conv_out) at the last level.
  assert TINY.halo == 1 * 3 + 2 * 2 + 0
  assert vqae.encoder_halo((1, 2, 4), 2, (3, 3, 3)) == 5 + 2 * 4 + 4 * 9
  assert vqae.encoder_halo((1, 2, 4), 2, (1, 1, 1)) == 0


def test_each_token_depends_only_on_its_cell_and_halo(tiny_variables):
  """VJPs of every latent token w.r.t. image and mask are exactly 0 outside cell + halo."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=(1, S, S, 3)), jnp.float32)
  mask = jnp.asarray(rng.uniform(size=(1, S, S)) > 0.3, jnp.float32)

  def encode(x, m):
    return TINY.apply(tiny_variables, x, m, method=TINY.encode)

  @jax.jit
  def all_vjps(x, m):
    y, vjp = jax.vjp(encode, x, m)
    basis = jnp.eye(y.size, dtype=y.dtype).reshape(y.size, *y.shape)
    return jax.vmap(vjp)(basis)

  gx, gm = all_vjps(x, mask)
  n = S // 4
  gx = np.abs(np.asarray(gx)).reshape(n, n, 3, S, S, 3).sum(axis=(2, 5))   # [i, j, H, W]
  gm = np.abs(np.asarray(gm)).reshape(n, n, 3, S, S).sum(axis=2)
  halo = TINY.halo
  for i in range(n):
    for j in range(n):
      outside = ~_cell_and_halo(i, j, halo)
      assert np.all(gx[i, j][outside] == 0.0) and np.all(gm[i, j][outside] == 0.0), (i, j)
  # Hidden pixels (mask 0) have no influence at all.
  assert np.all(gx[..., np.asarray(mask[0]) == 0] == 0.0)
  # The bound is tight: an interior token does depend on pixels at distance `halo`.
  rows = np.flatnonzero(gx[4, 4].sum(axis=1) + gm[4, 4].sum(axis=1))
  cols = np.flatnonzero(gx[4, 4].sum(axis=0) + gm[4, 4].sum(axis=0))
  assert (rows.min(), rows.max(), cols.min(), cols.max()) == (16 - halo, 19 + halo, 16 - halo,
                                                              19 + halo)


def test_hidden_pixels_and_far_mask_values_do_not_change_latents(tiny_variables):
  rng = np.random.default_rng(3)
  enc = jax.jit(lambda x, m: TINY.apply(tiny_variables, x, m, method=TINY.encode))
  x = rng.normal(size=(2, S, S, 3)).astype(np.float32)
  mask = (rng.uniform(size=(2, S, S)) > 0.4).astype(np.float32)
  mask[:, :, :S // 2] = 1.0                    # a known left half: some tokens fully known
  h = np.asarray(enc(x, mask))
  # Any values at the hidden pixels: no latent changes at all (bitwise).
  x2 = np.where(mask[..., None] > 0, x, 100.0 * rng.normal(size=x.shape)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(enc(x2, mask)), h)
  # Flipping mask values outside token (i, j)'s cell + halo leaves that token bitwise equal.
  for i, j in ((0, 0), (3, 4), (7, 2)):
    far = ~_cell_and_halo(i, j, TINY.halo)
    m2 = mask.copy()
    m2[:, far] = 1.0 - m2[:, far]
    h2 = np.asarray(enc(x, m2))
    np.testing.assert_array_equal(h2[:, i, j], h[:, i, j])
    assert np.abs(h2 - h).max() > 0           # the flips did change other tokens
  # Tokens whose cell and halo are known encode exactly as in the unmasked image.
  known = vqae.token_mask(mask, TINY.factor, TINY.halo) > 0
  full = np.asarray(enc(x, np.ones_like(mask)))
  assert known.sum() == 2 * 8 * 2               # token columns 0, 1: 4 j + 3 + halo < 16
  np.testing.assert_array_equal(h[known], full[known])


def test_token_mask_and_receptive_field_max_match_brute_force():
  rng = np.random.default_rng(4)
  mask = (rng.uniform(size=(3, 16, 24)) > 0.1).astype(np.float32)
  values = rng.uniform(size=(2, 3, 16, 24))
  for halo in (0, 1, 5):
    tm = vqae.token_mask(mask, 4, halo)
    rf = vqae.receptive_field_max(values, 4, halo)
    assert tm.shape == (3, 4, 6) and rf.shape == (2, 3, 4, 6)
    for i in range(4):
      for j in range(6):
        r0, r1 = max(4 * i - halo, 0), min(4 * i + 4 + halo, 16)
        c0, c1 = max(4 * j - halo, 0), min(4 * j + 4 + halo, 24)
        np.testing.assert_array_equal(tm[:, i, j], mask[:, r0:r1, c0:c1].min(axis=(1, 2)))
        np.testing.assert_array_equal(rf[..., i, j], values[..., r0:r1, c0:c1].max(axis=(-2, -1)))


def test_straight_through_quantisation_and_vq_loss_match_numpy():
  rng = np.random.default_rng(5)
  k, d = 32, 3
  vq = vqae.VectorQuantizer(k, d)
  h = jnp.asarray(rng.normal(size=(2, 4, 5, d)), jnp.float32)
  codebook = rng.normal(size=(k, d)).astype(np.float32)
  params = {"params": {"codebook": jnp.asarray(codebook)}}
  z_st, z_q, idx = jax.jit(vq.apply)(params, h)
  flat = np.asarray(h, np.float64).reshape(-1, d)
  ref_idx = np.argmin(((flat[:, None, :] - codebook[None].astype(np.float64)) ** 2).sum(-1), axis=1)
  np.testing.assert_array_equal(np.asarray(idx).reshape(-1), ref_idx)
  np.testing.assert_array_equal(np.asarray(z_q).reshape(-1, d), codebook[ref_idx])
  np.testing.assert_array_equal(np.asarray(z_st), np.asarray(z_q))
  # Straight-through: d/dh sum(w * z_st) = w, unchanged.
  w = jnp.asarray(rng.normal(size=h.shape), jnp.float32)
  g = jax.jit(jax.grad(lambda hh: jnp.sum(w * vq.apply(params, hh)[0])))(h)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
  # The two terms and both beta conventions; gradients of the loss w.r.t. h and the codebook.
  zq = codebook[ref_idx].astype(np.float64)
  n = flat.size
  mse = ((flat - zq) ** 2).sum() / n
  for beta_on, (w_commit, w_book) in (("codebook", (1.0, 0.25)), ("commitment", (0.25, 1.0))):
    def loss(hh, cb):
      _, zq_, _ = vq.apply({"params": {"codebook": cb}}, hh)
      return ae_losses.vq_loss(hh, zq_, 0.25, beta_on)

    (value, terms), (gh, gcb) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(
        h, jnp.asarray(codebook))
    np.testing.assert_allclose(terms["commitment_loss"], mse, rtol=1e-5)
    np.testing.assert_allclose(terms["codebook_loss"], mse, rtol=1e-5)
    np.testing.assert_allclose(value, (w_commit + w_book) * mse, rtol=1e-5)
    # d/dh = 2 w_commit (h - zq) / n; d/de_k = 2 w_book sum_{i: idx_i = k} (e_k - h_i) / n.
    np.testing.assert_allclose(np.asarray(gh).reshape(-1, d), 2 * w_commit * (flat - zq) / n,
                               rtol=1e-4, atol=1e-7)
    ref_gcb = np.zeros((k, d))
    np.add.at(ref_gcb, ref_idx, 2 * w_book * (zq - flat) / n)
    np.testing.assert_allclose(np.asarray(gcb), ref_gcb, rtol=1e-4, atol=1e-7)


def test_codebook_usage_matches_numpy():
  idx = np.array([[0, 0, 3], [3, 3, 7]])
  usage = jax.jit(ae_losses.codebook_usage, static_argnums=1)
  counts, ppl = usage(jnp.asarray(idx), 8)
  np.testing.assert_array_equal(np.asarray(counts), np.bincount(idx.ravel(), minlength=8))
  p = np.array([2, 3, 1]) / 6
  np.testing.assert_allclose(ppl, np.exp(-(p * np.log(p)).sum()), rtol=1e-6)
  assert float(usage(jnp.arange(6).reshape(2, 3), 6)[1]) == pytest.approx(6.0, rel=1e-6)


def _tiny_ae_config(**autoencoder):
  config = base_config.load_config_file(os.path.join(ROOT, "configs", "vqae_textures.py"))
  with config.unlocked():
    config.data.options = {"image_size": 24, "num_examples": 64}
    config.autoencoder.update(base_channels=4, codebook_size=16, mask_embed_dim=8,
                              disc_channels=4, disc_layers=2, **autoencoder)
    config.train.update(batch_size=4, num_steps=10, progress_bar=False)
  return config


def test_adaptive_weight_equals_the_ratio_of_two_full_gradients():
  """taming's weight, computed in `losses` from the last layer's features, vs two jax.grads
  of the whole autoencoder loss terms (nll and g) taken at the decoder's `conv_out` kernel."""
  config = _tiny_ae_config(disc_weight=0.75)
  setup = autoencoder_train.AutoencoderSetup(config, devices=jax.devices()[:1])
  state = jax.jit(setup.init_state).lower(jax.random.key(0)).compile(
      {"xla_backend_optimization_level": 0})(jax.random.key(0))
  rng = np.random.default_rng(6)
  batch = {"image": np.stack([setup.source[i]["image"] for i in range(4)]),
           "mask": (rng.uniform(size=(4, 24, 24)) > 0.3).astype(np.float32)}
  ae, disc = setup.ae, setup.disc

  def parts(params):
    x_rec, _, _, _ = ae.apply({"params": params}, batch["image"], batch["mask"])
    nll = ae_losses.masked_l1(batch["image"], x_rec, batch["mask"])
    g = -jnp.mean(disc.apply({"params": state.disc_params}, x_rec))
    return nll, g

  @jax.jit
  def both(params):
    scalars = autoencoder_train.losses(params, state.disc_params, batch, setup=setup,
                                       disc_on=jnp.float32(1.0))[1][0]
    g_nll = jax.grad(lambda p: parts(p)[0])(params)["conv_out"]["kernel"]
    g_g = jax.grad(lambda p: parts(p)[1])(params)["conv_out"]["kernel"]
    return scalars, g_nll, g_g

  scalars, g_nll, g_g = both(state.params)
  ref = 0.75 * np.clip(np.linalg.norm(np.asarray(g_nll, np.float64))
                       / (np.linalg.norm(np.asarray(g_g, np.float64)) + 1e-4), 0, 1e4)
  assert ref > 0
  np.testing.assert_allclose(scalars["adaptive_weight"], ref, rtol=1e-4)


def _expected_parameter_count(c=3, base=128, mult=(1, 2, 4), nrb=2, latent=3, k=8192,
                              kernels=(3, 3, 1), e=128):
  """Table 7's autoencoder counted by hand from the architecture in models/vqae.py."""
  conv = lambda i, o, s: s * s * i * o + o
  dense = lambda i, o: i * o + o

  def res(i, o, s):
    skip = conv(i, o, 1) if i != o else 0
    return i + conv(i, o, s) + dense(e, 2 * o) + o + conv(o, o, s) + skip

  embed = 2 * dense(e, e)
  chans = [base * m for m in mult]
  n = embed + conv(c + 1, base, kernels[0])                         # encoder
  ch = base
  for level, out in enumerate(chans):
    for _ in range(nrb):
      n, ch = n + res(ch, out, kernels[level]), out
    if level < len(mult) - 1:
      n += conv(ch, ch, 2)
  n += 2 * res(ch, ch, kernels[-1]) + ch + conv(ch, latent, kernels[-1])
  n += 2 * conv(latent, latent, 1) + k * latent                     # quant convs, codebook
  ch = chans[-1]
  n += embed + conv(latent, ch, 3) + 2 * res(ch, ch, 3)             # decoder
  for level in reversed(range(len(mult))):
    for _ in range(nrb + 1):
      n, ch = n + res(ch, chans[level], 3), chans[level]
    if level:
      n += conv(ch, ch, 3)
  return n + ch + conv(ch, c, 3)


PAPER_AE_PARAMS = 38_806_686     # with encoder kernels (3, 3, 1) (latent diffusion's: 55.3M)


@pytest.mark.parametrize("name", ["vqae_imagenet256", "vqae_lsun_bedroom"])
def test_paper_autoencoders_build_through_eval_shape(name):
  config = base_config.load_config_file(os.path.join(ROOT, "configs", f"{name}.py"))
  ae = vqae.build_autoencoder(config.autoencoder)
  shapes = jax.eval_shape(lambda k: vqae.init_variables(ae, k, (256, 256, 3)), jax.random.key(0))
  n = sum(x.size for x in jax.tree.leaves(shapes))
  assert n == _expected_parameter_count() == PAPER_AE_PARAMS
  assert shapes["params"]["quantizer"]["codebook"].shape == (8192, 3)
  assert ae.latent_shape((256, 256, 3)) == (64, 64, 3) and ae.halo == 13
  out = jax.eval_shape(lambda v, x, m: ae.apply(v, x, m, method=ae.encode), shapes,
                       jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32),
                       jax.ShapeDtypeStruct((2, 256, 256), jnp.float32))
  assert out.shape == (2, 64, 64, 3)


def test_bad_inputs_raise_input_errors(tiny_variables):
  enc = functools.partial(TINY.apply, tiny_variables, method=TINY.encode)
  dec = functools.partial(TINY.apply, tiny_variables, method=TINY.decode)
  x = np.zeros((1, S, S, 3), np.float32)
  ones = np.ones((1, S, S), np.float32)
  with pytest.raises(checks.InputError, match="not divisible by 4"):
    enc(np.zeros((1, 30, S, 3), np.float32), np.ones((1, 30, S)))
  with pytest.raises(checks.InputError, match=r"mask has shape \(1, 16, 16\)"):
    enc(x, np.ones((1, 16, 16)))
  with pytest.raises(checks.InputError, match="only 0 and 1"):
    enc(x, 0.5 * ones)
  with pytest.raises(checks.InputError, match="image_channels=3"):
    enc(np.zeros((1, S, S, 1), np.float32), ones)
  with pytest.raises(checks.InputError, match="decodes to pixels"):
    dec(np.zeros((1, 8, 8, 3), np.float32), np.ones((1, 16, 16)))
  with pytest.raises(checks.InputError, match="mask must be binary"):
    vqae.token_mask(0.5 * ones, 4, 1)
  config = _tiny_ae_config()
  with config.unlocked():
    config.autoencoder.encoder_kernels = (3, 2, 1)
  with pytest.raises(checks.InputError, match="odd kernel"):
    autoencoder_train.AutoencoderSetup(config, devices=jax.devices()[:1])
  with config.unlocked():
    config.autoencoder.encoder_kernels = (3, 1, 1)
    config.autoencoder.mask_families = ("box", "thinn")
  with pytest.raises(checks.InputError, match="Did you mean 'thin'"):
    autoencoder_train.AutoencoderSetup(config, devices=jax.devices()[:1])
  with config.unlocked():
    config.autoencoder.mask_families = ("box",)
    config.autoencoder.disc_weight = 0.75
    config.autoencoder.disc_layers = 3
    config.data.options = {"image_size": 16, "num_examples": 64}
  with pytest.raises(checks.InputError, match="at least 24x24"):
    autoencoder_train.AutoencoderSetup(config, devices=jax.devices()[:1])


def test_lpips_term_compares_the_known_pixels():
  """nll = l1_weight * L1 + lpips_weight * LPIPS(composite, x), the hidden pixels taken from x
  (evaluation/lpips.py on random non-negative weights; the LPIPS module is tested there)."""
  from asyncpatch_jax.evaluation import lpips
  config = _tiny_ae_config()                     # no weights file: the distance is set below
  with config.unlocked():
    config.data.options = {"image_size": 64, "num_examples": 8}
    config.train.batch_size = 2
  setup = autoencoder_train.AutoencoderSetup(config, devices=jax.devices()[:1])
  with config.unlocked():
    config.autoencoder.lpips_weight = 0.5
  rng = np.random.default_rng(7)
  variables = jax.tree.map(lambda s: jnp.asarray(0.1 * np.abs(rng.normal(size=s.shape)),
                                                 jnp.float32), lpips.variable_shapes("alex"))
  setup.lpips = lpips.LPIPSDistance(variables, "alex")
  state = jax.jit(setup.init_state).lower(jax.random.key(0)).compile(
      {"xla_backend_optimization_level": 0})(jax.random.key(0))
  x = np.stack([setup.source[i]["image"] for i in range(2)])
  m = np.ones((2, 64, 64), np.float32)
  m[:, :20] = 0.0
  loss_fn = jax.jit(lambda p: autoencoder_train.losses(p, {}, {"image": x, "mask": m}, setup=setup,
                                                       disc_on=jnp.float32(0.0)))
  _, (scalars, x_rec, _, _) = loss_fn(state.params)
  composite = np.where(m[..., None] > 0, np.asarray(x_rec), x)
  l1 = np.abs(m[..., None] * (x - np.asarray(x_rec))).sum() / (m.sum() * 3)
  ref = l1 + 0.5 * float(np.mean(setup.lpips(composite, x)))
  assert float(np.mean(setup.lpips(np.asarray(x_rec), x))) != pytest.approx(
      float(np.mean(setup.lpips(composite, x))))     # the composite matters
  np.testing.assert_allclose(scalars["nll"], ref, rtol=1e-5)
