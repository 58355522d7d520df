"""Every import of a diffusers internal lives here, so a diffusers upgrade touches one file.

We pin diffusers to the 0.42 series; the names below are private there and may move.
"""

from __future__ import annotations

import torch
from diffusers.hooks import (
    FasterCacheConfig,
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    ModelHook,
    PyramidAttentionBroadcastConfig,
    SeaCacheConfig,
    TaylorSeerCacheConfig,
    apply_faster_cache,
    apply_first_block_cache,
    apply_mag_cache,
    apply_pyramid_attention_broadcast,
    apply_sea_cache,
    apply_taylorseer_cache,
)
from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
from diffusers.hooks.hooks import CacheContext, StateManager, _set_cache_context
from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
from diffusers.hooks.sea_cache import (
    _SEA_CACHE_BLOCK_HOOK,
    _SEA_CACHE_LEADER_BLOCK_HOOK,
    _SEA_CACHE_POST_NORM_HOOK,
    _SEA_CACHE_ROOT_HOOK,
)
from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_wan import _get_qkv_projections as wan_qkv_projections

__all__ = [
    "CacheContext", "HookRegistry", "ModelHook", "StateManager", "DIFFUSERS_CACHES", "SeaCacheConfig",
    "set_cache_context", "registry_of", "has_hook_registry", "diffusers_cache_enabled",
    "remove_hook", "remove_hook_everywhere", "drop_empty_registries",
    "dispatch_attention_fn", "apply_rotary_emb", "wan_qkv_projections",
]

# config class -> (apply function, hook names it registers, needs a current-timestep callback)
DIFFUSERS_CACHES = {
    FirstBlockCacheConfig: (apply_first_block_cache, (_FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK), False),
    TaylorSeerCacheConfig: (apply_taylorseer_cache, (_TAYLORSEER_CACHE_HOOK,), False),
    MagCacheConfig: (apply_mag_cache, (_MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK), False),
    SeaCacheConfig: (
        apply_sea_cache,
        (_SEA_CACHE_POST_NORM_HOOK, _SEA_CACHE_BLOCK_HOOK, _SEA_CACHE_LEADER_BLOCK_HOOK, _SEA_CACHE_ROOT_HOOK),
        False,
    ),
    PyramidAttentionBroadcastConfig: (apply_pyramid_attention_broadcast, (_PYRAMID_ATTENTION_BROADCAST_HOOK,), True),
    FasterCacheConfig: (apply_faster_cache, (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK), True),
}


def registry_of(module: torch.nn.Module) -> HookRegistry:
    registry = HookRegistry.check_if_exists_or_initialize(module)
    return registry


def has_hook_registry(module: torch.nn.Module) -> bool:
    return hasattr(module, "_diffusers_hook")


def remove_hook(module: torch.nn.Module, name: str) -> None:
    """Remove hook ``name`` from ``module``'s registry, keeping the hooks outside it working.

    diffusers' ``HookRegistry.remove_hook`` rewires the next-outer hook by overwriting its
    ``forward``; when that hook has a ``new_forward`` this bypasses it and leaves its
    ``original_forward`` pointing at the removed hook. We restore the outer hook's entry point and
    point its ``original_forward`` past the removed hook.
    """
    if not has_hook_registry(module) or name not in module._diffusers_hook.hooks:
        return
    registry = module._diffusers_hook
    index = registry._hook_order.index(name)
    inner = registry._fn_refs[index]
    below = inner.original_forward if inner.original_forward is not None else inner.forward
    outer = registry._fn_refs[index + 1] if index + 1 < len(registry._fn_refs) else None
    entry = outer.forward if outer is not None else None
    registry.remove_hook(name, recurse=False)
    if outer is not None and outer.original_forward is not None:
        outer.forward = entry
        outer.original_forward = below


def remove_hook_everywhere(module: torch.nn.Module, name: str) -> None:
    for sub in module.modules():
        remove_hook(sub, name)


def drop_empty_registries(module: torch.nn.Module, created: set[int]) -> None:
    """Undo what hook registration leaves behind once a registry is empty.

    Delete the ``_diffusers_hook`` attributes we created; and since removing a module's last hook
    leaves its original bound ``forward`` as an instance attribute, delete that too wherever no
    hook remains, so every module is exactly as it was before we touched it.
    """
    for sub in module.modules():
        if not has_hook_registry(sub) or sub._diffusers_hook.hooks:
            continue
        if id(sub) in created:
            del sub._diffusers_hook
        forward = vars(sub).get("forward")
        if getattr(forward, "__func__", None) is type(sub).forward and forward.__self__ is sub:
            del sub.forward


def invalidate_registry_caches(module: torch.nn.Module) -> None:
    if has_hook_registry(module):
        module._diffusers_hook.invalidate_child_registries_cache()


def set_cache_context(module: torch.nn.Module, context: CacheContext | None) -> None:
    _set_cache_context(module, context)


def pipeline_context(manager: StateManager) -> CacheContext | None:
    """The cache context the pipeline entered (``model.cache_context(...)``), if any."""
    return manager._context


def diffusers_cache_enabled(model: torch.nn.Module) -> bool:
    return getattr(model, "_cache_config", None) is not None
