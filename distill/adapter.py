"""A zero-initialised ControlNet-style control adapter for PixArt-type DiTs (diffusers has no PixArt
ControlNet).

    >>> from distill.adapter import ControlAdapter
    >>> from pipelines.tiny import build_tiny
    >>> model = build_tiny("pixart").transformer
    >>> adapter = ControlAdapter.for_model(model, control_channels=1)
    >>> with adapter.attached(model, control):                       # doctest: +SKIP
    ...     out = model(x, ...)                                     # patch tokens + adapter(control)

A small conv encoder with the transformer's patch stride turns the control map into one residual
per patch token; its last projection is zero-initialised, so at the start the adapted model *is*
the frozen one (NCT's boundary term starts at exactly 0). It is added to the output of the
transformer's patch embedding (``pos_embed``) by a forward hook that exists only inside
``attached`` — the transformer is never copied or subclassed. The hook calls ``adapter_call`` (the
DDP-prepared module in training) so gradients synchronise across ranks.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


class ControlAdapter(nn.Module):
    def __init__(self, control_channels: int, hidden: int, patch: int, width: int = 64):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(control_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, patch, stride=patch), nn.SiLU(),
        )
        self.proj = nn.Linear(width, hidden)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)
        self.config = {"control_channels": control_channels, "hidden": hidden, "patch": patch, "width": width}

    @classmethod
    def for_model(cls, model: nn.Module, control_channels: int = 1, width: int = 64) -> ControlAdapter:
        cfg = model.config
        hidden = cfg.num_attention_heads * cfg.attention_head_dim
        return cls(control_channels, hidden, cfg.patch_size, width)

    def forward(self, control: torch.Tensor) -> torch.Tensor:
        """Control map ``[B, C, H, W]`` (latent resolution) -> residual tokens ``[B, H/p * W/p, hidden]``."""
        feats = self.encoder(control.float())
        return self.proj(feats.flatten(2).transpose(1, 2))

    @contextlib.contextmanager
    def attached(self, model: nn.Module, control: torch.Tensor, adapter_call=None):
        call = adapter_call if adapter_call is not None else self

        def add(module, args, output):
            return output + call(control).to(output.dtype)

        handle = model.pos_embed.register_forward_hook(add)
        try:
            yield model
        finally:
            handle.remove()
