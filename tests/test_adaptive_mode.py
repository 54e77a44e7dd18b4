"""The uncertainty-head tasks of --mode=sample (sample_mode.py): task routing, the policy
each config selects, the step-count image, and the refusals before anything loads.

References: the module docstring's table of tasks and config keys (enumerated), the
documented step-image formula 2 steps / budget - 1 (0 steps black, the budget white).
Nothing here trains or loads a model: the input checks must fire first.
"""

import numpy as np
import pytest

from asyncpatch_jax.modes import sample_mode
from asyncpatch_jax.config import base_config
from asyncpatch_jax.runtime import checks
from asyncpatch_jax.data import image_io
from asyncpatch_jax.runs import loader


def _config(**sample_and_uncertainty):
  config = base_config.get_base_config()
  for key, value in sample_and_uncertainty.items():
    group, name = key.split("__")
    config[group][name] = value
  return config


@pytest.mark.parametrize("task,ipr_order,expected", [
    ("adaptive", "raster", True), ("ordered", "raster", True), ("ipr", "uncertainty", True),
    ("ipr", "raster", False), ("generate", "uncertainty", False),
    ("inpaint", "raster", False), ("progressive", "uncertainty", False)])
def test_uses_head_routes_exactly_the_head_tasks(task, ipr_order, expected):
  config = _config(sample__task=task, uncertainty__ipr_order=ipr_order)
  assert sample_mode.uses_head(config) is expected


@pytest.mark.parametrize("policy,keys,name,params", [
    ("uncertainty_accelerated", dict(speedup=3.5), "uncertainty_accelerated",
     {"speedup": 3.5}),
    ("look_ahead", dict(look_ahead=1.7, quantile=0.25), "look_ahead",
     {"factor": 1.7, "quantile": 0.25}),
    ("dual_loop", dict(sub_steps=3, quantile=0.6), "dual_loop",
     {"sub_steps": 3, "quantile": 0.6})])
@pytest.mark.parametrize("grid", [(), (2, 4)])
def test_adaptive_policy_comes_from_its_config_keys(policy, keys, name, params, grid):
  config = _config(sample__task="adaptive", uncertainty__policy=policy, uncertainty__grid=grid,
                   **{f"uncertainty__{k}": v for k, v in keys.items()})
  p = sample_mode.policy_from_config(config)
  assert p.name == name and p.params == params
  assert p.regions == (tuple(grid) or None)                  # () = per pixel


@pytest.mark.parametrize("task,ipr_order", [("ordered", "raster"), ("ipr", "uncertainty")])
@pytest.mark.parametrize("u_grid,s_grid,expected", [((), (2, 3), (2, 3)),
                                                    ((4, 1), (2, 3), (4, 1))])
def test_ordered_tasks_use_srm_order_on_the_uncertainty_or_sample_grid(task, ipr_order, u_grid,
                                                                       s_grid, expected):
  config = _config(sample__task=task, sample__grid=s_grid, uncertainty__grid=u_grid,
                   uncertainty__ipr_order=ipr_order, uncertainty__overlap=0.3,
                   uncertainty__policy="not-read-by-these-tasks")
  p = sample_mode.policy_from_config(config)
  assert p.name == "uncertainty_ordered" and p.params == {"overlap": 0.3}
  assert p.regions == expected


def test_unknown_policy_is_a_one_line_input_error_with_a_suggestion():
  config = _config(sample__task="adaptive", uncertainty__policy="dual-loop")
  with pytest.raises(checks.InputError, match="Did you mean 'dual_loop'") as err:
    sample_mode.policy_from_config(config)
  assert "uncertainty.policy" in str(err.value) and "\n" not in str(err.value)


def test_steps_image_is_the_documented_linear_map():
  budget = 8
  steps = np.array([[[0, 1, 2], [4, 6, 8]]], np.int32)            # [N=1, H=2, W=3]
  img = sample_mode._steps_image(steps, budget)  # pylint: disable=protected-access
  assert img.shape == (1, 2, 3, 1) and img.dtype == np.float32
  np.testing.assert_array_equal(img[..., 0], [[[-1.0, -0.75, -0.5], [0.0, 0.5, 1.0]]])
  # As written to steps.png: 0 steps black, the budget white, half the budget mid grey.
  np.testing.assert_array_equal(image_io.to_uint8(img)[0, :, :, 0],
                                [[0, 32, 64], [128, 191, 255]])


_REFUSALS = [
    (dict(sample__task="ipr", uncertainty__ipr_order="uncertain", uncertainty__head_workdir="h"),
     "Did you mean 'uncertainty'"),
    (dict(sample__task="ipr", uncertainty__ipr_order="raster", uncertainty__head_workdir="h"),
     "does not sample with an uncertainty head"),
    (dict(sample__task="generate", uncertainty__head_workdir="h"),
     "does not sample with an uncertainty head"),
    (dict(sample__task="adaptive"), r"--config\.uncertainty\.head_workdir=<its workdir>"),
    (dict(sample__task="ordered", uncertainty__head_workdir="h", uncertainty__budget=-3),
     r"uncertainty\.budget=-3; expected a positive integer"),
    (dict(sample__task="adaptive", uncertainty__head_workdir="h", uncertainty__budget=0,
          sample__num_steps=0), r"uncertainty\.budget=0; expected a positive integer"),
    (dict(sample__task="adaptive", uncertainty__head_workdir="h", uncertainty__policy="lookahead"),
     "Did you mean 'look_ahead'"),
    (dict(sample__task="adaptive", uncertainty__head_workdir="h", uncertainty__speedup=0.5),
     r"speedup=0\.5; expected a factor >= 1"),
]


@pytest.mark.parametrize("settings,message", _REFUSALS)
def test_sample_from_workdir_refuses_bad_settings_before_loading_anything(
    settings, message, tmp_path, monkeypatch):
  def must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the settings were checked")

  monkeypatch.setattr(loader, "load_run", must_not_load)
  workdir = tmp_path / "run"
  with pytest.raises(checks.InputError, match=message) as err:
    sample_mode._sample_with_head(_config(**settings), str(workdir))
  assert "\n" not in str(err.value)
  assert not workdir.exists()                                  # nothing written
