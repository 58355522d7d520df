"""Distillation methods: each module declares ``ROLES`` (trainable roles) and ``phases(config)``."""

from . import dmd, nct, regression, sid

METHODS = {"dmd": dmd, "sid": sid, "nct": nct, "regression": regression}


def get(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown distillation method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
