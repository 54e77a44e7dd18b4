"""The block Blume-Capel model of spatial scheduling (Growing Images, Sections 3-4, App. A-B).

A closed-form lab for the effect of a spatial schedule on inpainting:
  model.py        the chain, its energy (Eq. 2) and the response mu_Delta (Eq. 12);
  posterior.py    the diffusion-induced tilted posterior (Prop. 3.1, Eq. 4-6);
  schedules.py    spatial schedules pi^(t): parallel, progressive, interleaved, user;
  dynamics.py     the scheduled mean-field recursion (Eq. 13) and the profile m*;
  heat_bath.py    the finite-N scheduled heat-bath (Glauber) chain (Section 4.2);
  free_energy.py  the single-block free energy and its phase classes (Fig. 3).
Blocks are indexed from 0 (block 0 here is block 1 of the paper).
"""

from asyncpatch_jax.spin.dynamics import (Trajectory, bayes_optimal_profile, initial_magnetisation,
                                          l2_bias, mean_field_step, run_mean_field,
                                          run_mean_field_batch)
from asyncpatch_jax.spin.free_energy import (PHASE_CLASSES, Minima, free_energy_minima,
                                             phase_diagram, prior_marginal,
                                             single_block_free_energy)
from asyncpatch_jax.spin.heat_bath import (HeatBathResult, heat_bath_step, run_heat_bath,
                                           site_conditional)
from asyncpatch_jax.spin.model import (BlockChain, ChainParams, blume_capel_response,
                                       coupling_matrix, energy, log_partition_and_mean)
from asyncpatch_jax.spin.posterior import effective_fields, tilted_posterior
from asyncpatch_jax.spin.schedules import SCHEDULE_NAMES, Schedule, make_schedule, schedule_weights

__all__ = [
    "BlockChain", "ChainParams", "HeatBathResult", "Minima", "PHASE_CLASSES", "SCHEDULE_NAMES",
    "Schedule", "Trajectory", "bayes_optimal_profile", "blume_capel_response", "coupling_matrix",
    "effective_fields", "energy", "free_energy_minima", "heat_bath_step", "initial_magnetisation",
    "l2_bias", "log_partition_and_mean", "make_schedule", "mean_field_step", "phase_diagram",
    "prior_marginal", "run_heat_bath", "run_mean_field", "run_mean_field_batch", "schedule_weights",
    "single_block_free_energy", "site_conditional", "tilted_posterior",
]
