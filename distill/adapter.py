"""A zero-initialised ControlNet-style control adapter for PixArt-type DiTs (diffusers has no PixArt
ControlNet).

    >>> from distill.adapter import ControlAdapter
    >>> from pipelines.tiny import build_tiny
    >>> model = build_tiny("pixart").transformer
    >>> adapter = ControlAdapter.for_model(model, control_channels=1)
    >>> with adapter.attached(model, control):                       # doctest: +SKIP
    ...     out = model(x, ...)                                     # patch tokens + adapter(control)

A small conv encoder with the transformer's patch stride turns the control map into features per
patch token. A zero-initialised projection adds them to the output of the transformer's patch
embedding (``pos_embed``), and, as in ControlNet, one more zero-initialised projection each adds
them to the outputs of the first ``blocks`` transformer blocks (``for_model`` takes the first
half), so the control is re-injected at every depth it must survive. All projections start at
zero: at the start the adapted model *is* the frozen one (NCT's boundary term starts at exactly 0).
The forward hooks exist only inside ``attached`` — the transformer is never copied or subclassed.
The patch-embedding hook calls ``adapter_call`` (the DDP-prepared module in training) once per
forward, so gradients synchronise across ranks; the block hooks reuse its outputs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def _zero_linear(n_in: int, n_out: int) -> nn.Linear:
    lin = nn.Linear(n_in, n_out)
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)
    return lin


class ControlAdapter(nn.Module):
    def __init__(self, control_channels: int, hidden: int, patch: int, width: int = 64, blocks: int = 0):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Conv2d(control_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, patch, stride=patch), nn.SiLU(),
        )
        self.proj = _zero_linear(width, hidden)
        self.block_proj = nn.ModuleList(_zero_linear(width, hidden) for _ in range(blocks))
        self.config = {"control_channels": control_channels, "hidden": hidden, "patch": patch, "width": width,
                       "blocks": blocks}

    @classmethod
    def for_model(cls, model: nn.Module, control_channels: int = 1, width: int = 64,
                  blocks: int | None = None) -> ControlAdapter:
        """An adapter sized for ``model``; ``blocks`` (default: half its depth) get their own residual."""
        cfg = model.config
        hidden = cfg.num_attention_heads * cfg.attention_head_dim
        depth = len(model.transformer_blocks)
        blocks = depth // 2 if blocks is None else blocks
        if not 0 <= blocks <= depth:
            raise ValueError(f"blocks={blocks}: the model has {depth} transformer blocks")
        return cls(control_channels, hidden, cfg.patch_size, width, blocks)

    def forward(self, control: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Control map ``[B, C, H, W]`` (latent resolution) -> residual tokens ``[B, H/p * W/p, hidden]``:
        one for the patch embedding, then one per injected block."""
        feats = self.encoder(control.float()).flatten(2).transpose(1, 2)
        return (self.proj(feats), *(lin(feats) for lin in self.block_proj))

    @contextlib.contextmanager
    def attached(self, model: nn.Module, control: torch.Tensor, adapter_call=None):
        call = adapter_call if adapter_call is not None else self
        n = len(self.block_proj)
        if n > len(model.transformer_blocks):
            raise ValueError(f"adapter injects {n} blocks; the model has {len(model.transformer_blocks)}")
        residuals = []

        def at_embed(module, args, output):
            residuals[:] = call(control)
            return output + residuals[0].to(output.dtype)

        def at_block(i):
            def add(module, args, output):
                return output + residuals[i].to(output.dtype)
            return add

        handles = [model.pos_embed.register_forward_hook(at_embed)]
        handles += [model.transformer_blocks[i].register_forward_hook(at_block(i + 1)) for i in range(n)]
        try:
            yield model
        finally:
            for handle in handles:
                handle.remove()
