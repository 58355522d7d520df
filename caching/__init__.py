"""Cache plug-ins (StaticCache now; ECAD, ERTACache and dKV-Cache build on the same core)."""

import accel  # noqa: F401  (registers diffusers' cache configs as plug-ins)

from .static import StaticCacheConfig

__all__ = ["StaticCacheConfig"]
