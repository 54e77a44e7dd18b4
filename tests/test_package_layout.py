"""The package's layout (asyncpatch_jax/): wings import only wings below them, no cycles.

Order, lowest first:
- `runtime`: input checks, storage, device meshes, progress bars, processes;
- the math and the parts: `diffusion`, `models`, `data`, `analysis`, `spin`;
- `config`: every key's default, saved config.json files, validation;
- `runs`: trained runs on disk (checkpoints, the run lock, the loader, the latent codec);
- `generation`: the sampling pipeline and its outputs;
- `evaluation`: metrics, feature networks and the evaluators;
- `training`: the training loop and the trainers;
- `modes`: the command line's train, sample and evaluate;
- the root: `main.py` alone (and `__init__.py`).
Imports are read from the source with `ast`, including the ones inside functions (a
deferred import is still a dependency), and no file may take part in an import cycle.
"""

import ast
import collections
import os
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "asyncpatch_jax"
PARTS = ("diffusion", "models", "data", "analysis", "spin")
# What each wing may import besides itself.
ALLOWED = {
    "runtime": set(),
    **{part: {"runtime"} for part in PARTS},
    "models": {"runtime", "diffusion"},   # a patch model's token times (diffusion/tokens.py)
    "config": {"runtime", "data"},
    "runs": {"runtime", "config", *PARTS},
    "generation": {"runtime", "runs", *PARTS},
    "evaluation": {"runtime", "config", "runs", "generation", *PARTS},
    "training": {"runtime", "config", "runs", "generation", "evaluation", *PARTS},
    "modes": {"runtime", "config", "runs", "generation", "evaluation", "training", *PARTS},
    "main": {"runtime", "config", "modes"},
}
WINGS = tuple(w for w in ALLOWED if w != "main")
ROOT_MODULES = {"__init__.py", "main.py"}
MAX_LINES = 500


def _module(path: pathlib.Path) -> str:
  parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def _imports(path: pathlib.Path, modules=None) -> set[tuple[str, int]]:
  """(module of the package, line) of every import in `path`, deferred ones included."""
  modules = MODULES if modules is None else modules
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    names = []
    if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{a.name}" for a in node.names]
    elif isinstance(node, ast.Import):
      names = [a.name for a in node.names]
    for name in names:
      if not name.startswith("asyncpatch_jax."):
        continue
      while name not in modules and name.count(".") > 1:
        name = name.rsplit(".", 1)[0]
      out.add((name, node.lineno))
  return out


def _wing(module: str) -> str:
  parts = module.split(".")
  return parts[1] if len(parts) > 2 or parts[-1] == "main" else (
      parts[1] if len(parts) == 2 else "")


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

  def visit(v):
    index[v] = low[v] = counter[0]
    counter[0] += 1
    stack.append(v)
    on.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      comp = []
      while True:
        w = stack.pop()
        on.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1 or v in edges.get(v, ()):
        out.append(sorted(comp))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  return out


def _edges(modules) -> dict[str, set[str]]:
  return {m: {n for n, _ in _imports(p, modules) if n != m and n in modules}
          for m, p in modules.items()}


@pytest.mark.parametrize("wing", [*WINGS, "main"])
def test_a_wing_imports_only_wings_below_it(wing):
  offending = []
  for module, path in sorted(MODULES.items()):
    if _wing(module) != wing:
      continue
    for name, line in _imports(path):
      other = _wing(name)
      if other and other != wing and other not in ALLOWED[wing]:
        offending.append(f"{path.relative_to(PACKAGE)}:{line} imports {name}")
  assert not offending, "\n".join(offending)


def test_no_import_cycles_between_files_or_wings():
  edges = _edges(MODULES)
  assert not _cycles(edges), _cycles(edges)
  wings = collections.defaultdict(set)
  for a, bs in edges.items():
    wings[_wing(a)].update(_wing(b) for b in bs if _wing(b) != _wing(a))
  assert not _cycles(dict(wings)), _cycles(dict(wings))


def test_the_root_holds_main_alone_and_every_folder_is_a_wing():
  assert {p.name for p in PACKAGE.glob("*.py")} == ROOT_MODULES
  assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} \
      == set(WINGS)


def test_no_module_is_over_500_lines():
  long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
          if (n := len(p.read_text().splitlines())) > MAX_LINES}
  assert not long, long


def test_the_checker_sees_a_planted_lazy_cycle(tmp_path):
  """A lazy import from a trainer back to the module that calls it is a cycle, and upward."""
  pkg = tmp_path / "asyncpatch_jax"
  (pkg / "training").mkdir(parents=True)
  (pkg / "modes").mkdir()
  for p in (pkg / "__init__.py", pkg / "training" / "__init__.py", pkg / "modes" / "__init__.py"):
    p.write_text("")
  (pkg / "modes" / "train_mode.py").write_text(
      "from asyncpatch_jax.training import head_trainer\n")
  (pkg / "training" / "head_trainer.py").write_text(
      "def f():\n  from asyncpatch_jax.modes import train_mode  # deferred\n")
  modules = {_module_in(pkg, p): p for p in pkg.rglob("*.py")}
  assert _imports(pkg / "training" / "head_trainer.py", modules) == {
      ("asyncpatch_jax.modes.train_mode", 2)}
  assert _cycles(_edges(modules)) == [["asyncpatch_jax.modes.train_mode",
                                       "asyncpatch_jax.training.head_trainer"]]
  assert "modes" not in ALLOWED["training"]


def _module_in(package: pathlib.Path, path: pathlib.Path) -> str:
  parts = path.relative_to(package.parent).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_loading_a_trained_run_imports_no_optimizer_trainer_or_dataset():
  """runs/loader.py alone, and the sample and evaluate modes: no trainer comes with them."""
  code = ("import sys\n"
          "import asyncpatch_jax.runs.loader\n"
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('optax', 'grain', "
          "'tensorflow_datasets') or m.startswith(('asyncpatch_jax.training', "
          "'asyncpatch_jax.data.datasets'))))\n"
          "import asyncpatch_jax.modes.sample_mode, asyncpatch_jax.modes.evaluate_mode\n"
          "print(sorted(m for m in sys.modules if m.startswith('asyncpatch_jax.training')))\n")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       check=True, cwd=PACKAGE.parent,
                       env={**os.environ, "PYTHONPATH": str(PACKAGE.parent)}).stdout
  assert out.splitlines() == ["[]", "[]"], out
