"""Tiny offline pipelines for the tests (built from configs in code by :mod:`pipelines.tiny`).

Each architecture comes with what the tests compute by hand: the number of cacheable
(block, component) slots and the number of denoiser calls per step.
"""

from __future__ import annotations

import torch

from accel.bench import ComputeProbe
from pipelines.tiny import ARCHITECTURES, build_tiny

# slots in the tiny models, counted by hand from their configs
SLOTS = {
    "pixart": 2 * 3,  # 2 BasicTransformerBlocks x (attn1, attn2, ff)
    "flux": 2 * 3 + 2 * 3,  # 2 double (attn, ff, ff_context) + 2 single (attn, proj_mlp, proj_out)
    "sd3": 3 + 2,  # block 0: attn, ff, ff_context; last block is context_pre_only: attn, ff
    "wan": 2 * 3,  # attn1, attn2, ffn
    "cogvideox": 2 * 2,  # attn1, ff
    "hunyuan": 2 * 3 + 2 * 3,
}
# denoiser calls per step with the tiny call kwargs: Wan runs cond and uncond as two calls
CALLS_PER_STEP = {"pixart": 1, "flux": 1, "sd3": 1, "wan": 2, "cogvideox": 1, "hunyuan": 1}

__all__ = ["ARCHITECTURES", "SLOTS", "CALLS_PER_STEP", "make", "generate", "ComponentCounter", "hook_footprint"]

_CACHE: dict[str, object] = {}


def make(arch: str):
    """A fresh tiny pipeline (built once per process, then deep-copied)."""
    import copy

    if arch not in _CACHE:
        _CACHE[arch] = build_tiny(arch)
    pipe = copy.deepcopy(_CACHE[arch])
    pipe.tiny_call_kwargs = dict(_CACHE[arch].tiny_call_kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt="a red circle", seed=0, **overrides) -> torch.Tensor:
    kwargs = dict(pipe.tiny_call_kwargs, **overrides)
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs)
    out = out.images if hasattr(out, "images") else out.frames
    return out.detach().clone()


class ComponentCounter(ComputeProbe):
    """Counts real computations of each cacheable component (an innermost counting hook), independently
    of the plug-ins' own counters. Create it before applying a plug-in; read ``count``."""

    @property
    def count(self) -> int:
        return self.component_calls

    @count.setter
    def count(self, value: int) -> None:
        self.component_calls = value


def hook_footprint(pipe) -> tuple:
    """Everything a plug-in could leave behind: hook registries, instance forwards, scheduler patch."""
    model = pipe.transformer
    regs = tuple(
        (name, tuple(m._diffusers_hook._hook_order))
        for name, m in model.named_modules()
        if hasattr(m, "_diffusers_hook")
    )
    forwards = tuple(name for name, m in model.named_modules() if "forward" in vars(m))
    hooks = tuple(
        (name, len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    )
    return regs, forwards, hooks, "set_timesteps" in vars(pipe.scheduler), hasattr(model, "_accel_state")
