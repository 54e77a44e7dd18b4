"""The package's wings import only wings below them (README "What is where").

Order, lowest first: `checks` (the input checks every wing uses) and `runtime` (processes
and the arrays that span them); the math and the parts
(`diffusion`, `models`, `data`, `analysis`, `spin`, which import only `checks` and
themselves); `evaluation`; `training` (which also uses `generate`, see ALLOWED);
then the top-level front end (`main`, `base_config`, `generate`, `sample_mode`,
`adaptive_mode`, `evaluate_mode`). Imports are read from the source with `ast`, including
the ones inside functions (a deferred import is still a dependency).
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "asyncpatch_jax"
WINGS = ("runtime", "diffusion", "models", "data", "analysis", "spin", "evaluation", "training")
# What each wing may import besides itself (checks.py and base_config.py are the base).
ALLOWED = {
    "runtime": {"checks"},
    "diffusion": {"checks", "runtime"},
    "models": {"checks", "runtime"},
    "data": {"checks", "runtime"},
    "analysis": {"checks", "runtime"},
    "spin": {"checks", "runtime"},
    "evaluation": {"checks", "runtime", "diffusion", "models", "data"},
    # training writes the run's grids and evaluation samples with generate.Generator, the
    # sampling front end that issue 10 keeps at the top (the one upward import).
    "training": {"checks", "runtime", "base_config", "diffusion", "models", "data", "evaluation",
                 "analysis", "generate"},
}


def _imported_parts(path: pathlib.Path) -> set[tuple[str, int]]:
  """(first component under asyncpatch_jax, line) of every import of the package in `path`."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      parts = node.module.split(".")
      if parts[0] != "asyncpatch_jax":
        continue
      if len(parts) > 1:
        out.add((parts[1], node.lineno))
      else:
        out.update((alias.name, node.lineno) for alias in node.names)
    elif isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] == "asyncpatch_jax" and len(parts) > 1:
          out.add((parts[1], node.lineno))
  return out


@pytest.mark.parametrize("wing", WINGS)
def test_a_wing_imports_only_wings_below_it(wing):
  offending = []
  for path in sorted((PACKAGE / wing).glob("*.py")):
    for part, line in _imported_parts(path):
      if part != wing and part not in ALLOWED[wing]:
        offending.append(f"{path.relative_to(PACKAGE)}:{line} imports asyncpatch_jax.{part}")
  assert not offending, "\n".join(offending)


def test_every_module_lives_in_a_wing_or_is_the_front_end():
  top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
  assert top <= {"main", "base_config", "checks", "generate", "sample_mode", "adaptive_mode",
                 "evaluate_mode"}, top
  assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} \
      == set(WINGS)


def test_the_checker_sees_a_planted_upward_import(tmp_path):
  bad = tmp_path / "x.py"
  bad.write_text("def f():\n  from asyncpatch_jax.training import train\n"
                 "from asyncpatch_jax import generate\nimport asyncpatch_jax.models.unet\n")
  assert _imported_parts(bad) == {("training", 2), ("generate", 3), ("models", 4)}
