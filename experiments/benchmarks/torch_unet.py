"""The project's UNet ported to PyTorch, for the peer benchmark only (never imported by the library).

`TorchUNet(cfg)` mirrors `asyncpatch_jax.models.UNet` layer for layer (per-pixel FiLM from
the average-pooled time map embedded once per resolution, ADM residual blocks, attention,
strided-conv downsampling with flax's SAME padding, nearest upsampling), so the two
stacks run the same architecture with exactly the same parameter count.
`load_flax_params(torch_model, params)` copies a flax parameter tree into it, which lets
`bench_peer.py` check that both compute the same function before timing them.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


def _groups(channels: int, num_groups: int) -> int:
  return math.gcd(channels, num_groups)


def sinusoidal(t: torch.Tensor, dim: int) -> torch.Tensor:
  half = dim // 2
  freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32,
                                                     device=t.device) / half)
  args = (1000.0 * t.float())[..., None] * freqs
  feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  if dim % 2:
    feats = torch.cat([feats, torch.zeros_like(feats[..., :1])], dim=-1)
  return feats


def pool_time(t: torch.Tensor, factor: int) -> torch.Tensor:
  if t.ndim == 1 or factor == 1:
    return t
  return F.avg_pool2d(t[:, None], factor)[:, 0]


def _as_nchw(emb: torch.Tensor) -> torch.Tensor:
  """[B, E] -> [B, E, 1, 1]; [B, h, w, E] -> [B, E, h, w]."""
  return emb[:, :, None, None] if emb.ndim == 2 else emb.permute(0, 3, 1, 2)


class ResBlock(nn.Module):

  def __init__(self, c_in: int, c_out: int, emb_dim: int, num_groups: int):
    super().__init__()
    self.norm_0 = nn.GroupNorm(_groups(c_in, num_groups), c_in, eps=1e-5)
    self.conv_0 = nn.Conv2d(c_in, c_out, 3, padding=1)
    self.film = nn.Linear(emb_dim, 2 * c_out)
    self.norm_1 = nn.GroupNorm(_groups(c_out, num_groups), c_out, eps=1e-5)
    self.conv_1 = nn.Conv2d(c_out, c_out, 3, padding=1)
    self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

  def forward(self, x, emb):
    h = self.conv_0(F.silu(self.norm_0(x)))
    scale, shift = _as_nchw(self.film(emb)).chunk(2, dim=1)
    h = self.norm_1(h) * (1.0 + scale) + shift
    h = self.conv_1(F.silu(h))
    return (x if self.skip is None else self.skip(x)) + h


class Attention(nn.Module):

  def __init__(self, channels: int, head_dim: int, num_groups: int):
    super().__init__()
    self.heads = max(1, channels // head_dim)
    self.norm = nn.GroupNorm(_groups(channels, num_groups), channels, eps=1e-5)
    self.qkv = nn.Linear(channels, 3 * channels)
    self.proj = nn.Linear(channels, channels)

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x).flatten(2).transpose(1, 2)                      # [B, L, C]
    qkv = self.qkv(y).reshape(b, h * w, 3, self.heads, c // self.heads)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))     # [B, heads, L, d]
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
    return x + self.proj(out).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):

  def __init__(self, channels: int):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, stride=2)

  def forward(self, x):
    return self.conv(F.pad(x, (0, 1, 0, 1)))     # flax/XLA SAME padding for stride 2


class Upsample(nn.Module):

  def __init__(self, channels: int):
    super().__init__()
    self.conv = nn.Conv2d(channels, channels, 3, padding=1)

  def forward(self, x):
    return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class TorchUNet(nn.Module):
  """v_hat = TorchUNet(z [B, C, H, W], t [B] or [B, H, W], y [B] | None).

  cfg: the flax model config (`config.model`); image_size: H = W (attention placement).
  """

  def __init__(self, cfg, image_size: int):
    super().__init__()
    self.cfg = cfg
    self.image_size = image_size
    base, e, g = cfg.base_channels, cfg.time_embed_dim, cfg.num_groups
    self.time_dense_0 = nn.Linear(base, e)
    self.time_dense_1 = nn.Linear(e, e)
    self.class_embed = nn.Embedding(cfg.num_classes + 1, e) if cfg.num_classes else None
    self.conv_in = nn.Conv2d(cfg.out_channels, base, 3, padding=1)
    self.down, chans, ch = nn.ModuleList(), [base], base
    levels = len(cfg.channel_mult)
    self.resolutions = []       # filled at the first call: attention needs the size
    for level, mult in enumerate(cfg.channel_mult):
      for _ in range(cfg.num_res_blocks[level]):
        self.down.append(ResBlock(ch, base * mult, e, g))
        ch = base * mult
        self.down.append(Attention(ch, cfg.head_dim, g))
        chans.append(ch)
      if level != levels - 1:
        self.down.append(Downsample(ch))
        chans.append(ch)
    self.mid = nn.ModuleList([ResBlock(ch, ch, e, g)])
    for _ in range(cfg.num_middle_blocks):
      self.mid.extend([Attention(ch, cfg.head_dim, g), ResBlock(ch, ch, e, g)])
    self.up = nn.ModuleList()
    for level in reversed(range(levels)):
      for _ in range(cfg.num_res_blocks[level] + 1):
        self.up.append(ResBlock(ch + chans.pop(), base * cfg.channel_mult[level], e, g))
        ch = base * cfg.channel_mult[level]
        self.up.append(Attention(ch, cfg.head_dim, g))
      if level != 0:
        self.up.append(Upsample(ch))
    self.norm_out = nn.GroupNorm(_groups(ch, g), ch, eps=1e-5)
    self.conv_out = nn.Conv2d(ch, cfg.out_channels, 3, padding=1)
    self.attn_res = set(cfg.attention_resolutions)
    self._prune_attention()

  def _prune_attention(self):
    """Drops the Attention modules at resolutions without attention (as the flax UNet)."""
    size = self.image_size
    levels = len(self.cfg.channel_mult)

    def keep(modules, sizes):
      return nn.ModuleList([m for m, s in zip(modules, sizes)
                            if not isinstance(m, Attention) or s in self.attn_res])
    sizes, s = [], size
    for m in self.down:
      if isinstance(m, Downsample):
        sizes.append(s)
        s //= 2
      else:
        sizes.append(s)
    self.down = keep(self.down, sizes)
    self.mid = keep(self.mid, [s] * len(self.mid))
    sizes = []
    for m in self.up:
      sizes.append(s)
      if isinstance(m, Upsample):
        s *= 2
    self.up = keep(self.up, sizes)
    del levels

  def _embeddings(self, t, y, num_levels):
    cls = None if self.class_embed is None else self.class_embed(y)
    embs = []
    for level in range(num_levels):
      tl = pool_time(t, 2 ** level)
      emb = self.time_dense_1(F.silu(self.time_dense_0(sinusoidal(tl, self.cfg.base_channels))))
      if cls is not None:
        emb = emb + (cls if emb.ndim == 2 else cls[:, None, None, :])
      embs.append(F.silu(emb))
    return embs

  def forward(self, z, t, y=None):
    levels = len(self.cfg.channel_mult)
    embs = self._embeddings(t, y, levels)
    h = self.conv_in(z)
    skips, level = [h], 0
    for m in self.down:
      if isinstance(m, ResBlock):
        h = m(h, embs[level])
        skips.append(h)
      elif isinstance(m, Attention):
        h = m(h)
        skips[-1] = h
      else:
        h = m(h)
        skips.append(h)
        level += 1
    for m in self.mid:
      h = m(h, embs[-1]) if isinstance(m, ResBlock) else m(h)
    for m in self.up:
      if isinstance(m, ResBlock):
        h = m(torch.cat([h, skips.pop()], dim=1), embs[level])
      elif isinstance(m, Attention):
        h = m(h)
      else:
        h = m(h)
        level -= 1
    return self.conv_out(F.silu(self.norm_out(h)))


def _copy(dst: torch.Tensor, src) -> None:
  src = torch.from_numpy(np.asarray(src, np.float32).copy())
  if src.shape != dst.shape:
    raise ValueError(f"shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
  with torch.no_grad():
    dst.copy_(src)


def _conv(m: nn.Conv2d, p) -> None:
  _copy(m.weight, np.transpose(np.asarray(p["kernel"]), (3, 2, 0, 1)))   # HWIO -> OIHW
  _copy(m.bias, p["bias"])


def _dense(m: nn.Linear, p) -> None:
  _copy(m.weight, np.asarray(p["kernel"]).T)
  _copy(m.bias, p["bias"])


def _norm(m: nn.GroupNorm, p) -> None:
  p = p["GroupNorm_0"]
  _copy(m.weight, p["scale"])
  _copy(m.bias, p["bias"])


def _res(m: ResBlock, p) -> None:
  _norm(m.norm_0, p["norm_0"])
  _conv(m.conv_0, p["conv_0"])
  _dense(m.film, p["film"])
  _norm(m.norm_1, p["norm_1"])
  _conv(m.conv_1, p["conv_1"])
  if m.skip is not None:
    _conv(m.skip, p["skip"])


def _attn(m: Attention, p) -> None:
  _norm(m.norm, p["norm"])
  _dense(m.qkv, p["qkv"])
  _dense(m.proj, p["proj"])


def load_flax_params(model: TorchUNet, params) -> None:
  """Copies the flax UNet's parameters (same config) into `model`."""
  cfg = model.cfg
  _dense(model.time_dense_0, params["time_embed"]["dense_0"])
  _dense(model.time_dense_1, params["time_embed"]["dense_1"])
  if model.class_embed is not None:
    _copy(model.class_embed.weight, params["class_embed"]["embedding"])
  _conv(model.conv_in, params["conv_in"])
  it = iter(model.down)
  for level in range(len(cfg.channel_mult)):
    for i in range(cfg.num_res_blocks[level]):
      _res(next(it), params[f"down_{level}_res_{i}"])
      if f"down_{level}_attn_{i}" in params:
        _attn(next(it), params[f"down_{level}_attn_{i}"])
    if level != len(cfg.channel_mult) - 1:
      _conv(next(it).conv, params[f"down_{level}_downsample"]["Conv_0"])
  it = iter(model.mid)
  _res(next(it), params["mid_res_0"])
  for i in range(cfg.num_middle_blocks):
    _attn(next(it), params[f"mid_attn_{i}"])
    _res(next(it), params[f"mid_res_{i + 1}"])
  it = iter(model.up)
  for level in reversed(range(len(cfg.channel_mult))):
    for i in range(cfg.num_res_blocks[level] + 1):
      _res(next(it), params[f"up_{level}_res_{i}"])
      if f"up_{level}_attn_{i}" in params:
        _attn(next(it), params[f"up_{level}_attn_{i}"])
    if level != 0:
      _conv(next(it).conv, params[f"up_{level}_upsample"]["Conv_0"])
  _norm(model.norm_out, params["norm_out"])
  _conv(model.conv_out, params["conv_out"])
