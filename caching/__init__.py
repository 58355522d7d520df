"""Cache plug-ins: StaticCache, ECAD schedules and ERTACache (dKV-Cache builds on the same core)."""

import accel  # noqa: F401  (registers diffusers' cache configs as plug-ins)

from .ecad import ECADConfig
from .ertacache import ERTACacheConfig
from .static import StaticCacheConfig

__all__ = ["ECADConfig", "ERTACacheConfig", "StaticCacheConfig"]
