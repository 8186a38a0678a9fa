"""Rotary position embeddings with the scaled variants Llama-family configs use."""

from __future__ import annotations

import math

import torch

from splitlm.model.spec import ModelSpec


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3(inv_freq: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    rs = spec.rope_scaling
    old_len = rs.original_max_position
    low_wavelen = old_len / rs.low_freq_factor
    high_wavelen = old_len / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (old_len / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _yarn(spec: ModelSpec, dim: int) -> tuple[torch.Tensor, float]:
    rs = spec.rope_scaling
    base, factor, orig = spec.rope_theta, rs.factor, rs.original_max_position

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(rs.beta_fast)), 0)
    high = min(math.ceil(correction_dim(rs.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    keep = 1 - ramp
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    attention = rs.attention_factor
    if attention is None:
        attention = 0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0
    return inv_freq, attention


def inv_frequencies(spec: ModelSpec, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (head_dim/2,) and the cos/sin multiplier for `spec`.

    `seq_len` matters only for dynamic NTK scaling, which grows the base past
    the trained context.
    """
    dim, rs = spec.head_dim, spec.rope_scaling
    if rs.kind == "default":
        return _base_inv_freq(spec.rope_theta, dim), 1.0
    if rs.kind == "linear":
        return _base_inv_freq(spec.rope_theta, dim) / rs.factor, 1.0
    if rs.kind == "llama3":
        return _llama3(_base_inv_freq(spec.rope_theta, dim), spec), 1.0
    if rs.kind == "yarn":
        return _yarn(spec, dim)
    # dynamic NTK
    max_pos = rs.original_max_position or spec.max_position
    base = spec.rope_theta
    if seq_len is not None and seq_len > max_pos:
        base = base * ((rs.factor * seq_len / max_pos) - (rs.factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(base, dim), 1.0


class Rotary(torch.nn.Module):
    """Computes cos/sin tables for given positions."""

    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        self.spec = spec
        inv_freq, self.attention_factor = inv_frequencies(spec)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int64 -> cos, sin (B, T, head_dim) float32."""
        inv_freq = self.inv_freq
        if self.spec.rope_scaling.kind == "dynamic" and not torch.jit.is_tracing():
            seq_len = int(positions.max()) + 1
            inv_freq = inv_frequencies(self.spec, seq_len)[0].to(positions.device)
        freqs = positions[..., None].float() * inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, D)
        return emb.cos() * self.attention_factor, emb.sin() * self.attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos/sin (B, T, D)."""
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)  # (B, 1, T, D)
    return x * cos + rotate_half(x) * sin
