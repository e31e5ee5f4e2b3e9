"""Rotary position embeddings in the Hugging Face layout (rotate-half), with linear and llama3 scaling.

Angles are computed in float64 and cast once to the activation dtype: at position 100k a float32
angle is off by ~1e-2 rad, which no checkpoint was trained to expect.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .config import LlamaConfig


def rope_frequencies(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """Inverse frequencies [head_dim // 2] in float64, with the config's rope scaling applied."""
    dim = cfg.head_dim
    inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    scaling = cfg.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    # llama3: leave high frequencies alone, divide low ones by `factor`, blend smoothly in between.
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    smooth = ((context / wavelen - low) / (high - low)).clamp(0.0, 1.0)
    return (1 - smooth) * inv_freq / factor + smooth * inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions; the frequencies stay float64 whatever the model dtype."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        # A model built on the meta device (to be filled from a checkpoint) gets a real table on the CPU,
        # where it is cheap (meta's arange runs a decomposition whose first call imports seconds of torch).
        device = "cpu" if torch.get_default_device().type == "meta" else None
        self.register_buffer("inv_freq", rope_frequencies(cfg, device=device), persistent=False)

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) would round the frequencies; recompute them in float64 on the new device instead.
        super()._apply(fn, recurse)
        self.inv_freq = rope_frequencies(self.cfg, device=self.inv_freq.device)
        return self

    def reset(self, device=None) -> None:
        """Recompute the frequencies (after a model was materialised from the meta device)."""
        self.inv_freq = rope_frequencies(self.cfg, device=device)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] (int) -> cos, sin [B, T, head_dim] in `dtype`."""
        angles = positions.to(torch.float64)[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D] rotated by cos/sin [B, T, D] (rotate-half layout)."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    # In x's dtype: under autocast, q/k come out of their projections in bf16 while cos/sin follow the
    # fp32 residual stream; fp32 rotation, then q, k and v share a dtype again for attention.
    return (x * cos + rotated * sin).to(x.dtype)
