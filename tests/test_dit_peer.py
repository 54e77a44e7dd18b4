"""models/dit.py against the PyTorch reference DiT (experiments/benchmarks/torch_dit.py, the port
of facebookresearch/DiT's models.py), and the DiT benchmarks' accelerator script on CPU.

Without torch: fixtures/dit_torch_reference.npz holds the torch reference's output on a tiny
DiT with fixed random weights (every parameter nonzero), written by
`python -m experiments.benchmarks.make_dit_reference --out=tests/fixtures/dit_torch_reference.npz`;
our flax DiT with the same weights must reproduce it to float32 rounding. With torch
installed (`pip install -e '.[bench]'`), the same comparison runs live on another size,
forward and gradients.
"""

import ast
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from asyncpatch_jax.models import dit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "dit_torch_reference.npz")
# float32: the two stacks sum in different orders (measured: ~3e-6 of the output's scale).
RTOL = 1e-4


def _fixture():
  with np.load(FIXTURE) as f:
    arrays = {k: f[k] for k in f.files}
  params = {}
  for key, value in arrays.items():
    if key.startswith("param/"):
      *parents, leaf = key.split("/")[1:]
      node = params
      for name in parents:
        node = node.setdefault(name, {})
      node[leaf] = jnp.asarray(value)
  return arrays, params, json.loads(str(arrays["meta"]))


def _ours(arrays, params, config):
  model = dit.DiT(**config)
  return np.asarray(model.apply({"params": params}, arrays["x"], arrays["t"], arrays["y"]))


def test_flax_dit_reproduces_the_torch_reference():
  arrays, params, meta = _fixture()
  ref = arrays["output"]
  assert ref.shape == (4, *meta["image"][:2], meta["config"]["out_channels"])
  assert list(arrays["t"]) == [0.0, 0.25, 0.7, 1.0]
  assert arrays["y"][-1] == meta["config"]["num_classes"]            # the null label
  # No parameter is zero (adaLN-Zero would start its modulations and final layer there).
  assert all(np.abs(v).min() > 0 for k, v in arrays.items() if k.startswith("param/"))
  ours = _ours(arrays, params, meta["config"])
  scale = float(np.abs(ref).max())
  assert scale > 1.0
  np.testing.assert_allclose(ours, ref, rtol=0, atol=RTOL * scale)


def test_a_swapped_shift_and_scale_breaks_the_agreement(monkeypatch):
  """The fixture notices a wrong modulation (the error is far above the tolerance)."""
  arrays, params, meta = _fixture()
  monkeypatch.setattr(dit, "modulate", lambda x, shift, scale: x * (1.0 + shift) + scale)
  err = np.abs(_ours(arrays, params, meta["config"]) - arrays["output"]).max()
  assert err > 100 * RTOL * np.abs(arrays["output"]).max()


def test_the_library_never_imports_torch_or_the_benchmarks():
  """torch_dit.py (and torch) belong to experiments/benchmarks/ and the tests only."""
  found = []
  for dirpath, _, names in os.walk(os.path.join(ROOT, "asyncpatch_jax")):
    for name in names:
      if not name.endswith(".py"):
        continue
      path = os.path.join(dirpath, name)
      for node in ast.walk(ast.parse(open(path).read())):
        mods = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        found += [f"{path}: {m}" for m in mods if m.split(".")[0] in ("torch", "experiments")]
  assert not found, found


def test_live_torch_port_agrees_forward_and_gradients():
  torch = pytest.importorskip("torch")
  from experiments.benchmarks import torch_dit  # pylint: disable=import-outside-toplevel
  config = dict(patch_size=4, hidden_size=48, depth=2, num_heads=3, out_channels=2,
                num_classes=7)
  model = dit.DiT(**config)
  b, size, c = 3, 16, 2
  rng = np.random.default_rng(1)
  x = rng.standard_normal((b, size, size, c)).astype(np.float32)
  t = np.array([0.05, 0.5, 0.95], np.float32)
  y = np.array([1, 6, 7], np.int32)
  params = model.init(jax.random.key(0), x, t, y)["params"]
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape)
                                     for p, k in zip(leaves, keys)])
  tmodel = torch_dit.from_flax_model(model, size, c)
  torch_dit.load_flax_params(tmodel, params)
  tmodel.eval()
  assert torch_dit.num_trainable(tmodel) == sum(p.size for p in jax.tree.leaves(params))

  target = rng.standard_normal((b, size, size, config["out_channels"])).astype(np.float32)
  loss = lambda p: jnp.mean((model.apply({"params": p}, x, t, y) - target) ** 2)
  ours_out = np.asarray(model.apply({"params": params}, x, t, y))
  ours_grad = jax.grad(loss)(params)
  out = tmodel(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(1000 * t),
               torch.from_numpy(y).long())
  ((out - torch.from_numpy(target).permute(0, 3, 1, 2)) ** 2).mean().backward()
  th_out = out.permute(0, 2, 3, 1).detach().numpy()
  np.testing.assert_allclose(ours_out, th_out, rtol=0, atol=RTOL * np.abs(th_out).max())
  # Gradients: the attention qkv kernel of the last block, the patch embedding, the labels.
  pairs = [(ours_grad["blocks"]["block"]["qkv"]["kernel"][1].T,
            tmodel.blocks[1].attn.qkv.weight.grad),
           (ours_grad["x_embedder"]["kernel"].transpose(3, 2, 0, 1),
            tmodel.x_embedder.proj.weight.grad),
           (ours_grad["final_adaln"]["kernel"].T,
            tmodel.final_layer.adaLN_modulation[1].weight.grad),
           (ours_grad["y_embedder"]["embedding"], tmodel.y_embedder.embedding_table.weight.grad)]
  for g_ours, g_torch in pairs:
    g_torch = g_torch.numpy()
    np.testing.assert_allclose(np.asarray(g_ours), g_torch, rtol=0,
                               atol=RTOL * np.abs(g_torch).max())


# ----------------------------------------------------------------------------- gpu_dit.py

NUMBERS = {
    "dit_train": ["batch", "params", "step_seconds", "images_per_s", "gflops_per_step",
                  "achieved_tflops", "peak_tflops", "mfu", "compile_s"],
    "dit_sampling": ["batch", "steps", "seconds", "images_per_s", "compile_s"],
    "unet_train": ["batch", "step_seconds", "images_per_s", "gflops_per_step",
                   "achieved_tflops", "peak_tflops", "mfu"],
    "agreement": ["batch", "output_scale", "max_abs_diff_float32_highest",
                  "max_abs_diff_float32_default", "max_abs_diff_bfloat16"],
    "torch_peer": ["train_step_seconds", "train_mfu", "ours_over_torch_train",
                   "ours_train_step_seconds_alternating", "sampling_seconds",
                   "sampling_images_per_s", "ours_over_torch_sampling",
                   "ours_sampling_seconds_alternating", "max_abs_diff_flax_vs_torch_float32",
                   "output_scale"],
}


def _finite(value):
  return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@pytest.mark.slow
def test_gpu_script_tiny_writes_every_field(tmp_path):
  """The accelerator script's --tiny run on CPU (about a minute on the shared 2 cores)."""
  out = tmp_path / "gpu_dit.json"
  env = dict(os.environ, PYTHONPATH=ROOT)
  res = subprocess.run([sys.executable, "-m", "experiments.benchmarks.gpu_dit", "--tiny",
                        f"--out={out}"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
  assert res.returncode == 0, res.stderr[-4000:]
  r = json.loads(out.read_text())
  assert r["tiny"] is True and r["dtype"] == "bfloat16" and r["platform"] == "cpu"
  assert r["command"].startswith("python -m experiments.benchmarks.gpu_dit ")
  assert r["dit_train"]["model"] == "DiT-T/2" and r["unet_train"]["config"] == "test"
  for section, keys in NUMBERS.items():
    if section == "torch_peer" and not r["torch_peer"]["available"]:
      assert all(r[section][k] is None for k in keys), r[section]
      assert "torch" in r[section]["reason"]
      continue
    bad = {k: r[section].get(k) for k in keys if not _finite(r[section].get(k))}
    assert not bad, (section, bad)
  for section in ("dit_train", "unet_train"):
    assert 0 < r[section]["mfu"] < 1, r[section]
  assert r["dit_train"]["peak_source"] == "measured float32 matmul peak"
  # On CPU the "default device" is the CPU: the same program, the same numbers.
  assert r["agreement"]["max_abs_diff_float32_highest"] == 0.0
  peer = r["torch_peer"]
  if importlib.util.find_spec("torch") is None:
    assert not peer["available"]
  else:
    assert peer["available"] and peer["device"] == "cpu"
    assert peer["max_abs_diff_flax_vs_torch_float32"] < RTOL * peer["output_scale"]
