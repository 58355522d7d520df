"""Class-keyed registry: what the plug-ins need to know about each denoiser architecture.

    >>> from accel.adapters import get_adapter
    >>> from pipelines.tiny import build_tiny
    >>> model = build_tiny("pixart").transformer
    >>> adapter = get_adapter(model)
    >>> [slot.name for slot in adapter.slots(model)][:3]
    ['transformer_blocks.0.attn1', 'transformer_blocks.0.attn2', 'transformer_blocks.0.ff']

A new architecture is one :func:`register_adapter` call, not a new code path.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .errors import UnsupportedModelError


@dataclass(frozen=True)
class BlockGroup:
    """One ``nn.ModuleList`` of blocks in a denoiser.

    Args:
        attr: attribute name of the list on the model (``"transformer_blocks"``).
        components: cacheable sub-module names of each block, in flatten order; a block whose
            attribute is ``None`` (SD3's last ``ff_context``) simply lacks that component.
        self_attention: names of the self-attention modules of each block.
        cross_attention: names of the cross-attention modules of each block.
        hidden_states_index / encoder_hidden_states_index: where the block's forward returns the
            image/video stream and the text stream (``None`` when it returns a single tensor).
        input_norms: ``(norm, component)`` pairs where the block feeds the norm's output to that
            component and nowhere else (PixArt's ``norm1`` -> ``attn1``): when the component reuses
            its output the norm need not run either. Only norms whose output carries nothing else
            (no gates) qualify.
        input_norms_if: a predicate on a block; its ``input_norms`` apply only where it holds (the
            wiring depends on the block's configuration).
    """

    attr: str
    components: tuple[str, ...]
    self_attention: tuple[str, ...] = ()
    cross_attention: tuple[str, ...] = ()
    hidden_states_index: int | None = None
    encoder_hidden_states_index: int | None = None
    input_norms: tuple[tuple[str, str], ...] = ()
    input_norms_if: Callable[[torch.nn.Module], bool] | None = field(default=None, compare=False)

    def input_norm_of(self, block: torch.nn.Module, component: str) -> torch.nn.Module | None:
        """The norm that feeds only ``component`` in ``block`` (None when there is none)."""
        if self.input_norms_if is not None and not self.input_norms_if(block):
            return None
        for norm, target in self.input_norms:
            module = getattr(block, norm, None)
            if target == component and module is not None and not isinstance(module, torch.nn.Identity):
                return module
        return None


@dataclass(frozen=True)
class Slot:
    """One cacheable (block, component) pair, with the norm that feeds only it (if any)."""

    group: str
    block: int
    component: str
    module: torch.nn.Module = field(compare=False, repr=False)
    input_norm: torch.nn.Module | None = field(default=None, compare=False, repr=False)

    @property
    def name(self) -> str:
        return f"{self.group}.{self.block}.{self.component}"


@dataclass(frozen=True)
class ModelAdapter:
    """What the core knows about one denoiser class.

    Args:
        model_class: the diffusers model class.
        groups: its block lists, in model order.
        timestep_arg: name of the forward argument that carries the timestep.
        timestep_scale: factor from the value the pipeline passes to scheduler units (Flux's
            pipelines pass ``t / 1000``).
        latent_layout: layout of the ``hidden_states`` input (``"BCHW"``, ``"BCTHW"``, ``"BTCHW"``),
            or ``None`` when it is packed into tokens (Flux).
    """

    model_class: type
    groups: tuple[BlockGroup, ...]
    timestep_arg: str = "timestep"
    timestep_scale: float = 1.0
    latent_layout: str | None = None

    def blocks(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        out = []
        for group in self.groups:
            for i, block in enumerate(getattr(model, group.attr)):
                out.append((f"{group.attr}.{i}", block))
        return out

    def slots(self, model: torch.nn.Module, components: tuple[str, ...] | None = None) -> list[Slot]:
        """Every (block, component) slot in flatten order: groups, then blocks, then components."""
        out = []
        for group in self.groups:
            for i, block in enumerate(getattr(model, group.attr)):
                for name in group.components:
                    module = getattr(block, name, None)
                    if module is None or (components is not None and name not in components):
                        continue
                    out.append(Slot(group.attr, i, name, module, group.input_norm_of(block, name)))
        return out

    def self_attention_modules(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        out = []
        for group in self.groups:
            for i, block in enumerate(getattr(model, group.attr)):
                for name in group.self_attention:
                    module = getattr(block, name, None)
                    if module is not None:
                        out.append((f"{group.attr}.{i}.{name}", module))
        return out

    def component_names(self) -> tuple[str, ...]:
        names: list[str] = []
        for group in self.groups:
            names.extend(c for c in group.components if c not in names)
        return tuple(names)

    def timestep_from(self, args: tuple, kwargs: dict) -> torch.Tensor | float | None:
        return self._arg(self.timestep_arg, args, kwargs)

    def latents_from(self, args: tuple, kwargs: dict) -> list[torch.Tensor] | None:
        """The noisy latents of each sample as ``(C, T, H, W)`` (what SeaCache calls raw vision)."""
        x = self._arg("hidden_states", args, kwargs)
        if not isinstance(x, torch.Tensor) or self.latent_layout is None:
            return None
        if self.latent_layout == "BCHW":
            x = x.unsqueeze(2)
        elif self.latent_layout == "BTCHW":
            x = x.transpose(1, 2)
        return list(x.unbind(0))

    def _arg(self, name: str, args: tuple, kwargs: dict):
        if name in kwargs:
            return kwargs[name]
        index = _positional_index(self.model_class, name)
        return args[index] if index is not None and index < len(args) else None


def _positional_index(cls: type, arg: str) -> int | None:
    params = list(inspect.signature(cls.forward).parameters)[1:]  # drop self
    return params.index(arg) if arg in params else None


_REGISTRY: dict[type, ModelAdapter] = {}


def register_adapter(adapter: ModelAdapter) -> ModelAdapter:
    """Register ``adapter`` for its model class (and subclasses). Returns it."""
    _REGISTRY[adapter.model_class] = adapter
    return adapter


def supported_classes() -> list[str]:
    return sorted(cls.__name__ for cls in _REGISTRY)


def get_adapter(model: torch.nn.Module) -> ModelAdapter:
    """The adapter for ``model``'s class, or :class:`UnsupportedModelError` naming it."""
    for cls in type(model).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    raise UnsupportedModelError(
        f"{type(model).__name__} is not supported; supported model classes: {', '.join(supported_classes())}"
    )


def _pixart_norms_feed_one(block: torch.nn.Module) -> bool:
    # BasicTransformerBlock with PixArt's "ada_norm_single": norm1 feeds only attn1 and norm2 only ff
    # (attn2 reads the residual stream itself); other norm types route norm2 to attn2
    return (getattr(block, "norm_type", None) == "ada_norm_single" and getattr(block, "pos_embed", None) is None
            and getattr(block, "_chunk_size", None) is None)


def _register_builtin() -> None:
    from diffusers import (
        CogVideoXTransformer3DModel,
        FluxTransformer2DModel,
        HunyuanVideoTransformer3DModel,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
        WanTransformer3DModel,
    )

    register_adapter(ModelAdapter(PixArtTransformer2DModel, (
        BlockGroup("transformer_blocks", ("attn1", "attn2", "ff"), ("attn1",), ("attn2",), 0, None,
                   input_norms=(("norm1", "attn1"), ("norm2", "ff")), input_norms_if=_pixart_norms_feed_one),
    ), latent_layout="BCHW"))
    register_adapter(ModelAdapter(FluxTransformer2DModel, (
        BlockGroup("transformer_blocks", ("attn", "ff", "ff_context"), ("attn",), (), 1, 0),
        BlockGroup("single_transformer_blocks", ("attn", "proj_mlp", "proj_out"), ("attn",), (), 1, 0),
    ), timestep_scale=1000.0))
    register_adapter(ModelAdapter(SD3Transformer2DModel, (
        BlockGroup("transformer_blocks", ("attn", "attn2", "ff", "ff_context"), ("attn", "attn2"), (), 1, 0),
    ), latent_layout="BCHW"))
    register_adapter(ModelAdapter(WanTransformer3DModel, (
        BlockGroup("blocks", ("attn1", "attn2", "ffn"), ("attn1",), ("attn2",), 0, None,
                   input_norms=(("norm1", "attn1"), ("norm2", "attn2"), ("norm3", "ffn"))),
    ), latent_layout="BCTHW"))
    register_adapter(ModelAdapter(CogVideoXTransformer3DModel, (
        BlockGroup("transformer_blocks", ("attn1", "ff"), ("attn1",), (), 0, 1),
    ), latent_layout="BTCHW"))
    register_adapter(ModelAdapter(HunyuanVideoTransformer3DModel, (
        BlockGroup("transformer_blocks", ("attn", "ff", "ff_context"), ("attn",), (), 0, 1),
        BlockGroup("single_transformer_blocks", ("attn", "proj_mlp", "proj_out"), ("attn",), (), 0, 1),
    ), latent_layout="BCTHW"))


_register_builtin()
