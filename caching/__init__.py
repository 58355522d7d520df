"""Cache plug-ins: StaticCache and ECAD schedules (ERTACache and dKV-Cache build on the same core)."""

import accel  # noqa: F401  (registers diffusers' cache configs as plug-ins)

from .ecad import ECADConfig
from .static import StaticCacheConfig

__all__ = ["ECADConfig", "StaticCacheConfig"]
