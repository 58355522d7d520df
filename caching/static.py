"""Static (FORA-style) feature caching: recompute every N steps, reuse component outputs in between.

    >>> import accel
    >>> from caching import StaticCacheConfig
    >>> from pipelines.tiny import build_tiny
    >>> pipe = accel.apply(build_tiny("pixart"), StaticCacheConfig(interval=2, warmup_steps=1))
    >>> _ = pipe("a red circle", **pipe.tiny_call_kwargs)

Steps ``0..warmup_steps-1`` always compute; after that a step computes when
``(step - warmup_steps) % interval == 0``. ``interval=1`` computes every step and reproduces the
plain pipeline bit for bit. The reuse mechanics live in :mod:`accel.reuse`, shared with ECAD.
"""

from __future__ import annotations

from dataclasses import dataclass

from accel.adapters import ModelAdapter
from accel.api import register_plugin
from accel.config import PluginConfig, check_int
from accel.errors import ConfigError
from accel.reuse import ReuseInstaller


@dataclass
class StaticCacheConfig(PluginConfig):
    """Args:
        interval: recompute every ``interval`` steps (1 = every step, i.e. no caching).
        warmup_steps: leading steps that always recompute.
        components: component names to cache (e.g. ``["attn1", "ff"]``); ``None`` caches all the
            model's cacheable components. The others always compute.
    """

    interval: int = 2
    warmup_steps: int = 0
    components: tuple[str, ...] | None = None

    def __post_init__(self):
        check_int("interval", self.interval, 1)
        check_int("warmup_steps", self.warmup_steps, 0)
        if self.components is not None:
            if isinstance(self.components, str) or not all(isinstance(c, str) for c in self.components):
                raise ConfigError(f"components must be a list of component names, got {self.components!r}")
            self.components = tuple(self.components)
            if not self.components:
                raise ConfigError("components must name at least one component, or be None for all")

    def computes(self, step: int) -> bool:
        return step < self.warmup_steps or (step - self.warmup_steps) % self.interval == 0


@register_plugin(StaticCacheConfig)
def _install(model, config: StaticCacheConfig, tracker, adapter: ModelAdapter):
    if config.components is not None:
        unknown = sorted(set(config.components) - set(adapter.component_names()))
        if unknown:
            raise ConfigError(
                f"components: {', '.join(unknown)} not in {type(model).__name__}'s components "
                f"{list(adapter.component_names())}"
            )
    slots = adapter.slots(model, config.components)
    return ReuseInstaller(tracker, slots, lambda step, slot: config.computes(step))
