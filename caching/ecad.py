"""ECAD: a per-model cache schedule over (step x block x component), found by NSGA-II search.

    >>> import accel
    >>> from caching import ECADConfig
    >>> from pipelines.tiny import build_tiny
    >>> pipe = build_tiny("pixart")
    >>> steps = pipe.tiny_call_kwargs["num_inference_steps"]
    >>> schedule = ECADConfig.every_n(pipe, steps, n=2)          # FORA-like seed: recompute every 2nd step
    >>> schedule.save("/tmp/every2.json")
    >>> pipe = accel.apply(pipe, ECADConfig.load("/tmp/every2.json"))
    >>> _ = pipe("a red circle", **pipe.tiny_call_kwargs)
    >>> accel.remove(pipe)

A schedule is a bit matrix ``S[n, slot]``: 1 = recompute that component at denoiser step ``n``,
0 = reuse its output from the last step that computed it. A slot is one (block, component) pair
named like ``transformer_blocks.3.attn1``, in the adapter's flatten order (step-major, then blocks
in model order, then components). The cached value is the component's raw output, before the
block's adaLN gate and residual, so the block applies the *current* step's gate to it; norms and
modulation always run. Row 0 always computes (nothing is cached yet), whatever its bits say.

Files are validated JSON (``format: "ecad-schedule"``) that record the model class, step count,
slot layout, resolution, scheduler and how the schedule was made. A schedule made for N steps
run with M != N steps is refused unless ``step_mismatch="nearest"``, which maps row m to row
round(m (N-1) / (M-1)) (halves round up). The bits do not depend on resolution, so one schedule serves every size.
:meth:`ECADConfig.from_published` reads the per-step JSON layout the ECAD authors publish.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from accel.adapters import ModelAdapter, get_adapter
from accel.api import register_plugin
from accel.config import PluginConfig, check_int, read_json
from accel.errors import ConfigError
from accel.reuse import ReuseInstaller

STEP_MISMATCH = ("refuse", "nearest")
# the ECAD authors' FLUX files name components by block kind
_PUBLISHED_FLUX = {
    "full_attn": "attn", "full_ff": "ff", "full_ff_context": "ff_context",
    "single_attn": "attn", "single_proj_mlp": "proj_mlp", "single_proj_out": "proj_out",
}


def _denoiser(target) -> torch.nn.Module:
    if isinstance(target, torch.nn.Module):
        return target
    model = getattr(target, "transformer", None)
    if not isinstance(model, torch.nn.Module):
        raise ConfigError(f"expected a diffusers pipeline with a transformer or the model, got {type(target).__name__}")
    return model


def slot_names(target) -> list[str]:
    """The cacheable slots of a pipeline's denoiser (or the model), in schedule order."""
    model = _denoiser(target)
    return [slot.name for slot in get_adapter(model).slots(model)]


@dataclass
class ECADConfig(PluginConfig):
    """A cache schedule for one denoiser class and step count.

    Args:
        model_class: class name of the denoiser the schedule was made for.
        num_steps: number of denoiser steps (rows).
        slots: slot names (``"transformer_blocks.0.attn1"`` …) in flatten order (columns).
        schedule: one string per step, one ``'1'`` (recompute) or ``'0'`` (reuse) per slot.
        resolution: ``[height, width]`` in pixels the schedule was searched at (informational: the
            schedule applies at any resolution).
        scheduler: scheduler class name of the search run (informational).
        provenance: how it was made (search settings, generation, measured objectives …).
        step_mismatch: ``"refuse"`` (default) raises when the pipeline runs another step count;
            ``"nearest"`` resamples the rows.
    """

    model_class: str = ""
    num_steps: int = 0
    slots: list[str] = field(default_factory=list)
    schedule: list[str] = field(default_factory=list)
    resolution: list[int] | None = None
    scheduler: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)
    step_mismatch: str = "refuse"

    format_name = "ecad-schedule"

    def __post_init__(self):
        if not isinstance(self.model_class, str) or not self.model_class:
            raise ConfigError(f"model_class must name the denoiser class, got {self.model_class!r}")
        check_int("num_steps", self.num_steps, 1)
        slots_ok = isinstance(self.slots, (list, tuple)) and all(isinstance(s, str) for s in self.slots)
        if not slots_ok or not self.slots:
            raise ConfigError(f"slots must be a non-empty list of slot names, got {self.slots!r}")
        self.slots = list(self.slots)
        if len(set(self.slots)) != len(self.slots):
            raise ConfigError("slots: names must be unique")
        if not isinstance(self.schedule, (list, tuple)) or len(self.schedule) != self.num_steps:
            got = len(self.schedule) if isinstance(self.schedule, (list, tuple)) else type(self.schedule).__name__
            raise ConfigError(f"schedule must hold num_steps={self.num_steps} rows, got {got}")
        self.schedule = list(self.schedule)
        for n, row in enumerate(self.schedule):
            if not isinstance(row, str) or len(row) != len(self.slots) or set(row) - {"0", "1"}:
                raise ConfigError(
                    f"schedule row {n} must be a string of {len(self.slots)} '0'/'1' characters "
                    f"(one per slot), got {row!r:.60}"
                )
        if self.resolution is not None:
            res = self.resolution
            if not isinstance(res, (list, tuple)) or len(res) != 2 or not all(
                    isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in res):
                raise ConfigError(f"resolution must be [height, width] in pixels or null, got {res!r}")
            self.resolution = list(res)
        if self.scheduler is not None and not isinstance(self.scheduler, str):
            raise ConfigError(f"scheduler must be a class name or null, got {self.scheduler!r}")
        if not isinstance(self.provenance, dict):
            raise ConfigError(f"provenance must be a JSON object, got {type(self.provenance).__name__}")
        if self.step_mismatch not in STEP_MISMATCH:
            raise ConfigError(f"step_mismatch must be one of {STEP_MISMATCH}, got {self.step_mismatch!r}")

    def __repr__(self) -> str:
        bits = self.bits()
        return (f"ECADConfig({self.model_class}, {self.num_steps} steps x {len(self.slots)} slots, "
                f"{bits.mean():.0%} recompute, step_mismatch={self.step_mismatch!r})")

    # -- the bit matrix ------------------------------------------------------------------------
    def bits(self) -> np.ndarray:
        """The schedule as a ``(num_steps, num_slots)`` bool array (True = recompute)."""
        return np.array([[c == "1" for c in row] for row in self.schedule], dtype=bool)

    def effective_bits(self) -> np.ndarray:
        """What actually runs: :meth:`bits` with row 0 forced to compute."""
        bits = self.bits()
        bits[0] = True
        return bits

    @classmethod
    def from_bits(cls, target, bits, **fields) -> ECADConfig:
        """A schedule for ``target`` (pipeline or denoiser) from a ``(steps, slots)`` bit array."""
        model = _denoiser(target)
        slots = slot_names(model)
        bits = np.asarray(bits, dtype=bool)
        if bits.ndim != 2 or bits.shape[1] != len(slots):
            raise ConfigError(f"bits must have shape (steps, {len(slots)}) for {type(model).__name__}, "
                              f"got {tuple(bits.shape)}")
        fields.setdefault("scheduler", _scheduler_name(target))
        rows = ["".join("1" if b else "0" for b in row) for row in bits]
        return cls(model_class=type(model).__name__, num_steps=len(rows), slots=slots, schedule=rows, **fields)

    @classmethod
    def all_recompute(cls, target, num_steps: int, **fields) -> ECADConfig:
        """The do-nothing schedule: every component computes at every step (bit-identical output)."""
        return cls.from_bits(target, np.ones((num_steps, len(slot_names(target))), bool), **fields)

    @classmethod
    def every_n(cls, target, num_steps: int, n: int, warmup: int = 0,
                components: tuple[str, ...] | None = None, **fields) -> ECADConfig:
        """FORA-like: all (or the named) components recompute every ``n``-th step after ``warmup``."""
        check_int("n", n, 1)
        slots = slot_names(target)
        rows = np.array([s < warmup or (s - warmup) % n == 0 for s in range(num_steps)])
        cached = np.array([components is None or name.rsplit(".", 1)[1] in components for name in slots])
        bits = rows[:, None] | ~cached[None, :]
        fields.setdefault("provenance", {"made_by": f"every_n(n={n}, warmup={warmup}, components={components})"})
        return cls.from_bits(target, bits, **fields)

    def rows_for(self, num_steps: int) -> np.ndarray:
        """Effective bits for a run of ``num_steps`` steps (resampled or refused, see the class doc)."""
        if num_steps == self.num_steps:
            return self.effective_bits()
        if self.step_mismatch == "refuse":
            raise ConfigError(
                f"this ECAD schedule was made for num_steps={self.num_steps} but the pipeline runs "
                f"{num_steps} steps; call with num_inference_steps={self.num_steps}, or load the schedule "
                f"with step_mismatch='nearest' to resample it (reuse distances then change)"
            )
        source = self.effective_bits()
        if num_steps == 1:
            return source[:1].copy()
        index = [int(np.floor(m * (self.num_steps - 1) / (num_steps - 1) + 0.5)) for m in range(num_steps)]  # half up
        out = source[index]
        out[0] = True
        return out

    def with_steps(self, num_steps: int) -> ECADConfig:
        """A copy resampled to ``num_steps`` rows by the nearest rule (a warm start for re-searching)."""
        import dataclasses

        nearest = dataclasses.replace(self, step_mismatch="nearest")
        bits = nearest.rows_for(num_steps)
        rows = ["".join("1" if b else "0" for b in row) for row in bits]
        prov = dict(self.provenance, resampled_from=self.num_steps)
        return dataclasses.replace(self, num_steps=num_steps, schedule=rows, provenance=prov)

    # -- counting --------------------------------------------------------------------------------
    def computations(self) -> dict[str, int]:
        """Component computations per generation and CFG branch, by component name:
        sum over steps of max(S[n, slot], [n == 0])."""
        bits = self.effective_bits()
        out: dict[str, int] = {}
        for j, name in enumerate(self.slots):
            component = name.rsplit(".", 1)[1]
            out[component] = out.get(component, 0) + int(bits[:, j].sum())
        return out

    def macs(self, costs: dict) -> float:
        """Analytic cost: ``N * base + sum_n sum_slot max(S, [n=0]) * cost[slot]``.

        ``costs`` holds ``base`` and a ``slots`` mapping of slot name (or bare component name) to
        MACs, as measured by :func:`caching.ecad_search.measure_costs`.
        """
        per = costs["slots"]
        col = np.array([per[name] if name in per else per[name.rsplit(".", 1)[1]] for name in self.slots], float)
        return float(self.num_steps * costs["base"] + (self.effective_bits() * col[None, :]).sum())

    # -- picking from a frontier -----------------------------------------------------------------
    @classmethod
    def pick(cls, frontier_dir: str | os.PathLike, target_speedup: float | None = None,
             min_psnr: float | None = None, quality: str = "psnr", speed: str = "speedup") -> ECADConfig:
        """Choose a schedule from a search's frontier directory.

        ``target_speedup``: the best-quality schedule whose ``provenance[speed]`` reaches it.
        ``min_psnr``: the fastest schedule whose ``provenance[quality]`` reaches it.
        """
        if (target_speedup is None) == (min_psnr is None):
            raise ConfigError("pick needs exactly one of target_speedup=... or min_psnr=...")
        files = sorted(Path(frontier_dir).glob("*.json"))
        candidates = []
        for path in files:
            try:
                cfg = cls.load(path)
            except ConfigError:
                continue  # the frontier table and other JSON beside the schedules
            prov = cfg.provenance
            if quality in prov and speed in prov:
                candidates.append((float(prov[speed]), float(prov[quality]), path.name, cfg))
        if not candidates:
            raise ConfigError(f"{frontier_dir}: no ECAD schedules with {speed!r} and {quality!r} in their provenance")
        if target_speedup is not None:
            ok = [c for c in candidates if c[0] >= target_speedup]
            if not ok:
                best = max(c[0] for c in candidates)
                raise ConfigError(
                    f"no schedule in {frontier_dir} reaches {speed} {target_speedup}; the fastest has {best:.3g}")
            return max(ok, key=lambda c: (c[1], c[0]))[3]
        ok = [c for c in candidates if c[1] >= min_psnr]
        if not ok:
            best = max(c[1] for c in candidates)
            raise ConfigError(f"no schedule in {frontier_dir} reaches {quality} {min_psnr}; the best has {best:.3g}")
        return max(ok, key=lambda c: (c[0], c[1]))[3]

    # -- the ECAD authors' files -------------------------------------------------------------------
    @classmethod
    def from_published(cls, path: str | os.PathLike, target, step_mismatch: str = "refuse") -> ECADConfig:
        """Read a schedule in the layout the ECAD authors publish (``cache_schedule.schedule`` maps
        ``"000"`` -> block (``"0"``, or ``"single_0"`` for FLUX) -> component -> bool) for ``target``."""
        path = Path(path)
        data = read_json(path)
        body = data.get("cache_schedule", data) if isinstance(data, dict) else None
        table = body.get("schedule") if isinstance(body, dict) else None
        if not isinstance(table, dict) or not table:
            raise ConfigError(f"{path}: expected a 'cache_schedule' object with a 'schedule' mapping of steps")
        model = _denoiser(target)
        adapter = get_adapter(model)
        slots = slot_names(model)
        index = {name: j for j, name in enumerate(slots)}
        steps = sorted(table, key=lambda k: int(k))
        if [int(k) for k in steps] != list(range(len(steps))):
            raise ConfigError(f"{path}: steps must be numbered 0..N-1, got {steps[:5]}...")
        bits = np.ones((len(steps), len(slots)), bool)
        seen = np.zeros_like(bits)
        for n, key in enumerate(steps):
            for block, comps in table[key].items():
                group, b = _published_block(adapter, block, path)
                for comp, value in comps.items():
                    name = f"{group}.{b}.{_PUBLISHED_FLUX.get(comp, comp)}"
                    if name not in index or not isinstance(value, bool):
                        raise ConfigError(f"{path}: step {key} block {block!r} component {comp!r} does not fit "
                                          f"{type(model).__name__} with {len(slots)} slots")
                    bits[n, index[name]] = value
                    seen[n, index[name]] = True
        if not seen.all():
            missing = slots[int(np.argwhere(~seen)[0][1])]
            raise ConfigError(f"{path}: the file has no entry for slot {missing} of {type(model).__name__} "
                              f"(block count or model class differ)")
        prov = {"made_by": "ECAD authors' published schedule", "source": path.name}
        for key in ("name", "attributes"):
            if key in body:
                prov[key] = body[key]
        return cls.from_bits(model, bits, provenance=prov, step_mismatch=step_mismatch, scheduler=None)


def _published_block(adapter: ModelAdapter, block: str, path) -> tuple[str, int]:
    groups = [g.attr for g in adapter.groups]
    kind, _, number = block.rpartition("_")
    try:
        b = int(number)
    except ValueError:
        raise ConfigError(f"{path}: block key {block!r} is not '<n>' or 'single_<n>'") from None
    if kind == "" and groups:
        return groups[0], b
    if kind == "single" and "single_transformer_blocks" in groups:
        return "single_transformer_blocks", b
    raise ConfigError(f"{path}: block key {block!r} does not fit block lists {groups}")


def _scheduler_name(target) -> str | None:
    scheduler = getattr(target, "scheduler", None)
    return None if scheduler is None else type(scheduler).__name__


class _ECADHandle:
    """The installed schedule: a :class:`ReuseInstaller` whose decisions read the (resampled) rows."""

    def __init__(self, tracker, slots, config: ECADConfig):
        self.config = config
        self.tracker = tracker
        self.rows = config.effective_bits()
        self.warned = False
        self.installer = ReuseInstaller(tracker, slots, self.decide)
        tracker.listeners.insert(0, self.start)

    def start(self) -> None:
        """Start of a generation: pick the rows for this run's step count (or refuse it)."""
        steps = self.tracker.num_inference_steps
        if steps is None or steps == self.config.num_steps:
            self.rows = self.config.effective_bits()
            return
        self.rows = self.config.rows_for(steps)
        if not self.warned:
            warnings.warn(f"ECAD schedule for {self.config.num_steps} steps resampled to {steps} steps "
                          f"(nearest rows); reuse distances change, consider re-searching", stacklevel=2)
            self.warned = True

    def decide(self, step: int, slot: int) -> bool:
        if step >= len(self.rows):
            raise ConfigError(f"the denoiser was called for step {step + 1} but the ECAD schedule has "
                              f"{len(self.rows)} rows; set num_inference_steps or call accel.reset(model, N)")
        return bool(self.rows[step, slot])

    def remove(self) -> None:
        self.installer.remove()
        if self.start in self.tracker.listeners:
            self.tracker.listeners.remove(self.start)

    def stats(self) -> dict:
        return self.installer.stats()


@register_plugin(ECADConfig)
def _install(model, config: ECADConfig, tracker, adapter: ModelAdapter):
    name = type(model).__name__
    if config.model_class != name:
        raise ConfigError(
            f"model_class: this ECAD schedule is for {config.model_class}, the pipeline's denoiser is {name}")
    slots = adapter.slots(model)
    names = [s.name for s in slots]
    if names != config.slots:
        def blocks(slot_list):
            return len({n.rsplit(".", 1)[0] for n in slot_list})

        first = next(i for i, (a, b) in enumerate(zip(config.slots + [""], names + [""])) if a != b)
        raise ConfigError(
            f"slots: the schedule has {len(config.slots)} slots over {blocks(config.slots)} blocks but this "
            f"{name} has {len(names)} slots over {blocks(names)} blocks (they differ from slot {first}: "
            f"{(config.slots + ['<none>'])[first]!r} vs {(names + ['<none>'])[first]!r})"
        )
    for block_name, block in adapter.blocks(model):
        if getattr(block, "_chunk_size", None):
            raise ConfigError(f"{block_name} uses chunked feed-forward (set_chunk_feed_forward), which calls ff once "
                              f"per chunk; disable it before applying ECAD")
    return _ECADHandle(tracker, slots, config)
