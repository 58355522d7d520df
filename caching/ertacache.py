"""ERTACache: a static residual-reuse mask, closed-form residual rectification and a per-step
integration-interval coefficient, all read from an offline profile.

    >>> import accel
    >>> from caching import ERTACacheConfig
    >>> from caching.ertacache_profile import make_profile
    >>> from pipelines.tiny import build_tiny
    >>> pipe = build_tiny("pixart")
    >>> profile = make_profile(pipe, ["a red circle", "a blue square"], pipe.tiny_call_kwargs,
    ...                        target_speedup=1.5, progress=False)
    >>> profile.save("/tmp/erta.json")
    >>> pipe = accel.apply(pipe, ERTACacheConfig.load("/tmp/erta.json"))
    >>> _ = pipe("a red circle", **pipe.tiny_call_kwargs)
    >>> accel.remove(pipe)

Notation (spec ``shared/specs/ertacache.md``): u_i is the first block's image-stream input at step
i, r_i = (last block's image-stream output) - u_i the block-stack residual. The mask marks each step
C (compute) or R (reuse). On an R step every block is skipped and the last one returns
``u_i + (1 + K_i) * r_k + b_i`` (rectification, per hidden channel, in fp32), where k is the last C
step; embeddings and the head always run at the current step. After an R step the sampler's update
is ``x_{i+1} = x_i + phi_i * (its stock increment)``: exact for flow-matching Euler (the increment is
h_i v_i) and for DDIM with ``clip_sample=False`` (Euler in x/alpha, sigma/alpha coordinates, the
increment is alpha_{i+1} (s_{i+1} - s_i) eps). Multistep solvers are refused unless
``approximate_multistep=True``, which scales the model output by phi instead.

``rectify=False`` and ``adjust_timesteps=False`` switch the two corrections off (an ablation is
three configs); the mask itself is the method's base.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Any

import torch

from accel import _compat
from accel.adapters import ModelAdapter
from accel.api import register_plugin
from accel.config import PluginConfig, check_int
from accel.errors import ConfigError

BLOCK_HOOK = "accel_ertacache_block"
EXACT_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "DDIMScheduler")
# scheduler config keys that change the sigma grid or the update rule
SCHEDULER_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type",
                  "timestep_spacing", "rescale_betas_zero_snr", "set_alpha_to_one", "steps_offset", "shift",
                  "use_dynamic_shifting", "base_shift", "max_shift", "invert_sigmas", "shift_terminal",
                  "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "time_shift_type",
                  "clip_sample", "thresholding", "stochastic_sampling")


def scheduler_signature(scheduler) -> dict[str, Any]:
    """The scheduler config entries a profile depends on (JSON-able)."""
    config = dict(scheduler.config)
    return {k: config[k] for k in SCHEDULER_KEYS if k in config and isinstance(config[k], (int, float, str, bool))}


@dataclass
class ERTACacheConfig(PluginConfig):
    """An ERTACache profile (made by :func:`caching.ertacache_profile.make_profile`) and switches.

    Args:
        model_class / scheduler_class / scheduler_config: what the profile was made on; applying it
            elsewhere is refused.
        num_steps: denoising steps; ``timesteps``: the profiled timestep grid (checked each run;
            empty = unchecked).
        latent_shape: the image-stream token count and hidden size ``[tokens, D]`` the profile saw.
        mask: one character per step, ``"C"`` compute or ``"R"`` reuse; step 0 must be ``"C"``.
        K / b: per cache context (``"branch0"``, or ``"cond"``/``"uncond"`` for split CFG), a
            ``num_steps x D`` table of rectification gains and offsets (zero on C steps).
        phi: per-step interval coefficient (1 on C steps).
        rectify / adjust_timesteps: switch the two corrections on or off.
        approximate_multistep: allow phi on multistep schedulers by scaling the model output.
        force_resolution: allow a different token count than profiled (K and b are per channel).
        calibration: how the profile was made (prompts, seeds, threshold, target).
    """

    model_class: str = ""
    scheduler_class: str = ""
    scheduler_config: dict[str, Any] = field(default_factory=dict)
    num_steps: int = 0
    timesteps: list[float] = field(default_factory=list)
    latent_shape: list[int] | None = None
    mask: str = ""
    K: dict[str, list[list[float]]] = field(default_factory=dict)
    b: dict[str, list[list[float]]] = field(default_factory=dict)
    phi: list[float] = field(default_factory=list)
    rectify: bool = True
    adjust_timesteps: bool = True
    approximate_multistep: bool = False
    force_resolution: bool = False
    calibration: dict[str, Any] = field(default_factory=dict)

    format_name = "ertacache-profile"

    def __post_init__(self):
        for name in ("model_class", "scheduler_class"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ConfigError(f"{name} must name a class, got {getattr(self, name)!r}")
        check_int("num_steps", self.num_steps, 1)
        n = self.num_steps
        if not isinstance(self.mask, str) or len(self.mask) != n or set(self.mask) - {"C", "R"}:
            raise ConfigError(f"mask must be {n} characters of 'C'/'R' (one per step), got {self.mask!r:.60}")
        if self.mask[0] != "C":
            raise ConfigError("mask: step 0 must compute ('C'): nothing is cached before it")
        if not isinstance(self.timesteps, list) or len(self.timesteps) not in (0, n):
            raise ConfigError(f"timesteps must list the {n} profiled timesteps (or be empty: unchecked)")
        if not isinstance(self.phi, list) or len(self.phi) != n or not all(
                isinstance(p, (int, float)) and 0 < p < 10 for p in self.phi):
            raise ConfigError(f"phi must hold {n} positive numbers (1 on compute steps)")
        if not isinstance(self.K, dict) or not isinstance(self.b, dict) or set(self.K) != set(self.b) or not self.K:
            raise ConfigError("K and b must map the same cache contexts (e.g. 'branch0') to tables")
        dims = set()
        for table_name in ("K", "b"):
            for ctx, table in getattr(self, table_name).items():
                if not isinstance(table, list) or len(table) != n or not all(isinstance(r, list) for r in table):
                    raise ConfigError(f"{table_name}[{ctx!r}] must be a {n} x D table")
                dims |= {len(r) for r in table}
        if len(dims) != 1:
            raise ConfigError(f"K and b rows must all have the hidden size D, got lengths {sorted(dims)}")
        if self.latent_shape is not None and (not isinstance(self.latent_shape, list) or len(self.latent_shape) != 2):
            raise ConfigError(f"latent_shape must be [tokens, D] or null, got {self.latent_shape!r}")
        for flag in ("rectify", "adjust_timesteps", "approximate_multistep", "force_resolution"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"{flag} must be true or false")

    def __repr__(self) -> str:
        return (f"ERTACacheConfig({self.model_class}, {self.num_steps} steps, mask {self.mask}, "
                f"rectify={self.rectify}, adjust_timesteps={self.adjust_timesteps})")

    @property
    def reuse_fraction(self) -> float:
        return self.mask.count("R") / self.num_steps

    def variant(self, **switches) -> ERTACacheConfig:
        """A copy with some switches changed (``rectify=False`` …): one ablation row."""
        import dataclasses

        return dataclasses.replace(self, **switches)


# -- runtime ------------------------------------------------------------------------------------
def _arg_getter(block: torch.nn.Module, name: str):
    params = list(inspect.signature(type(block).forward).parameters)[1:]
    index = params.index(name) if name in params else None

    def get(args, kwargs):
        if name in kwargs:
            return kwargs[name]
        return args[index] if index is not None and index < len(args) else None

    return get


class _State:
    """What the block hooks and the scheduler wrapper share during one generation."""

    def __init__(self, config: ERTACacheConfig, tracker, on_adjust=None):
        self.config = config
        self.tracker = tracker
        self.mask = config.mask
        self.phi = list(config.phi)
        self.K = {c: torch.tensor(t, dtype=torch.float32) for c, t in config.K.items()}
        self.b = {c: torch.tensor(t, dtype=torch.float32) for c, t in config.b.items()}
        self.on_adjust = on_adjust  # profiler hook: (step, sample, prev, increment) -> phi
        self.record = None  # profiler hook: (step, context, u, r) on compute steps
        self.force_compute = False
        self.reset()

    def reset(self) -> None:
        self.residual: dict[str, torch.Tensor] = {}
        self.u: torch.Tensor | None = None
        self.reuse_now = False
        self.reused_steps: dict[int, set[str]] = {}
        self.computed = 0
        self.reused = 0

    def tables(self, context: str) -> tuple[torch.Tensor, torch.Tensor]:
        if context in self.K:
            return self.K[context], self.b[context]
        if len(self.K) == 1:  # a profile of batched CFG serves any single context
            only = next(iter(self.K))
            return self.K[only], self.b[only]
        raise ConfigError(f"the profile has rectification tables for contexts {sorted(self.K)}, "
                          f"not for {context!r}; re-profile with this pipeline's CFG mode")

    @torch.compiler.disable
    def begin(self, hidden: torch.Tensor) -> None:
        step, ctx = self.tracker.step, self.tracker.context_name
        cached = self.residual.get(ctx)
        self.u = hidden
        self.reuse_now = (not self.force_compute and step < len(self.mask) and self.mask[step] == "R"
                          and cached is not None and cached.shape == hidden.shape)
        if self.reuse_now:
            self.reused += 1
            self.reused_steps.setdefault(step, set()).add(ctx)
        else:
            self.computed += 1

    @torch.compiler.disable
    def rectified(self) -> torch.Tensor:
        ctx = self.tracker.context_name
        r = self.residual[ctx]
        if self.config.rectify:
            K, b = self.tables(ctx)
            step = self.tracker.step
            r = ((1.0 + K[step].to(r.device)) * r.float() + b[step].to(r.device)).to(r.dtype)
        return self.u + r

    @torch.compiler.disable
    def end(self, out_hidden: torch.Tensor) -> None:
        ctx = self.tracker.context_name
        r = out_hidden - self.u
        self.residual[ctx] = r
        if self.record is not None:
            self.record(self.tracker.step, ctx, self.u, r)

    def step_reused(self, step: int) -> bool:
        return step in self.reused_steps


class _BlockHook(_compat.ModelHook):
    def __init__(self, state: _State, block: torch.nn.Module, first: bool, last: bool,
                 hidden_index: int | None, encoder_index: int | None):
        super().__init__()
        self.state, self.first, self.last = state, first, last
        self.hidden_index, self.encoder_index = hidden_index, encoder_index
        self.get_hidden = _arg_getter(block, "hidden_states")
        self.get_encoder = _arg_getter(block, "encoder_hidden_states")

    def _pack(self, hidden, encoder):
        if self.encoder_index is None:  # the block returns the image stream alone
            return hidden
        out = [None, None]
        out[self.hidden_index] = hidden
        out[self.encoder_index] = encoder
        return tuple(out)

    def _hidden_of(self, out):
        return out if self.encoder_index is None else out[self.hidden_index]

    def new_forward(self, module, *args, **kwargs):
        state = self.state
        hidden = self.get_hidden(args, kwargs)
        if self.first:
            state.begin(hidden)
        if state.reuse_now:
            if self.last:
                hidden = state.rectified()
            return self._pack(hidden, self.get_encoder(args, kwargs))
        out = self.fn_ref.original_forward(*args, **kwargs)
        if self.last:
            state.end(self._hidden_of(out))
        return out


def _ddim_increment(scheduler, model_output, timestep, sample) -> torch.Tensor:
    """alpha_prev * (s_prev - s_t) * eps for one DDIM step (s = sigma / alpha)."""
    t = int(timestep)
    prev_t = t - scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    ac = scheduler.alphas_cumprod.to(torch.float64)
    a_t = float(ac[t])
    a_prev = float(ac[prev_t]) if prev_t >= 0 else float(scheduler.final_alpha_cumprod)
    alpha_t, beta_t = a_t**0.5, (1 - a_t) ** 0.5
    alpha_p, beta_p = a_prev**0.5, (1 - a_prev) ** 0.5
    mo, x = model_output.float(), sample.float()
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        eps = mo
    elif kind == "v_prediction":
        eps = alpha_t * mo + beta_t * x
    elif kind == "sample":
        eps = (x - alpha_t * mo) / beta_t
    else:
        raise ConfigError(f"DDIM prediction_type {kind!r} is not supported by ERTACache's interval rule")
    if alpha_t == 0.0:
        raise ConfigError("cannot rescale the interval of a step at alpha_t = 0 (a zero-SNR first step)")
    return alpha_p * (beta_p / alpha_p - beta_t / alpha_t) * eps


class _SchedulerWrapper:
    """Wraps ``scheduler.step`` on the instance to scale the update of reused steps by phi."""

    def __init__(self, scheduler, state: _State, approximate: bool):
        if "step" in vars(scheduler):
            raise ConfigError("the scheduler's step is already wrapped by someone else")
        self.scheduler, self.state = scheduler, state
        self.kind = type(scheduler).__name__
        self.approximate = approximate and self.kind not in EXACT_SCHEDULERS
        original = scheduler.step

        @functools.wraps(original)
        def step(model_output, timestep, sample, *args, **kwargs):
            return self._step(original, model_output, timestep, sample, *args, **kwargs)

        scheduler.step = step

    def _step(self, original, model_output, timestep, sample, *args, **kwargs):
        state = self.state
        i = state.tracker.step
        phi = state.phi[i] if 0 <= i < len(state.phi) else 1.0
        active = state.config.adjust_timesteps and state.step_reused(i)
        if not active or (phi == 1.0 and state.on_adjust is None):
            return original(model_output, timestep, sample, *args, **kwargs)  # phi = 1: untouched
        if self.approximate:
            return original(model_output * phi, timestep, sample, *args, **kwargs)
        out = original(model_output, timestep, sample, *args, **kwargs)
        prev = out[0] if isinstance(out, tuple) else out.prev_sample
        if self.kind == "DDIMScheduler":
            if kwargs.get("eta", args[0] if args else 0.0):
                raise ConfigError("ERTACache's DDIM interval rule needs eta = 0")
            increment = _ddim_increment(self.scheduler, model_output, timestep, sample)
        else:  # flow-matching Euler: prev = sample + h * v
            increment = prev.float() - sample.float()
        if state.on_adjust is not None:
            phi = state.on_adjust(i, sample, prev, increment)
        new = (prev.float() + (phi - 1.0) * increment).to(prev.dtype)
        if isinstance(out, tuple):
            return (new, *out[1:])
        out.prev_sample = new
        return out

    def remove(self) -> None:
        if "step" in vars(self.scheduler):
            del self.scheduler.step


class _ERTAHandle:
    def __init__(self, model, config: ERTACacheConfig, tracker, adapter: ModelAdapter, scheduler):
        self.model, self.config, self.tracker = model, config, tracker
        self.state = _State(config, tracker)
        self.modules: list[torch.nn.Module] = []
        self.wrapper = None
        blocks = []
        for group in adapter.groups:
            for block in getattr(model, group.attr):
                blocks.append((block, group))
        try:
            for i, (block, group) in enumerate(blocks):
                hook = _BlockHook(self.state, block, i == 0, i == len(blocks) - 1,
                                  group.hidden_states_index, group.encoder_hidden_states_index)
                _compat.registry_of(block).register_hook(hook, BLOCK_HOOK)
                self.modules.append(block)
            if scheduler is not None and config.adjust_timesteps and any(p != 1.0 for p in config.phi):
                self.wrapper = _SchedulerWrapper(scheduler, self.state, config.approximate_multistep)
        except Exception:
            self.remove()
            raise
        tracker.listeners.insert(0, self.start)

    def start(self) -> None:
        steps = self.tracker.num_inference_steps
        if steps is not None and steps != self.config.num_steps:
            raise ConfigError(f"this ERTACache profile was made for num_steps={self.config.num_steps} but the "
                              f"pipeline runs {steps} steps; profile again for {steps} steps")
        sched = self.tracker.scheduler
        timesteps = getattr(sched, "timesteps", None)
        if timesteps is not None and self.config.timesteps and len(timesteps) == self.config.num_steps:
            grid = [float(t) for t in timesteps]
            if any(abs(a - b) > 1e-3 * max(1.0, abs(b)) for a, b in zip(grid, self.config.timesteps)):
                raise ConfigError("the scheduler's timestep grid differs from the profiled one "
                                  f"({grid[:3]}... vs {self.config.timesteps[:3]}...); check shift/spacing")
        self.state.reset()

    def check_tokens(self, hidden: torch.Tensor) -> None:
        shape = self.config.latent_shape
        if shape is not None and not self.config.force_resolution and list(hidden.shape[-2:]) != shape:
            raise ConfigError(f"the profile saw {shape[0]} tokens of width {shape[1]}, this run has "
                              f"{hidden.shape[-2]} x {hidden.shape[-1]}; profile at this resolution or set "
                              "force_resolution=True")

    def remove(self) -> None:
        for module in self.modules:
            _compat.remove_hook(module, BLOCK_HOOK)
        self.modules.clear()
        if self.wrapper is not None:
            self.wrapper.remove()
            self.wrapper = None
        if self.start in self.tracker.listeners:
            self.tracker.listeners.remove(self.start)

    def stats(self) -> dict:
        return {"denoiser_calls_computed": self.state.computed, "denoiser_calls_reused": self.state.reused}


@register_plugin(ERTACacheConfig)
def _install(model, config: ERTACacheConfig, tracker, adapter: ModelAdapter):
    name = type(model).__name__
    if config.model_class != name:
        raise ConfigError(f"model_class: this ERTACache profile is for {config.model_class}, the denoiser is {name}")
    scheduler = tracker.scheduler
    if scheduler is not None:
        kind = type(scheduler).__name__
        if kind != config.scheduler_class:
            raise ConfigError(f"scheduler_class: the profile was made with {config.scheduler_class}, "
                              f"the pipeline uses {kind}")
        current = scheduler_signature(scheduler)
        diff = sorted(k for k in set(current) | set(config.scheduler_config)
                      if current.get(k) != config.scheduler_config.get(k))
        if diff:
            detail = ", ".join(f"{k}={current.get(k)!r} (profile: {config.scheduler_config.get(k)!r})" for k in diff)
            raise ConfigError(f"scheduler_config: the pipeline's scheduler differs from the profiled one: {detail}")
        if config.adjust_timesteps and any(p != 1.0 for p in config.phi):
            if kind not in EXACT_SCHEDULERS and not config.approximate_multistep:
                raise ConfigError(f"{kind} is a multistep solver: ERTACache's interval rule is exact only for "
                                  f"{' and '.join(EXACT_SCHEDULERS)}; use FlowMatchEulerDiscreteScheduler with "
                                  "the same shift, or set approximate_multistep=True (output scaling)")
            cfg = scheduler.config
            if getattr(cfg, "stochastic_sampling", False):
                raise ConfigError("stochastic_sampling=True: the interval rule needs the deterministic Euler step")
            if kind == "DDIMScheduler" and (cfg.clip_sample or cfg.thresholding):
                raise ConfigError("DDIM with clip_sample or thresholding breaks the interval rule; set both False")
    handle = _ERTAHandle(model, config, tracker, adapter, scheduler)
    original_begin = handle.state.begin

    def begin(hidden):
        handle.check_tokens(hidden)
        original_begin(hidden)

    handle.state.begin = begin
    return handle
