"""diffusers' own cache configs through ``accel.apply``, also on pipelines diffusers leaves unwired.

    >>> import accel
    >>> from diffusers import FirstBlockCacheConfig
    >>> from pipelines.tiny import build_tiny
    >>> pipe = accel.apply(build_tiny("pixart"), FirstBlockCacheConfig(threshold=0.1))
    >>> _ = pipe("a red circle", **pipe.tiny_call_kwargs)   # PixArt has no cache_context

FirstBlockCache, TaylorSeer, MagCache, SeaCache, PyramidAttentionBroadcast and FasterCache hooks
expect a cache context (and SeaCache a step index and sigma) that PixArt, SD3 and most Flux
pipelines never provide, and PAB/FasterCache a current-timestep callback. The step tracker supplies
all three. We call diffusers' ``apply_*`` functions directly and never set ``_cache_config``, so
``enable_cache`` state stays the user's; the user's config object is copied, never mutated.
"""

from __future__ import annotations

import dataclasses

import torch

from . import _compat
from .adapters import ModelAdapter
from .api import register_plugin
from .steps import StepTracker


class DiffusersCacheHandle:
    def __init__(self, model: torch.nn.Module, hook_names: tuple[str, ...], tracker: StepTracker):
        self.model, self.hook_names, self.tracker = model, hook_names, tracker
        self.hooks = [
            (sub, sub._diffusers_hook.hooks[name])
            for sub in model.modules() if _compat.has_hook_registry(sub)
            for name in hook_names if name in sub._diffusers_hook.hooks
        ]
        tracker.provide_context = True
        tracker.listeners.append(self.reset)

    def reset(self) -> None:
        for module, hook in self.hooks:
            if hook._is_stateful:
                hook.reset_state(module)

    def remove(self) -> None:
        for name in self.hook_names:
            _compat.remove_hook_everywhere(self.model, name)
        _compat.invalidate_registry_caches(self.model)
        self.tracker.provide_context = False
        if self.reset in self.tracker.listeners:
            self.tracker.listeners.remove(self.reset)


def _install(model: torch.nn.Module, config, tracker: StepTracker, adapter: ModelAdapter):
    apply_fn, hook_names, needs_timestep = _compat.DIFFUSERS_CACHES[type(config)]
    config = dataclasses.replace(config)
    if needs_timestep and config.current_timestep_callback is None:
        config.current_timestep_callback = tracker.current_timestep
    if isinstance(config, _compat.SeaCacheConfig) and config.raw_vision_callback is None:
        if adapter.latent_layout is not None:
            config.raw_vision_callback = lambda module, args, kwargs: adapter.latents_from(args, kwargs)
    try:
        apply_fn(model, config)
    except BaseException:
        for name in hook_names:
            _compat.remove_hook_everywhere(model, name)
        raise
    return DiffusersCacheHandle(model, hook_names, tracker)


for _cls in _compat.DIFFUSERS_CACHES:
    register_plugin(_cls, kind="cache")(_install)
