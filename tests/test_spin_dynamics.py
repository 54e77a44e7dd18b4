"""Scheduled mean-field recursion (Eq. 13), m* and Prop. 4.2, against float64 NumPy references."""

import jax
import numpy as np
import pytest

from asyncpatch_jax import spin

NAMES = ("parallel", "progressive_lr", "progressive_rl", "interleaved")


def np_mu(u, delta):
  return 2 * np.sinh(u) / (np.exp(delta) + 2 * np.cosh(u))


def reference_pi(name, t, hidden, num_blocks, num_steps, t_int):
  """pi^(t) written out from the paper's description (Section 4.2)."""
  pi = np.zeros(num_blocks)
  if name == "parallel":
    pi[hidden] = 1.0 / len(hidden)
  elif name == "progressive_lr":
    pi[hidden[t // (num_steps // len(hidden))]] = 1.0
  elif name == "progressive_rl":
    pi[hidden[::-1][t // (num_steps // len(hidden))]] = 1.0
  elif name == "interleaved":
    pi[hidden[(t // t_int) % len(hidden)]] = 1.0
  return pi


def reference_run(m0, pis, j_intra, j_inter, delta, h, n, clamps):
  """Eq. 13 step by step in float64 with explicit neighbour sums."""
  m = np.array(m0, float)
  for block, value in clamps.items():
    m[:, block] = value
  num_blocks = m.shape[1]
  for pi in pis:
    u = j_intra * m + h
    u[:, 1:] += j_inter * m[:, :-1]
    u[:, :-1] += j_inter * m[:, 1:]
    m = m + pi / n * (np_mu(u, delta) - m)
  return m


CHAIN = dict(num_blocks=5, block_size=2, j_intra=1.0, j_inter=0.6, delta=0.5, fields=0.1,
             clamped={0: 1.0})


@pytest.mark.parametrize("name", NAMES + ("custom",))
def test_recursion_matches_numpy_reference(name):
  chain = spin.BlockChain(**CHAIN)
  rng = np.random.default_rng(0)
  num_steps, t_int = 40, 3
  hidden = list(chain.hidden)
  if name == "custom":
    spec = rng.dirichlet(np.ones(len(hidden)), size=num_steps)
    spec = np.insert(spec, 0, 0.0, axis=1)                       # no mass on clamped block 0
    pis = spec
  else:
    spec = name
    pis = [reference_pi(name, t, hidden, 5, num_steps, t_int) for t in range(num_steps)]
  schedule = spin.make_schedule(spec, chain, num_steps, interleave_steps=t_int)
  np.testing.assert_array_equal(schedule.dense(), np.asarray(pis))
  m0 = rng.normal(0.0, 0.3, (3, 5))
  with jax.enable_x64(True):
    traj = spin.run_mean_field(m0, chain, schedule, record_every=8)
  want = reference_run(m0, pis, 1.0, 0.6, 0.5, 0.1, 2, {0: 1.0})
  np.testing.assert_allclose(np.asarray(traj.m[-1]), want, rtol=0, atol=1e-13)
  np.testing.assert_array_equal(traj.times, [0, 8, 16, 24, 32, 40])
  want_16 = reference_run(m0, pis[:16], 1.0, 0.6, 0.5, 0.1, 2, {0: 1.0})
  np.testing.assert_allclose(np.asarray(traj.m[2]), want_16, rtol=0, atol=1e-13)


def test_batch_over_horizons_matches_single_runs():
  chain = spin.BlockChain(**CHAIN)
  m0 = np.random.default_rng(1).normal(0.0, 0.1, (2, 5))
  schedules = [spin.make_schedule("progressive_lr", chain, t) for t in (8, 20, 40)]
  with jax.enable_x64(True):
    batch = np.asarray(spin.run_mean_field_batch(m0, chain, schedules))
    for k, schedule in enumerate(schedules):
      single = spin.run_mean_field(m0, chain, schedule).m[-1]
      np.testing.assert_allclose(batch[k], np.asarray(single), rtol=0, atol=1e-14)


PAPER = dict(num_blocks=8, block_size=1, j_intra=1.0, j_inter=0.6, delta=0.5, fields=0.0,
             clamped={0: 1.0})


def test_bayes_optimal_profile_is_the_paper_profile():
  chain = spin.BlockChain(**PAPER)
  with jax.enable_x64(True):
    m_star = np.asarray(spin.bayes_optimal_profile(chain))
  # Independent check of the fixed point: m_l = mu(J_intra m_l + J_inter (m_l-1 + m_l+1)).
  u = chain.coupling_matrix() @ m_star
  np.testing.assert_allclose(np_mu(u, 0.5)[1:], m_star[1:], atol=1e-14)
  # Section 4.3: a monotonic decay from the clamp (+1) to about 0.36 at the far end.
  assert m_star[0] == 1.0
  assert np.all(np.diff(m_star) < 0)
  assert abs(m_star[-1] - 0.36) < 5e-3


@pytest.mark.parametrize("name", NAMES + ("custom",))
def test_every_schedule_leaves_m_star_fixed(name):
  """Prop. 4.2: the zero-drift condition does not depend on pi."""
  chain = spin.BlockChain(**PAPER)
  num_steps = 700
  spec = name
  if name == "custom":
    spec = np.random.default_rng(2).dirichlet(np.ones(7), size=num_steps)
    spec = np.insert(spec, 0, 0.0, axis=1)
  with jax.enable_x64(True):
    m_star = spin.bayes_optimal_profile(chain)
    schedule = spin.make_schedule(spec, chain, num_steps)
    final = spin.run_mean_field(np.asarray(m_star)[None], chain, schedule).m[-1, 0]
  np.testing.assert_allclose(np.asarray(final), np.asarray(m_star), rtol=0, atol=1e-14)


def test_parallel_and_interleaved_converge_to_m_star_and_progressive_do_not():
  """Section 4.3 / App. B.1 on the paper's chain, 24 seeds, T = 7000 (T_phase = 1000)."""
  chain = spin.BlockChain(**PAPER)
  with jax.enable_x64(True):
    m_star = spin.bayes_optimal_profile(chain)
    m0 = spin.initial_magnetisation(jax.random.key(0), chain, 24, scale=0.1)
    bias = {}
    for name in NAMES:
      final = spin.run_mean_field(m0, chain, spin.make_schedule(name, chain, 7000)).m[-1]
      bias[name] = np.asarray(spin.l2_bias(final, m_star))
  assert bias["parallel"].max() < 1e-12
  assert bias["interleaved"].max() < 1e-12
  # The paper's plateaus, about 1.0 (L->R) and 1.4 (R->L); seed means of 24 seeds.
  assert abs(bias["progressive_lr"].mean() - 1.0) < 0.1
  assert abs(bias["progressive_rl"].mean() - 1.4) < 0.15


def test_initial_magnetisation_statistics():
  chain = spin.BlockChain(**PAPER)
  m0 = np.asarray(spin.initial_magnetisation(jax.random.key(3), chain, 4000, scale=0.1))
  np.testing.assert_array_equal(m0[:, 0], 1.0)
  assert abs(m0[:, 1:].std() - 0.1) < 0.003 and abs(m0[:, 1:].mean()) < 0.003


def test_bayes_optimal_profile_reports_non_convergence():
  with pytest.raises(RuntimeError, match="did not converge"):
    spin.bayes_optimal_profile(spin.BlockChain(**PAPER), max_steps=3)


@pytest.mark.parametrize("spec, num_steps, message", [
    ("sideways", 70, "unknown schedule 'sideways'"),
    ("progressive_lr", 100, "not divisible by 7"),
    ("progressive_rl", 71, "not divisible by 7"),
    ("parallel", 0, "num_steps"),
    ("parallel", -5, "num_steps"),
    (np.full(8, 1 / 7), 70, "clamped block"),                    # mass on the clamp, sums to 8/7
    (np.r_[0.0, np.full(7, 0.1)], 70, "does not sum to 1"),
    (np.r_[0.0, -0.5, np.full(6, 0.25)], 70, "negative"),
    (np.r_[0.5, 0.5, np.zeros(6)], 70, "clamped block"),
    (np.ones((3, 8)) / 8, 70, "shape"),
])
def test_bad_schedules_raise(spec, num_steps, message):
  with pytest.raises(ValueError, match=message):
    spin.make_schedule(spec, spin.BlockChain(**PAPER), num_steps)


def test_bad_run_inputs_raise():
  chain = spin.BlockChain(**PAPER)
  schedule = spin.make_schedule("parallel", chain, 70)
  with pytest.raises(ValueError, match="m0 has shape"):
    spin.run_mean_field(np.zeros((2, 7)), chain, schedule)
  with pytest.raises(ValueError, match="record_every"):
    spin.run_mean_field(np.zeros((2, 8)), chain, schedule, record_every=8)
  with pytest.raises(ValueError, match="interleave_steps"):
    spin.make_schedule("interleaved", chain, 70, interleave_steps=0)
  other = spin.BlockChain(8, clamped={7: 1.0})
  with pytest.raises(ValueError, match="clamped block"):
    spin.run_mean_field(np.zeros((2, 8)), other, schedule)
