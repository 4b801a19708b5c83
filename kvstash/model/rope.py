"""Rotary position embedding as pure functions: rotate to absolute positions, and re-position rotated keys."""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Rope types whose angle is position * a fixed inverse frequency, so that rotations compose:
# R(p_new) = R(p_new - p_old) @ R(p_old). Dynamic/YaRN/LongRoPE change frequencies with length.
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class Rope:
    inv_freq: torch.Tensor  # [head_dim // 2] float32
    attention_scaling: float  # multiplies cos and sin (1.0 for the supported types)

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> Rope:
        emb = model.model.rotary_emb
        rope_type = getattr(emb, "rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(
                f"rope type {rope_type!r} is not supported (its rotations do not compose, so cached keys "
                f"cannot be re-positioned); supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
            )
        return cls(emb.inv_freq.detach().float().clone(), float(emb.attention_scaling))

    def cos_sin(self, positions: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] int64 -> cos, sin: [T, head_dim] float32
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        s = self.attention_scaling if scaled else 1.0
        return emb.cos() * s, emb.sin() * s


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    # x: [heads, T, head_dim]; cos, sin: [T, head_dim] -> x rotated, in ``dtype`` (default x's)
    # x * cos + rotate_half(x) * sin, in float32, written half by half into one buffer (the same operations,
    # so the same bits, without the rotated copy and two full-size temporaries)
    xf = x.float()
    half = x.shape[-1] // 2
    out = xf * cos
    out[..., :half] -= xf[..., half:] * sin[..., :half]
    out[..., half:] += xf[..., :half] * sin[..., half:]
    return out.to(dtype or x.dtype)


def reposition(
    keys: torch.Tensor,
    old: torch.Tensor,
    new: torch.Tensor,
    rope: Rope,
    dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate keys computed at positions ``old`` so they are as if computed at ``new``, in ``dtype`` (default:
    the keys'; the rotation itself is done in float32), into ``out`` when given (any view of keys' shape).

    keys: [..., T, head_dim] (already rotated to ``old``); old, new: [T] int64. Returns ``out`` or a new tensor.
    A chunk moved as a whole (the same shift for every token) is rotated by one angle per frequency; the work
    runs one leading slice at a time, so its float32 temporaries stay small.
    """
    if out is None:
        out = torch.empty(keys.shape, dtype=dtype or keys.dtype)
    if torch.equal(old, new):
        return out.copy_(keys)
    shift = new - old
    if bool((shift == shift[0]).all()):
        shift = shift[:1]  # one rotation for every token: cos, sin [1, head_dim] broadcast over T
    cos, sin = rope.cos_sin(shift, scaled=False)
    if keys.dim() < 3:
        return out.copy_(apply_rope(keys, cos, sin, out.dtype))
    for i in range(keys.shape[0]):  # e.g. one layer at a time
        out[i] = apply_rope(keys[i], cos, sin, out.dtype)
    return out
