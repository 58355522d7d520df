"""Plug-in acceleration for diffusers pipelines: ``accel.apply(pipe, config)`` and back.

    >>> import accel
    >>> from caching import StaticCacheConfig
    >>> from pipelines.tiny import build_tiny
    >>> pipe = accel.apply(build_tiny("pixart"), StaticCacheConfig(interval=2))
    >>> images = pipe("a red circle", **pipe.tiny_call_kwargs).images
    >>> accel.remove(pipe)
"""

from . import diffusers_caches as _diffusers_caches  # noqa: F401  (registers diffusers' configs)
from . import steps
from .api import applied, apply, applying, register_plugin, register_text_plugin, remove, reset, stats
from .errors import ConfigError, UnsupportedModelError

__all__ = [
    "apply", "remove", "applied", "applying", "reset", "stats", "register_plugin", "register_text_plugin",
    "ConfigError", "UnsupportedModelError", "steps",
]
__version__ = "0.1.0"
