"""DiT ported to PyTorch from the reference `models.py`, for the DiT peer benchmark only.

Attribution: the reference is facebookresearch/DiT (Peebles & Xie, 2023), released under
CC BY-NC 4.0; this port follows its code and is used only to benchmark and to test
against it (a non-commercial research use), never by the library.

Never imported by the library (only by experiments/benchmarks/ and tests/). The port keeps
the reference's (facebookresearch/DiT `models.py`) classes, their attribute names and
their forward passes: `TimestepEmbedder`, `LabelEmbedder`, `DiTBlock`, `FinalLayer`,
`DiT` with `unpatchify`, `modulate`, `get_2d_sincos_pos_embed`, NCHW images. timm's
`PatchEmbed`, `Attention` and `Mlp`, which the reference imports, are written out below
with timm's attribute names, so the parameter names are the reference's and timm is not
needed. It mirrors `asyncpatch_jax.models.dit.DiT` with a per-image time and
`modulation="adaln_zero"`; `load_flax_params(torch_model, params)` copies our flax
parameters into it and `velocity(...)` calls it on our conventions.

Deliberate differences from the reference, each one small:
  * time: the reference embeds DiT's timestep index (0..999); ours embeds 1000 t for t in
    [0, 1]. `DiT.forward` takes the reference's argument, so callers pass 1000 t
    (`velocity` does). Both embed [cos, sin] halves (same order), and both position
    embeddings are [sin, cos] with the column (w) coordinate in the first half.
  * out_channels is an argument (ours is a model field); its default is the reference's
    (2 C with learned sigma, else C).
  * the label table always has the null row `num_classes` (ours always has it; the
    reference adds it when class_dropout_prob > 0, as with its default 0.1). Label
    dropout stays the reference's (in train mode, p = class_dropout_prob).
  * attention calls F.scaled_dot_product_attention, which is what timm's Attention runs
    with its default fused attention; ours calls jax.nn.dot_product_attention.
  * the image is square (the reference's `input_size`); ours also takes H != W.
  * no `forward_with_cfg` (classifier-free guidance is not benchmarked) and no named
    constructors (DiT_XL_2, ...): `SIZES` in models/dit.py holds the same table.
  * initialisation follows the reference's `initialize_weights`, but the benchmark
    overwrites it with our parameters anyway.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def modulate(x, shift, scale):
  return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------- timm's layers


class PatchEmbed(nn.Module):
  """timm's PatchEmbed (flatten, no norm): [N, C, H, W] -> [N, T, D], a p x p stride-p conv."""

  def __init__(self, img_size, patch_size, in_chans, embed_dim, bias=True):
    super().__init__()
    self.img_size = (img_size, img_size)
    self.patch_size = (patch_size, patch_size)
    self.grid_size = (img_size // patch_size, img_size // patch_size)
    self.num_patches = self.grid_size[0] * self.grid_size[1]
    self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size,
                          bias=bias)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
  """timm's Attention with fused attention (qkv with bias, no q/k norm, no dropout)."""

  def __init__(self, dim, num_heads=8, qkv_bias=False):
    super().__init__()
    self.num_heads = num_heads
    self.head_dim = dim // num_heads
    self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, c = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    x = F.scaled_dot_product_attention(q, k, v)
    return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
  """timm's Mlp: fc1 -> act -> fc2 (no dropout)."""

  def __init__(self, in_features, hidden_features, act_layer):
    super().__init__()
    self.fc1 = nn.Linear(in_features, hidden_features)
    self.act = act_layer()
    self.fc2 = nn.Linear(hidden_features, in_features)

  def forward(self, x):
    return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------- embedders


class TimestepEmbedder(nn.Module):
  """Sinusoidal features of the timestep (GLIDE's), then Linear -> SiLU -> Linear."""

  def __init__(self, hidden_size, frequency_embedding_size=256):
    super().__init__()
    self.mlp = nn.Sequential(
        nn.Linear(frequency_embedding_size, hidden_size, bias=True),
        nn.SiLU(),
        nn.Linear(hidden_size, hidden_size, bias=True),
    )
    self.frequency_embedding_size = frequency_embedding_size

  @staticmethod
  def timestep_embedding(t, dim, max_period=10000):
    """[N] timesteps (may be fractional) -> [N, dim]: [cos, sin] of t * max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32)
                      / half).to(device=t.device)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
      embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding

  def forward(self, t):
    return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
  """A table of num_classes + 1 rows (the last: CFG's null label); label dropout in training."""

  def __init__(self, num_classes, hidden_size, dropout_prob):
    super().__init__()
    self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)   # ours: always + 1
    self.num_classes = num_classes
    self.dropout_prob = dropout_prob

  def token_drop(self, labels, force_drop_ids=None):
    if force_drop_ids is None:
      drop_ids = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
    else:
      drop_ids = force_drop_ids == 1
    return torch.where(drop_ids, self.num_classes, labels)

  def forward(self, labels, train, force_drop_ids=None):
    if (train and self.dropout_prob > 0) or (force_drop_ids is not None):
      labels = self.token_drop(labels, force_drop_ids)
    return self.embedding_table(labels)


# ----------------------------------------------------------------------------- DiT


class DiTBlock(nn.Module):
  """x + gate * attn(modulate(LN(x))), then x + gate * mlp(modulate(LN(x))) (adaLN-Zero)."""

  def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
    super().__init__()
    self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True)
    self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    mlp_hidden_dim = int(hidden_size * mlp_ratio)
    approx_gelu = lambda: nn.GELU(approximate="tanh")
    self.mlp = Mlp(in_features=hidden_size, hidden_features=mlp_hidden_dim, act_layer=approx_gelu)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

  def forward(self, x, c):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        self.adaLN_modulation(c).chunk(6, dim=1))
    x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
    x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
    return x


class FinalLayer(nn.Module):
  """Modulated LayerNorm (its own SiLU -> Linear(D, 2D)), then Linear(D, p * p * C_out)."""

  def __init__(self, hidden_size, patch_size, out_channels):
    super().__init__()
    self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
    self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
    self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

  def forward(self, x, c):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
  """The reference DiT: `forward(x [N, C, H, W], t [N] timesteps, y [N]) -> [N, C_out, H, W]`."""

  def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
               num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
               learn_sigma=True, out_channels=None):
    super().__init__()
    self.learn_sigma = learn_sigma
    self.in_channels = in_channels
    default_out = in_channels * 2 if learn_sigma else in_channels
    self.out_channels = default_out if out_channels is None else out_channels
    self.patch_size = patch_size
    self.num_heads = num_heads

    self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
    self.t_embedder = TimestepEmbedder(hidden_size)
    self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
    num_patches = self.x_embedder.num_patches
    # The fixed sin-cos embedding, kept (as in the reference) as a frozen parameter.
    self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
    self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio)
                                 for _ in range(depth)])
    self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
    self.initialize_weights()

  def initialize_weights(self):
    def _basic_init(module):
      if isinstance(module, nn.Linear):
        torch.nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
          nn.init.constant_(module.bias, 0)
    self.apply(_basic_init)
    pos_embed = get_2d_sincos_pos_embed(self.pos_embed.shape[-1],
                                        int(self.x_embedder.num_patches ** 0.5))
    self.pos_embed.data.copy_(torch.from_numpy(pos_embed).float().unsqueeze(0))
    w = self.x_embedder.proj.weight.data                    # like nn.Linear, not nn.Conv2d
    nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
    nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
    nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
    nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
    for block in self.blocks:                               # adaLN-Zero
      nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
      nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
    nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
    nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
    nn.init.constant_(self.final_layer.linear.weight, 0)
    nn.init.constant_(self.final_layer.linear.bias, 0)

  def unpatchify(self, x):
    """[N, T, p * p * C] -> [N, C, H, W]."""
    c = self.out_channels
    p = self.x_embedder.patch_size[0]
    h = w = int(x.shape[1] ** 0.5)
    assert h * w == x.shape[1]
    x = x.reshape(shape=(x.shape[0], h, w, p, p, c))
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(shape=(x.shape[0], c, h * p, h * p))

  def forward(self, x, t, y):
    x = self.x_embedder(x) + self.pos_embed                # [N, T, D]
    t = self.t_embedder(t)                                 # [N, D]
    y = self.y_embedder(y, self.training)                  # [N, D]
    c = t + y
    for block in self.blocks:
      x = block(x, c)                                      # [N, T, D]
    x = self.final_layer(x, c)                             # [N, T, p * p * C_out]
    return self.unpatchify(x)                              # [N, C_out, H, W]


# ----------------------------------------------------------------------------- MAE's pos embed


def get_2d_sincos_pos_embed(embed_dim, grid_size):
  """[grid_size^2, embed_dim]: the first half encodes the column (w), the second the row."""
  grid_h = np.arange(grid_size, dtype=np.float32)
  grid_w = np.arange(grid_size, dtype=np.float32)
  grid = np.meshgrid(grid_w, grid_h)                       # w goes first
  grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
  return get_2d_sincos_pos_embed_from_grid(embed_dim, grid)


def get_2d_sincos_pos_embed_from_grid(embed_dim, grid):
  assert embed_dim % 2 == 0
  emb_h = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])   # [H * W, D / 2]
  emb_w = get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
  return np.concatenate([emb_h, emb_w], axis=1)


def get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
  """[M] positions -> [M, embed_dim]: [sin, cos] of pos * 10000^(-k / (embed_dim / 2))."""
  assert embed_dim % 2 == 0
  omega = np.arange(embed_dim // 2, dtype=np.float64)
  omega /= embed_dim / 2.0
  omega = 1.0 / 10000 ** omega
  out = np.einsum("m,d->md", pos.reshape(-1), omega)
  return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# ----------------------------------------------------------------------------- ours <-> torch


def from_flax_model(model, image_size: int, in_channels: int) -> DiT:
  """The reference DiT with the sizes of our flax `models.dit.DiT` (adaln_zero, per-image t)."""
  if model.modulation != "adaln_zero":
    raise ValueError(f"the reference DiT has adaLN-Zero only, not {model.modulation!r}")
  if model.freq_dim != 256 or not model.num_classes:
    raise ValueError("the reference DiT embeds 256 frequencies and always has labels")
  return DiT(input_size=image_size, patch_size=model.patch_size, in_channels=in_channels,
             hidden_size=model.hidden_size, depth=model.depth, num_heads=model.num_heads,
             mlp_ratio=model.mlp_ratio, num_classes=model.num_classes, learn_sigma=False,
             out_channels=model.out_channels)


def num_trainable(model: nn.Module) -> int:
  """Parameters with gradients (the reference's frozen pos_embed left out, as ours has none)."""
  return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_flax_params(torch_model: DiT, params) -> None:
  """Copies our flax DiT's parameters (the `params` collection) into `torch_model`.

  Dense kernels [in, out] become Linear weights [out, in]; the patch conv's [p, p, C, D]
  becomes [D, C, p, p]. The six (two) modulations split the Dense output in the same
  order on both sides, and our final Dense emits (p, q, c) per token as unpatchify reads.
  Every parameter of `torch_model` with a gradient is written exactly once.
  """
  def t(a, perm=None):
    a = np.asarray(a, np.float32)
    return torch.from_numpy(np.array(a if perm is None else a.transpose(perm), copy=True))

  m = torch_model
  pairs = [(m.x_embedder.proj.weight, t(params["x_embedder"]["kernel"], (3, 2, 0, 1))),
           (m.x_embedder.proj.bias, t(params["x_embedder"]["bias"])),
           (m.y_embedder.embedding_table.weight, t(params["y_embedder"]["embedding"]))]

  def dense(linear, p):
    pairs.extend([(linear.weight, t(p["kernel"], (1, 0))), (linear.bias, t(p["bias"]))])
  dense(m.t_embedder.mlp[0], params["t_embedder"]["dense_0"])
  dense(m.t_embedder.mlp[2], params["t_embedder"]["dense_1"])
  stack = params["blocks"]                      # our blocks are a scan: leading axis = block
  layer = lambda tree, i: {k: layer(v, i) if isinstance(v, dict) else v[i] for k, v in tree.items()}
  for i, block in enumerate(m.blocks):
    ours = layer(stack["block"], i)
    dense(block.adaLN_modulation[1], layer(stack["adaln"], i))
    dense(block.attn.qkv, ours["qkv"])
    dense(block.attn.proj, ours["proj"])
    dense(block.mlp.fc1, ours["fc1"])
    dense(block.mlp.fc2, ours["fc2"])
  dense(m.final_layer.adaLN_modulation[1], params["final_adaln"])
  dense(m.final_layer.linear, params["final_linear"])
  written = {id(p) for p, _ in pairs}
  missing = [n for n, p in m.named_parameters() if p.requires_grad and id(p) not in written]
  if missing or len(written) != len(pairs):
    raise ValueError(f"parameters not written exactly once: {missing}")
  with torch.no_grad():
    for p, value in pairs:
      if p.shape != value.shape:
        raise ValueError(f"shape {tuple(value.shape)} for a parameter of {tuple(p.shape)}")
      p.copy_(value.to(p.device))


def velocity(torch_model: DiT, x, t, y):
  """Our conventions at the boundary: x [B, H, W, C] (NumPy or tensor), t [B] in [0, 1],
  y [B] -> [B, H, W, C_out] as a NumPy array; the model sees NCHW and 1000 t."""
  dev = next(torch_model.parameters()).device
  as_t = lambda a, dtype: torch.as_tensor(np.array(a), dtype=dtype, device=dev)
  x = as_t(x, torch.float32).permute(0, 3, 1, 2)
  out = torch_model(x, 1000.0 * as_t(t, torch.float32), as_t(y, torch.long))
  return out.permute(0, 2, 3, 1).detach().cpu().numpy()
