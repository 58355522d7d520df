"""``apply`` / ``remove`` / ``applied`` / ``applying`` / ``reset`` / ``stats``: the one public entry point.

    >>> import accel
    >>> from caching import StaticCacheConfig
    >>> from pipelines.tiny import build_tiny
    >>> pipe = build_tiny("pixart")
    >>> accel.apply(pipe, StaticCacheConfig(interval=2)) is pipe
    True
    >>> accel.applied(pipe)
    [StaticCacheConfig(interval=2, warmup_steps=0, components=None)]
    >>> accel.remove(pipe)   # outputs are bit-identical to never having applied anything
    >>> with accel.applying(pipe, StaticCacheConfig(interval=3)):
    ...     _ = pipe("a red circle", **pipe.tiny_call_kwargs)

A plug-in is a config class registered with :func:`register_plugin` and an installer that puts
named hooks on the denoiser and returns a handle with ``remove()`` (and optionally ``stats()``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _compat
from .adapters import ModelAdapter, get_adapter, supported_classes
from .errors import ConfigError, UnsupportedModelError
from .steps import TRACKER_HOOK, StepTracker

Installer = Callable[[torch.nn.Module, Any, StepTracker, ModelAdapter], Any]
_PLUGINS: dict[type, tuple[str, Installer]] = {}
_TEXT_PLUGINS: dict[type, Callable[[Any, Any], Any]] = {}


def register_text_plugin(config_cls: type):
    """Decorator: register ``installer(pipeline, config) -> handle`` for diffusion-LM pipelines
    (targets with ``accel_text_target = True``, e.g. :class:`pipelines.diffusion_lm.DiffusionLMPipeline`)."""

    def wrap(installer):
        _TEXT_PLUGINS[config_cls] = installer
        return installer

    return wrap


def _is_text(target) -> bool:
    return bool(getattr(target, "accel_text_target", False)) or type(target).__name__ == "LLaDA2Pipeline"


def _apply_text(target, configs: tuple):
    installed = target.__dict__.setdefault("_accel_text_state", [])
    for config in configs:
        if type(config) not in _TEXT_PLUGINS:
            raise ConfigError(f"{type(config).__name__} does not apply to {type(target).__name__}; known configs for "
                              f"diffusion LMs: {', '.join(sorted(c.__name__ for c in _TEXT_PLUGINS))}")
    if len(installed) + len(configs) > 1:
        names = [type(c).__name__ for c, _ in installed] + [type(c).__name__ for c in configs]
        raise ConfigError(f"at most one cache plug-in per model, got {', '.join(names)}; call accel.remove() first")
    added = []
    try:
        for config in configs:
            added.append((config, _TEXT_PLUGINS[type(config)](target, config)))
    except BaseException:
        for _, handle in reversed(added):
            handle.remove()
        raise
    installed.extend(added)
    return target


def register_plugin(config_cls: type, kind: str | None = None):
    """Decorator: register ``installer(model, config, tracker, adapter) -> handle`` for ``config_cls``.

    ``kind`` is ``"cache"`` (at most one per model) or ``"attention"`` (stackable with one cache);
    it defaults to ``config_cls.kind``.
    """

    def wrap(installer: Installer) -> Installer:
        _PLUGINS[config_cls] = (kind or getattr(config_cls, "kind", "cache"), installer)
        return installer

    return wrap


@dataclass
class _State:
    tracker: StepTracker
    installed: list[tuple[Any, Any]] = field(default_factory=list)  # (config, handle)
    created: set[int] = field(default_factory=set)  # modules whose hook registry we created


def _resolve(target) -> tuple[torch.nn.Module, Any]:
    """(denoiser, scheduler or None) for a pipeline or a bare denoiser."""
    if isinstance(target, torch.nn.Module):
        return target, None
    model = getattr(target, "transformer", None)
    if isinstance(model, torch.nn.Module):
        return model, getattr(target, "scheduler", None)
    if isinstance(getattr(target, "unet", None), torch.nn.Module):
        raise UnsupportedModelError(
            f"{type(target).__name__} has a UNet denoiser ({type(target.unet).__name__}), which is not "
            f"supported; supported model classes: {', '.join(supported_classes())}"
        )
    raise UnsupportedModelError(
        f"cannot find a denoiser in {type(target).__name__}: pass a diffusers pipeline with a `transformer` "
        f"or the model itself; supported model classes: {', '.join(supported_classes())}"
    )


def _plugin_of(config) -> tuple[str, Installer]:
    """(kind, installer) registered for the config's class or its nearest registered base."""
    for cls in type(config).__mro__:
        if cls in _PLUGINS:
            return _PLUGINS[cls]
    raise ConfigError(
        f"{type(config).__name__} is not a plug-in config; known configs: "
        f"{', '.join(sorted(c.__name__ for c in _PLUGINS))}"
    )


def _kind_of(config) -> str:
    return _plugin_of(config)[0]


def _validate(model: torch.nn.Module, state: _State | None, configs: tuple) -> None:
    if _compat.diffusers_cache_enabled(model):
        raise ConfigError(
            f"{type(model).__name__} already has diffusers' own cache enabled "
            f"({type(model._cache_config).__name__}); call `disable_cache()` first, or pass that config "
            f"to accel.apply instead"
        )
    kinds = [_kind_of(c) for c in configs]
    if state is not None:
        kinds += [_kind_of(c) for c, _ in state.installed]
    for kind in ("cache", "attention"):
        if kinds.count(kind) > 1:
            present = [type(c).__name__ for c in configs if _kind_of(c) == kind]
            if state is not None:
                present = [type(c).__name__ for c, _ in state.installed if _kind_of(c) == kind] + present
            raise ConfigError(
                f"at most one {kind} plug-in per model, got {', '.join(present)}; "
                f"call accel.remove() first to switch methods"
            )


def _hook_snapshot(model: torch.nn.Module) -> dict[int, set[str]]:
    return {id(m): set(m._diffusers_hook.hooks) for m in model.modules() if _compat.has_hook_registry(m)}


def _remove_hooks_since(model: torch.nn.Module, snapshot: dict[int, set[str]]) -> None:
    """Remove every registry hook added after ``snapshot`` (whatever a failing installer left)."""
    for module in model.modules():
        if _compat.has_hook_registry(module):
            registry = module._diffusers_hook
            for name in reversed([n for n in registry._hook_order if n not in snapshot.get(id(module), ())]):
                _compat.remove_hook(module, name)


def _registry_less(model: torch.nn.Module) -> set[int]:
    return {id(m) for m in model.modules() if not _compat.has_hook_registry(m)}


def _put_tracker_on_top(model: torch.nn.Module, tracker: StepTracker) -> None:
    """The tracker must be the outermost hook so it sets the step before any other hook runs."""
    registry = _compat.registry_of(model)
    if TRACKER_HOOK in registry.hooks:
        if registry._hook_order[-1] == TRACKER_HOOK:
            return
        _compat.remove_hook(model, TRACKER_HOOK)
    registry.register_hook(tracker, TRACKER_HOOK)


def apply(target, *configs):
    """Apply plug-in ``configs`` to a diffusers pipeline or its denoiser; returns ``target``.

    Atomic: on any error nothing stays installed and the target's outputs are unchanged.
    Raises :class:`UnsupportedModelError` for an unknown model class and :class:`ConfigError` for
    invalid or conflicting configs.
    """
    if _is_text(target):
        return _apply_text(target, configs)
    model, scheduler = _resolve(target)
    adapter = get_adapter(model)
    state: _State | None = getattr(model, "_accel_state", None)
    _validate(model, state, configs)
    if not configs:
        return target

    fresh = state is None
    lacking = _registry_less(model)
    snapshot = _hook_snapshot(model)
    if fresh:
        state = _State(StepTracker(adapter))
    added: list[tuple[Any, Any]] = []
    try:
        if fresh:
            model._accel_state = state
        if scheduler is not None:
            state.tracker.attach_scheduler(scheduler)
        for config in configs:
            handle = _plugin_of(config)[1](model, config, state.tracker, adapter)
            added.append((config, handle))
            state.installed.append((config, handle))
        _put_tracker_on_top(model, state.tracker)
        state.created |= lacking - _registry_less(model)
        _compat.invalidate_registry_caches(model)
        state.tracker.request_reset()
    except BaseException:
        for item in reversed(added):
            item[1].remove()
            state.installed.remove(item)
        _remove_hooks_since(model, snapshot)
        if not fresh:
            _put_tracker_on_top(model, state.tracker)
        state.created |= lacking - _registry_less(model)
        _compat.invalidate_registry_caches(model)
        if fresh:
            _teardown(model, state)
        raise
    return target


def _teardown(model: torch.nn.Module, state: _State) -> None:
    _compat.remove_hook(model, TRACKER_HOOK)
    state.tracker.detach_scheduler()
    _compat.invalidate_registry_caches(model)
    _compat.drop_empty_registries(model, state.created)
    if "_accel_state" in vars(model):
        del model._accel_state


def remove(target) -> None:
    """Remove every plug-in applied to ``target``; afterwards outputs are bit-identical to plain."""
    if _is_text(target):
        for _, handle in reversed(target.__dict__.pop("_accel_text_state", [])):
            handle.remove()
        return
    model, _ = _resolve(target)
    state: _State | None = getattr(model, "_accel_state", None)
    if state is None:
        return
    _compat.remove_hook(model, TRACKER_HOOK)
    for _, handle in reversed(state.installed):
        handle.remove()
    state.installed.clear()
    _teardown(model, state)


def applied(target) -> list:
    """The configs currently applied to ``target``, in the order they were applied."""
    if _is_text(target):
        return [c for c, _ in target.__dict__.get("_accel_text_state", [])]
    model, _ = _resolve(target)
    state = getattr(model, "_accel_state", None)
    return [] if state is None else [c for c, _ in state.installed]


@contextlib.contextmanager
def applying(target, *configs):
    """``with accel.applying(pipe, cfg): ...`` applies on entry and removes *those* configs on exit.

    Plug-ins that were applied before entering stay applied.
    """
    before = applied(target)
    apply(target, *configs)
    try:
        yield target
    finally:
        remove(target)
        if before:
            apply(target, *before)


def reset(target, num_inference_steps: int | None = None) -> None:
    """Start a new generation at the next denoiser call (for a bare model driven by your own loop)."""
    model, _ = _resolve(target)
    state = getattr(model, "_accel_state", None)
    if state is None:
        raise ConfigError(f"nothing is applied to {type(model).__name__}; call accel.apply first")
    state.tracker.request_reset(num_inference_steps)


def stats(target) -> dict[str, int]:
    """Counters of the last generation summed over the applied plug-ins (e.g. ``component_calls``)."""
    if _is_text(target):
        installed = target.__dict__.get("_accel_text_state", [])
    else:
        model, _ = _resolve(target)
        state = getattr(model, "_accel_state", None)
        installed = [] if state is None else state.installed
    out: dict[str, int] = {}
    for _, handle in installed:
        for key, value in (handle.stats() if hasattr(handle, "stats") else {}).items():
            out[key] = out.get(key, 0) + value
    return out
