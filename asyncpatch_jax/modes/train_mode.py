"""`--mode=train`: the trainer that `config.trainer` names, on the one training loop.

  diffusion    the AsyncPatch model (training/train.py)
  autoencoder  the localized VQ autoencoder of latent AsyncPatch (training/autoencoder_train.py)
  head         an uncertainty head on a trained model's frozen parameters (training/head_train.py)

A saved config.json from before `config.trainer` existed gets it inferred from its
sections (`trainer_of`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from asyncpatch_jax.config import base_config
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.training import autoencoder_train
from asyncpatch_jax.training import head_train
from asyncpatch_jax.training import loop
from asyncpatch_jax.training import train

TRAINERS = {
    "diffusion": train.train_and_evaluate,
    "autoencoder": autoencoder_train.train_and_evaluate,
    "head": head_train.train_head,
}


def trainer_of(config: ml_collections.ConfigDict) -> str:
  """config.trainer, or for a config without it, what its sections say it trains.

  A diffusion config that names a model to put a head on is refused in one line: it is a
  head config that forgot `trainer = "head"`.
  """
  name = config.get("trainer") or base_config.infer_trainer(config)
  checks.check_choice(name, tuple(TRAINERS), "trainer")
  if name == "diffusion" and config.get("uncertainty") and config.uncertainty.model_workdir:
    raise checks.InputError(
        "uncertainty.model_workdir is set but trainer='diffusion'; to train an uncertainty "
        "head on that model set --config.trainer=head (configs/uncertainty_digits.py does), "
        "or clear uncertainty.model_workdir.")
  return name


def train_and_evaluate(config: ml_collections.ConfigDict, workdir, *,
                       devices=None) -> dict[str, Any]:
  """Trains `config` in `workdir` with its trainer (resuming the workdir), then evaluates."""
  return TRAINERS[trainer_of(config)](config, workdir, devices=devices)


def exit_code(summary: dict[str, Any]) -> int:
  """0, or 128 + the signal that stopped a preempted run (130 SIGINT, 143 SIGTERM)."""
  return loop.interrupt_exit_code() if summary.get("preempted") else 0
