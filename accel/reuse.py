"""The component-output reuse hook shared by StaticCache and ECAD.

    >>> import accel
    >>> from caching import StaticCacheConfig
    >>> from pipelines.tiny import build_tiny
    >>> pipe = accel.apply(build_tiny("pixart"), StaticCacheConfig(interval=2))
    >>> _ = pipe("a red circle", **pipe.tiny_call_kwargs)
    >>> accel.stats(pipe)["component_calls"], accel.stats(pipe)["component_reused"]
    (12, 12)

One :class:`ComponentReuseHook` sits on each cacheable sub-module (PixArt ``attn1``/``attn2``/``ff``,
Wan ``attn1``/``attn2``/``ffn`` …). On a call it asks its ``decide(step, slot)`` function whether to
recompute; when told to reuse it returns the raw output stored at the last computation in the same
cache context (CFG branch), so the block re-applies the *current* step's adaLN gates and residual.
It recomputes anyway when nothing is cached yet or the input's shape changed (batch size, tokens).

Where the adapter names a norm whose output feeds only that component (PixArt ``norm1`` -> ``attn1``,
``norm2`` -> ``ff``; Wan ``norm1``/``norm2``/``norm3``), an :class:`InputSkipHook` on the norm returns
its input untouched whenever the component is about to reuse: the normalised tensor would be thrown
away, so the output is bit-identical and the reused step costs less.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _compat
from .adapters import Slot
from .steps import StepTracker

REUSE_HOOK = "accel_component_reuse"
INPUT_SKIP_HOOK = "accel_component_reuse_input"


@dataclass
class ReuseCounters:
    computed: int = 0
    reused: int = 0
    inputs_skipped: int = 0


def _shape_key(args: tuple, kwargs: dict):
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.shape
    return None


class ComponentReuseHook(_compat.ModelHook):
    """Reuse a component's output when ``decide(step, slot_index)`` returns False.

    ``decide`` must be a pure function of (step, slot): the hook also asks it about the next step
    to know whether an output must be kept.
    """

    _is_stateful = True

    def __init__(self, tracker: StepTracker, slot_index: int, decide: Callable[[int, int], bool],
                 counters: ReuseCounters):
        super().__init__()
        self.tracker = tracker
        self.slot_index = slot_index
        self.decide = decide
        self.counters = counters
        self.cache: dict[str, tuple] = {}  # context name -> (input shape, output)
        self.input_skipped = False  # set by this component's InputSkipHook for the coming call

    def will_reuse(self, shape) -> bool:
        """Whether a call now, with a first input tensor of ``shape``, returns the cached output."""
        entry = self.cache.get(self.tracker.context_name)
        return entry is not None and entry[0] == shape and not self._plan(True)[0]

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        key = self.tracker.context_name
        entry = self.cache.get(key)
        shape = _shape_key(args, kwargs)
        compute, keep = self._plan(entry is not None and entry[0] == shape)
        skipped, self.input_skipped = self.input_skipped, False
        if not compute:
            self.counters.reused += 1
            return entry[1]
        if skipped:
            raise RuntimeError(f"{type(module).__name__}: its input norm was skipped for a reuse, but the call "
                               f"must compute (input shape {tuple(shape or ())}); this is a bug in the adapter's "
                               f"input_norms")
        output = self.fn_ref.original_forward(*args, **kwargs)
        if keep:
            self.cache[key] = (shape, output)
        elif entry is not None:
            del self.cache[key]
        self.counters.computed += 1
        return output

    @torch.compiler.disable
    def _plan(self, have_entry: bool) -> tuple[bool, bool]:
        """(compute now?, keep the output?). An output is kept only when the next step reuses it:
        holding tensors nobody will read costs memory and, on CPU, real time in the allocator."""
        step = self.tracker.step
        if have_entry and not self.decide(step, self.slot_index):
            return False, True
        last = self.tracker.num_inference_steps
        keep = last is None or step + 1 < last and not self.decide(step + 1, self.slot_index)
        return True, keep

    def reset_state(self, module):
        self.cache.clear()
        self.input_skipped = False
        return module


class InputSkipHook(_compat.ModelHook):
    """On a norm that feeds only one component: hand back the input unnormalised when that
    component is about to reuse its cached output (the norm's result would be discarded)."""

    def __init__(self, consumer: ComponentReuseHook):
        super().__init__()
        self.consumer = consumer

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        if isinstance(x, torch.Tensor) and self.consumer.will_reuse(x.shape):
            self.consumer.input_skipped = True
            self.consumer.counters.inputs_skipped += 1
            return x
        return self.fn_ref.original_forward(*args, **kwargs)


class ReuseInstaller:
    """Installs one :class:`ComponentReuseHook` per slot (and an :class:`InputSkipHook` on the slot's
    input norm, if it has one); ``remove()`` takes them all off again."""

    skip_input_norms = True  # class switch, for tests that compare with and without

    def __init__(self, tracker: StepTracker, slots: list[Slot], decide: Callable[[int, int], bool]):
        self.counters = ReuseCounters()
        self.hooks: list[tuple[torch.nn.Module, ComponentReuseHook]] = []
        self.norms: list[torch.nn.Module] = []
        try:
            for index, slot in enumerate(slots):
                hook = ComponentReuseHook(tracker, index, decide, self.counters)
                _compat.registry_of(slot.module).register_hook(hook, REUSE_HOOK)
                self.hooks.append((slot.module, hook))
                if slot.input_norm is not None and self.skip_input_norms:
                    _compat.registry_of(slot.input_norm).register_hook(InputSkipHook(hook), INPUT_SKIP_HOOK)
                    self.norms.append(slot.input_norm)
        except Exception:
            self.remove()
            raise
        tracker.listeners.append(self.reset)
        self._tracker = tracker

    def reset(self) -> None:
        """Start of a generation: drop cached outputs; counters then describe this generation."""
        self.counters.computed = self.counters.reused = self.counters.inputs_skipped = 0
        for _, hook in self.hooks:
            hook.cache.clear()
            hook.input_skipped = False

    def remove(self) -> None:
        for module, _ in self.hooks:
            _compat.remove_hook(module, REUSE_HOOK)
        for module in self.norms:
            _compat.remove_hook(module, INPUT_SKIP_HOOK)
        self.hooks.clear()
        self.norms.clear()
        tracker = getattr(self, "_tracker", None)
        if tracker is not None and self.reset in tracker.listeners:
            tracker.listeners.remove(self.reset)

    def stats(self) -> dict:
        return {"component_calls": self.counters.computed, "component_reused": self.counters.reused,
                "input_norms_skipped": self.counters.inputs_skipped}
