"""The evaluators by name, built from the config and run in order.

Training's end of run runs `config.evaluate.at_end` into eval.json; `--mode=evaluate` runs
`config.evaluate.evaluators` into evaluate.json. Both build them with `from_config`
(every setting checked before anything is loaded or compiled) and run them with `run`.
"""

from __future__ import annotations

from typing import Any

from asyncpatch_jax.evaluation.evaluators import base
from asyncpatch_jax.evaluation.evaluators import digit_classifier
from asyncpatch_jax.evaluation.evaluators import generation
from asyncpatch_jax.evaluation.evaluators import inpainting
from asyncpatch_jax.evaluation import feature_nets
from asyncpatch_jax.runtime import checks

EVALUATORS: dict[str, type[base.Evaluator]] = {
    cls.name: cls for cls in (digit_classifier.DigitClassifier, generation.Generation,
                              inpainting.Inpainting)}


def from_config(config, names, image_shape, *, latent: bool = False,
                setting: str = "evaluate.evaluators") -> list[base.Evaluator]:
  """The evaluators `names` (a tuple of EVALUATORS keys) for a model of `image_shape`
  (the pixels' [H, W, C]); `setting` names the config key in errors."""
  names = (names,) if isinstance(names, str) else tuple(names)
  for name in names:
    checks.check_choice(name, tuple(EVALUATORS), f"{setting} entry")
  if len(set(names)) != len(names):
    raise checks.InputError(f"{setting}={names} names an evaluator twice.")
  evaluators = [EVALUATORS[name](config, image_shape, latent) for name in names]
  if any(e.uses_feature_nets for e in evaluators):
    base.check_feature_data(config, image_shape)
  return evaluators


def num_updates(evaluators, config, shards: int = 1) -> int:
  """Progress-bar updates of `run`: each evaluator's, and one for training the in-project
  feature network when one is used."""
  n = sum(e.num_updates(shards) for e in evaluators)
  if any(e.uses_feature_nets for e in evaluators) and feature_nets.in_project_problem(
      config.data.dataset, dict(config.data.options)) is None:
    n += 1
  return n


def run(evaluators, ctx: base.Context) -> tuple[dict[str, Any], dict[str, Any]]:
  """Runs the evaluators in order: (their scores merged, their example images merged);
  with feature networks, 'feature_nets' says which."""
  scores, examples = {}, {}
  for evaluator in evaluators:
    s, e = evaluator.run(ctx)
    scores.update(s)
    examples.update(e)
  if ctx.has_feature_nets:
    scores = {"feature_nets": ctx.feature_nets[1], **scores}
  return scores, examples
