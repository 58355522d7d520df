"""The diffusion-GAN head of DMD2 (spec 2.3): a small conv classifier on the fake network's
intermediate block features.

    >>> import torch
    >>> from distill.gan import GanHead, tap
    >>> head = GanHead(hidden=16)
    >>> head(torch.randn(2, 64, 16)).shape            # tokens of an 8 x 8 grid -> one logit per sample
    torch.Size([2])

``tap(block)`` records a block's output hidden states during one forward (a removable forward hook;
nothing is copied or subclassed). Generator and real samples are re-noised at s ~ U{0..S-1} and
passed through the fake network; the head reads the tapped features.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn


class GanHead(nn.Module):
    def __init__(self, hidden: int, width: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(hidden, width, 3, padding=1), nn.GroupNorm(8 if width % 8 == 0 else 1, width), nn.SiLU(),
            nn.Conv2d(width, width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(width, 1, 1),
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n, d = tokens.shape
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(f"the GAN head expects a square token grid, got {n} tokens")
        grid = tokens.float().transpose(1, 2).reshape(b, d, side, side)
        return self.net(grid).flatten(1).mean(1)


@contextlib.contextmanager
def tap(block: nn.Module):
    """Collect ``block``'s output hidden states (first element of a tuple output) while active."""
    seen: list[torch.Tensor] = []

    def hook(module, args, output):
        seen.append(output[0] if isinstance(output, tuple) else output)

    handle = block.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()
