"""Distillation methods: each module declares ``ROLES`` (trainable roles) and ``phases(config)``."""

from . import dmd, nct, regression, sid, tsm

METHODS = {"dmd": dmd, "sid": sid, "nct": nct, "regression": regression, "tsm": tsm}


def get(name: str):
    if name not in METHODS:
        raise ValueError(f"unknown distillation method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name]
