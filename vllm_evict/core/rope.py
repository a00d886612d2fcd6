"""Rotary position embeddings, for statistics of queries before RoPE (expected attention).

Queries reach the attention layer already rotated to their (logical) positions. A policy that
models future queries needs them before rotation, and the rotation averaged over the positions
to come. The table is the one the model rotates with: [max_positions, rotary_dim], the cosines
then the sines of each frequency (vLLM's `cos_sin_cache` layout). Only the neox layout (the
rotary dims split in two halves, as in Llama) is handled; the dims past rotary_dim pass through.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RopeTable:
    cos_sin: torch.Tensor
    """[max_positions, rotary_dim] float32: cos of each frequency, then sin."""
    neox: bool = True

    @property
    def rotary_dim(self) -> int:
        return self.cos_sin.shape[-1]

    def _cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.neox:
            raise ValueError("only neox-style (half-split) rotary embeddings are supported")
        if positions.numel() and int(positions.max()) >= self.cos_sin.shape[0]:
            raise ValueError(f"position {int(positions.max())} is past the RoPE table "
                             f"({self.cos_sin.shape[0]} positions)")
        table = self.cos_sin[positions.to(self.cos_sin.device)]
        half = self.rotary_dim // 2
        return table[..., :half], table[..., half:]

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: [n, heads, head_dim] rotated to `positions` [n]; returns x before RoPE (float32)."""
        cos, sin = (t[:, None, :] for t in self._cos_sin(positions))
        x = x.float()
        half = self.rotary_dim // 2
        x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
        # RoPE maps (x1, x2) to (x1 cos - x2 sin, x2 cos + x1 sin); this is its transpose.
        return torch.cat([x1 * cos + x2 * sin, x2 * cos - x1 * sin, rest], dim=-1)

    def mean_rotation(self, start: int, count: int, head_dim: int) -> torch.Tensor:
        """[head_dim, head_dim]: the RoPE matrix averaged over positions start .. start+count-1
        (shifted back to the table's last `count` positions where it ends earlier: the model
        cannot reach those positions anyway)."""
        count = min(count, self.cos_sin.shape[0])
        start = min(start, self.cos_sin.shape[0] - count)
        cos, sin = self._cos_sin(torch.arange(start, start + count))
        cos, sin = cos.mean(0), sin.mean(0)
        half = self.rotary_dim // 2
        rot = torch.eye(head_dim, dtype=torch.float32, device=cos.device)
        idx = torch.arange(half, device=cos.device)
        rot[idx, idx] = cos
        rot[idx + half, idx + half] = cos
        rot[idx, idx + half] = -sin
        rot[idx + half, idx] = sin
        return rot
