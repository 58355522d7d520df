"""Cache plug-ins: StaticCache, ECAD schedules, ERTACache and dKV-Cache."""

import accel  # noqa: F401  (registers diffusers' cache configs as plug-ins)

from .dkv import DKVCacheConfig
from .ecad import ECADConfig
from .ertacache import ERTACacheConfig
from .static import StaticCacheConfig

__all__ = ["DKVCacheConfig", "ECADConfig", "ERTACacheConfig", "StaticCacheConfig"]
