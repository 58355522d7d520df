"""Per-generation step tracking on the denoiser: which step and which CFG branch a call belongs to.

    >>> import accel, torch
    >>> from caching import StaticCacheConfig
    >>> from pipelines.tiny import build_tiny
    >>> pipe = accel.apply(build_tiny("wan"), StaticCacheConfig(interval=1))
    >>> _ = pipe("a red circle", **pipe.tiny_call_kwargs)
    >>> tracker = accel.steps.tracker_of(pipe.transformer)
    >>> tracker.num_inference_steps, tracker.calls_per_step   # Wan: split cond/uncond calls
    (4, 2)

Many pipelines never enter ``cache_context`` and never pass a step index (all PixArt pipelines, most
Flux pipelines), so a root hook on the denoiser counts the calls itself:

* a **new generation** starts when the pipeline calls ``scheduler.set_timesteps`` (every diffusers
  pipeline does, once per run; we wrap that method on the scheduler *instance*, keeping its
  signature, because the pipeline's ``__call__`` is looked up on the class), when the user calls
  :func:`accel.reset`, or when the timestep goes back up;
* a **new step** starts when the timestep differs from the previous call's (or the pipeline's
  ``step_index`` says so);
* calls with the same timestep within a step are **branches**: split cond/uncond CFG gives two per
  step, batched CFG one. Each branch gets its own cache context, named after the pipeline's
  ``cache_context`` name when there is one, ``"branch<k>"`` otherwise.

Every plug-in (caches, sparse attention, timestep adjustment) reads the step from here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _compat
from .adapters import ModelAdapter

TRACKER_HOOK = "accel_step_tracker"


@dataclass
class _TrackerState:
    """Held in a diffusers StateManager only so the pipeline's ``cache_context`` reaches us."""

    def reset(self) -> None:  # diffusers' BaseState protocol
        pass


class StepTracker(_compat.ModelHook):
    """Root hook on a denoiser. Read ``step``, ``branch``, ``context_name``, ``num_inference_steps``."""

    _is_stateful = True

    def __init__(self, adapter: ModelAdapter):
        super().__init__()
        self.adapter = adapter
        self._pipeline_ctx = _compat.StateManager(_TrackerState)
        self.listeners: list[Callable[[], None]] = []  # called at the start of every generation
        self.provide_context = False  # set while a diffusers cache needs a CacheContext
        self.scheduler = None
        self.num_inference_steps: int | None = None
        self.generation = 0
        self._clear()
        self._pending_reset = True

    def _clear(self) -> None:
        self.step = -1
        self.branch = 0
        self.calls = 0
        self.calls_per_step: int | None = None
        self.context_name = "branch0"
        self.raw_timestep: float | None = None
        self._calls_this_step = 0

    # -- generation boundaries -------------------------------------------------------------
    def request_reset(self, num_inference_steps: int | None = None) -> None:
        """Make the next call start a new generation (``accel.reset`` and the scheduler wrapper)."""
        self._pending_reset = True
        if num_inference_steps is not None:
            self.num_inference_steps = int(num_inference_steps)

    def reset_state(self, module):  # diffusers' reset_stateful_hooks
        self._pipeline_ctx.reset()
        return module

    # -- the hook ----------------------------------------------------------------------------
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        context = self._advance(args, kwargs)
        if context is None:
            return self.fn_ref.original_forward(*args, **kwargs)
        previous = _compat.pipeline_context(self._pipeline_ctx)
        _compat.set_cache_context(module, context)
        try:
            return self.fn_ref.original_forward(*args, **kwargs)
        finally:
            _compat.set_cache_context(module, previous)

    @torch.compiler.disable
    def _advance(self, args: tuple, kwargs: dict):
        t = self.adapter.timestep_from(args, kwargs)
        t = float(t.flatten()[0]) if isinstance(t, torch.Tensor) else (None if t is None else float(t))
        ctx = _compat.pipeline_context(self._pipeline_ctx)
        given_step = getattr(ctx, "step_index", None)
        went_up = t is not None and self.raw_timestep is not None and t > self.raw_timestep
        if self._pending_reset or went_up or (given_step == 0 and self.step > 0 and self._calls_this_step):
            self._start_generation()
            self.step, self.branch = 0, 0
        elif given_step is not None and int(given_step) != self.step:
            self._next_step(int(given_step))
        elif given_step is None and t != self.raw_timestep:
            self._next_step(self.step + 1)
        else:
            self.branch += 1
        self._calls_this_step = self.branch + 1
        self.calls += 1
        self.raw_timestep = t
        name = getattr(ctx, "name", None)
        self.context_name = name if name is not None else f"branch{self.branch}"
        if not self.provide_context:
            return None
        return _compat.CacheContext(
            self.context_name, step_index=self.step, num_inference_steps=self.num_inference_steps,
            timestep=self.current_timestep(), sigma=self.current_sigma(),
        )

    def _start_generation(self) -> None:
        self._clear()
        self._pending_reset = False
        self.generation += 1
        for listener in self.listeners:
            listener()

    def _next_step(self, step: int) -> None:
        if self.step == 0 and self.calls_per_step is None:
            self.calls_per_step = self._calls_this_step
        self.step, self.branch = step, 0

    # -- readers -----------------------------------------------------------------------------
    def current_timestep(self) -> float | None:
        """The timestep of the current step in scheduler units (what PAB/FasterCache compare)."""
        sched = self.scheduler
        timesteps = getattr(sched, "timesteps", None) if sched is not None else None
        if timesteps is not None and 0 <= self.step < len(timesteps):
            return float(timesteps[self.step])
        if self.raw_timestep is None:
            return None
        return self.raw_timestep * self.adapter.timestep_scale

    def current_sigma(self) -> float | None:
        """Noise level of the current step as a flow-matching sigma in [0, 1].

        Flow-matching schedulers store it; for DDPM/DDIM-type schedulers (x_t = a x_0 + s eps) the
        same mix of signal and noise is sigma = s / (a + s) with a = sqrt(alpha_bar), s = sqrt(1 - alpha_bar).
        """
        sched = self.scheduler
        sigmas = getattr(sched, "sigmas", None)
        if sigmas is not None and 0 <= self.step < len(sigmas):
            return float(sigmas[self.step])
        alphas = getattr(sched, "alphas_cumprod", None)
        t = self.current_timestep()
        if alphas is None or t is None:
            return None
        alpha_bar = float(alphas[min(max(int(round(t)), 0), len(alphas) - 1)])
        a, s = alpha_bar**0.5, (1.0 - alpha_bar) ** 0.5
        return s / (a + s)

    @property
    def is_split_cfg(self) -> bool | None:
        """True when cond and uncond come as separate calls; None until the first step has ended."""
        return None if self.calls_per_step is None else self.calls_per_step > 1

    # -- scheduler wrapper -------------------------------------------------------------------
    def attach_scheduler(self, scheduler) -> None:
        """Wrap ``scheduler.set_timesteps`` on the instance; :meth:`detach_scheduler` undoes it."""
        if self.scheduler is scheduler:
            return
        if self.scheduler is not None:
            self.detach_scheduler()
        if "set_timesteps" in vars(scheduler):
            raise RuntimeError("the scheduler's set_timesteps is already wrapped by someone else")
        original = scheduler.set_timesteps
        tracker = self

        @functools.wraps(original)  # keeps the signature: pipelines inspect it for `timesteps`/`sigmas`
        def set_timesteps(*args, **kwargs):
            out = original(*args, **kwargs)
            tracker.request_reset(getattr(scheduler, "num_inference_steps", None))
            return out

        scheduler.set_timesteps = set_timesteps
        self.scheduler = scheduler

    def detach_scheduler(self) -> None:
        if self.scheduler is not None and "set_timesteps" in vars(self.scheduler):
            del self.scheduler.set_timesteps
        self.scheduler = None


def tracker_of(model: torch.nn.Module) -> StepTracker | None:
    """The model's step tracker, if a plug-in is applied."""
    if not _compat.has_hook_registry(model):
        return None
    return model._diffusers_hook.get_hook(TRACKER_HOOK)
