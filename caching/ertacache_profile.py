"""ERTACache's offline profiler: full-compute runs on calibration prompts -> mask, K/b, phi.

    >>> from caching.ertacache_profile import make_profile
    >>> from pipelines.tiny import build_tiny
    >>> pipe = build_tiny("pixart")
    >>> profile = make_profile(pipe, ["a red circle", "a blue square"], pipe.tiny_call_kwargs,
    ...                        target_speedup=1.5, progress=False)
    >>> profile.mask[0]
    'C'

1. **Record** (one batched, uncached call over all prompts, seed ``seed + i`` for prompt i): each
   step's block-stack residual r_i per cache context, and the sampler's state x_i.
2. **Mask**: e(k, i) = mean over samples of ||r_i - r_k||_1 / ||r_i||_1; walking i = 1..N-1 with k
   the last computed step, step i computes when forced (the first ``warmup`` steps, the last step)
   or when e(k, i) > delta. ``target_speedup`` picks the smallest delta that reuses
   ``round(N (1 - 1/target_speedup))`` steps (or as many as the forced steps allow).
3. **Rectification** (closed form, teacher-forced, per hidden channel c, per context): with
   X = r_k[..., c] and Y = (r_i - r_k)[..., c] pooled over samples and tokens,
   K_i = Cov(X, Y) / (Var(X) + 1e-6 Var(X)), b_i = mean(Y) - K_i mean(X); K clamped to [-0.5, 0.5].
4. **Interval coefficient** (closed form, sequential, on-policy): the calibration batch runs again
   under mask + rectification; at each reused step, with the stock update ``prev`` and its increment
   d, phi_i = 1 + <x_ref_{i+1} - prev, d> / <d, d> over the whole batch (clamped to [0.5, 1.5]), which
   also steers the cached trajectory back toward the reference; the run continues with that phi.
"""

from __future__ import annotations

import contextlib
import functools
import math

import numpy as np
import torch

import accel
from accel.errors import ConfigError

from .ertacache import ERTACacheConfig, _SchedulerWrapper, scheduler_signature

PHI_RANGE = (0.5, 1.5)
MASK_RULES = ("greedy", "min-sum")
K_RANGE = (-0.5, 0.5)


@contextlib.contextmanager
def _recording_step(scheduler, record):
    """Temporarily wrap ``scheduler.step`` to see (sample, prev) of each step."""
    original = scheduler.step

    @functools.wraps(original)
    def step(model_output, timestep, sample, *args, **kwargs):
        out = original(model_output, timestep, sample, *args, **kwargs)
        record(sample, out[0] if isinstance(out, tuple) else out.prev_sample)
        return out

    scheduler.step = step
    try:
        yield
    finally:
        del scheduler.step


def _call(pipe, prompts, call_kwargs, seed):
    gens = [torch.Generator("cpu").manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(list(prompts), generator=gens, **call_kwargs)


def _handle(pipe, config):
    for cfg, handle in pipe.transformer._accel_state.installed:
        if cfg is config:
            return handle
    raise RuntimeError("ERTACache handle not found")


def _blank(pipe, num_steps: int, contexts=("branch0",), dim: int = 1) -> ERTACacheConfig:
    zeros = [[0.0] * dim for _ in range(num_steps)]
    sched = pipe.scheduler
    return ERTACacheConfig(
        model_class=type(pipe.transformer).__name__, scheduler_class=type(sched).__name__,
        scheduler_config=scheduler_signature(sched), num_steps=num_steps, timesteps=[],
        mask="C" * num_steps, K={c: zeros for c in contexts}, b={c: zeros for c in contexts},
        phi=[1.0] * num_steps, rectify=False, adjust_timesteps=False, force_resolution=True)


def relative_errors(residuals: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """e[k, i] = mean over samples (batch rows of every context) of ||r_i - r_k||_1 / ||r_i||_1."""
    n = len(residuals)
    e = np.zeros((n, n))
    contexts = sorted(residuals[0])
    for i in range(n):
        for k in range(i):
            vals = []
            for c in contexts:
                ri, rk = residuals[i][c].flatten(1), residuals[k][c].flatten(1)
                vals.append(((ri - rk).abs().sum(1) / ri.abs().sum(1).clamp_min(1e-12)).double())
            e[k, i] = float(torch.cat(vals).mean())
    return e


def greedy_mask(errors: np.ndarray, delta: float, warmup: int = 1, force_last: bool = True) -> str:
    """Walk the steps: compute when forced or when the error from the last computed step exceeds delta."""
    n = errors.shape[0]
    mask, k = ["C"], 0
    for i in range(1, n):
        forced = i < warmup or (force_last and i == n - 1)
        if forced or errors[k, i] > delta:
            mask.append("C")
            k = i
        else:
            mask.append("R")
    return "".join(mask)


def delta_for_reuse(errors: np.ndarray, reuse: int, warmup: int = 1, force_last: bool = True) -> float:
    """The smallest threshold whose greedy mask reuses at least ``reuse`` steps (or the most possible)."""
    candidates = np.unique(np.concatenate([[0.0], errors[np.triu_indices(errors.shape[0], 1)]]))
    lo, hi = 0, len(candidates) - 1
    if greedy_mask(errors, candidates[hi], warmup, force_last).count("R") < reuse:
        return float(candidates[hi])
    while lo < hi:  # the reuse count is non-decreasing in delta
        mid = (lo + hi) // 2
        if greedy_mask(errors, candidates[mid], warmup, force_last).count("R") >= reuse:
            hi = mid
        else:
            lo = mid + 1
    return float(candidates[lo])


def min_sum_mask(errors: np.ndarray, reuse: int, warmup: int = 1, force_last: bool = True) -> str:
    """The mask with ``reuse`` reused steps (or as many as the forced steps allow) whose summed error
    e(k, i) over its reused steps, k the last computed step before i, is smallest (exact dynamic program).

    The greedy rule reuses a step as soon as its error is under the threshold, which can spend the
    reuse budget early on a chain of reuses whose errors then grow; this rule sees the whole budget.
    """
    n = errors.shape[0]
    forced = [i == 0 or i < warmup or (force_last and i == n - 1) for i in range(n)]
    reuse = min(reuse, n - sum(forced))
    # best[(k, r)] = (cost, mask so far): k the last computed step, r the reuses so far
    best: dict[tuple[int, int], tuple[float, str]] = {(0, 0): (0.0, "C")}
    for i in range(1, n):
        nxt: dict[tuple[int, int], tuple[float, str]] = {}
        for (k, r), (cost, mask) in best.items():
            options = [((i, r), cost, mask + "C")]
            if not forced[i] and r < reuse:
                options.append(((k, r + 1), cost + float(errors[k, i]), mask + "R"))
            for key, c, m in options:
                if key not in nxt or c < nxt[key][0]:
                    nxt[key] = (c, m)
        best = nxt
    return min((v for (k, r), v in best.items() if r == reuse), key=lambda v: v[0])[1]


def fit_rectification(residuals: list[dict[str, torch.Tensor]], mask: str, scalar: bool = False):
    """Per-context tables K, b (``N x D``) of the linear model r_i - r_k ~ K_i r_k + b_i."""
    n = len(mask)
    contexts = sorted(residuals[0])
    dim = residuals[0][contexts[0]].shape[-1]
    K = {c: torch.zeros(n, dim, dtype=torch.float64) for c in contexts}
    b = {c: torch.zeros(n, dim, dtype=torch.float64) for c in contexts}
    k = 0
    for i in range(n):
        if mask[i] == "C":
            k = i
            continue
        for c in contexts:
            X = residuals[k][c].reshape(-1, dim).double()
            Y = residuals[i][c].reshape(-1, dim).double() - X
            if scalar:
                var = X.var(unbiased=False)
                gain = ((X - X.mean()) * (Y - Y.mean())).mean() / (var * (1 + 1e-6)).clamp_min(1e-30)
                K[c][i] = gain.clamp(*K_RANGE)
                continue
            mx, my = X.mean(0), Y.mean(0)
            var = X.var(0, unbiased=False)
            cov = ((X - mx) * (Y - my)).mean(0)
            gain = (cov / (var * (1 + 1e-6)).clamp_min(1e-30)).clamp(*K_RANGE)
            K[c][i] = gain
            b[c][i] = my - gain * mx
    return K, b


def phi_from(reference_next: torch.Tensor, prev: torch.Tensor, increment: torch.Tensor) -> float:
    """phi minimising ||prev + (phi - 1) d - x_ref||^2 over the batch, clamped."""
    d = increment.double()
    gap = reference_next.double() - prev.double()
    denom = float((d * d).sum())
    if denom == 0.0:
        return 1.0
    return float(np.clip(1.0 + float((gap * d).sum()) / denom, *PHI_RANGE))


@torch.no_grad()
def make_profile(pipe, prompts: list[str], call_kwargs: dict | None = None, *, target_speedup: float | None = 2.0,
                 delta: float | None = None, warmup: int = 1, force_last: bool = True, seed: int = 0,
                 scalar: bool = False, fit_phi: bool = True, mask_rule: str = "greedy",
                 progress: bool = True) -> ERTACacheConfig:
    """Profile ``pipe`` on ``prompts`` and return an :class:`ERTACacheConfig` (save it with ``.save``).

    Give either ``target_speedup`` (the reuse fraction is 1 - 1/target) or ``delta`` (the threshold).
    ``mask_rule``: ``"greedy"`` (the spec's threshold walk) or ``"min-sum"`` (:func:`min_sum_mask`,
    the reuse count of ``target_speedup`` at the least summed error; ours, not the paper's).
    """
    from tqdm.auto import tqdm

    if not prompts:
        raise ConfigError("profiling needs at least one calibration prompt")
    if accel.applied(pipe):
        raise ConfigError("remove the plug-ins applied to the pipeline before profiling (accel.remove(pipe))")
    if delta is None and target_speedup is None:
        raise ConfigError("give target_speedup=... or delta=...")
    if target_speedup is not None and target_speedup < 1:
        raise ConfigError(f"target_speedup must be >= 1, got {target_speedup}")
    if mask_rule not in MASK_RULES:
        raise ConfigError(f"mask_rule must be one of {MASK_RULES}, got {mask_rule!r}")
    if mask_rule == "min-sum" and target_speedup is None:
        raise ConfigError("the min-sum mask rule needs target_speedup (it has no threshold)")
    call_kwargs = dict(call_kwargs or {})
    call_kwargs["output_type"] = "latent"
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    from .ecad_search import _num_steps

    n = _num_steps(pipe, call_kwargs)
    bar = tqdm(total=2 * n if fit_phi else n, desc="ERTACache profile", disable=not progress)

    # 1. record the uncached run
    residuals: list[dict[str, torch.Tensor]] = [dict() for _ in range(n)]
    states: list[torch.Tensor] = []  # x_{i+1} of the reference, per step
    blank = _blank(pipe, n)
    shape: list[int] = []

    def record(step, ctx, u, r):
        residuals[step][ctx] = r.detach().float().cpu().clone()
        shape[:] = list(u.shape[-2:])

    def record_state(sample, prev):
        states.append(prev.detach().clone())
        bar.update()

    with accel.applying(pipe, blank), _recording_step(pipe.scheduler, record_state):
        _handle(pipe, blank).state.record = record
        _call(pipe, prompts, call_kwargs, seed)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    if len(states) != n or any(not r for r in residuals):
        raise ConfigError(f"expected {n} recorded steps, got {len(states)}; is this a supported pipeline?")
    contexts = sorted(residuals[0])

    # 2. the mask
    errors = relative_errors(residuals)
    reuse = None if target_speedup is None else int(math.floor(n * (1.0 - 1.0 / target_speedup) + 0.5))
    if mask_rule == "min-sum":
        mask = min_sum_mask(errors, reuse, warmup, force_last)
        # recorded for reference: the largest error this mask accepts on a reused step
        delta = max((e for e, m in zip(_errors_along(errors, mask), mask, strict=True) if m == "R"), default=0.0)
    else:
        if delta is None:
            delta = delta_for_reuse(errors, reuse, warmup, force_last)
        mask = greedy_mask(errors, delta, warmup, force_last)

    # 3. rectification
    K, b = fit_rectification(residuals, mask, scalar)
    config = ERTACacheConfig(
        model_class=type(pipe.transformer).__name__, scheduler_class=type(pipe.scheduler).__name__,
        scheduler_config=scheduler_signature(pipe.scheduler), num_steps=n, timesteps=timesteps,
        latent_shape=shape, mask=mask, K={c: K[c].tolist() for c in contexts},
        b={c: b[c].tolist() for c in contexts}, phi=[1.0] * n,
        calibration={"prompts": list(prompts), "seed": seed, "delta": delta, "target_speedup": target_speedup,
                     "warmup": warmup, "force_last": force_last, "variant": "scalar" if scalar else "channel",
                     "mask_rule": mask_rule,
                     "reuse_fraction": mask.count("R") / n,
                     "errors_from_last_compute": _errors_along(errors, mask)})

    # 4. the interval coefficients, on-policy
    if fit_phi and "R" in mask:
        phi = [1.0] * n

        def adjust(step, sample, prev, increment):
            phi[step] = phi_from(states[step].to(prev.device), prev, increment)
            return phi[step]

        fitting = config.variant(adjust_timesteps=True)
        if type(pipe.scheduler).__name__ not in ("FlowMatchEulerDiscreteScheduler", "DDIMScheduler"):
            raise ConfigError(f"{type(pipe.scheduler).__name__}: phi can be fitted only for flow-matching "
                              "Euler or DDIM; pass fit_phi=False")
        with accel.applying(pipe, fitting):
            handle = _handle(pipe, fitting)
            handle.state.on_adjust = adjust
            if handle.wrapper is None:
                handle.wrapper = _SchedulerWrapper(pipe.scheduler, handle.state, approximate=False)
            _call(pipe, prompts, call_kwargs, seed)
        bar.update(n)
        config.phi = phi
    bar.close()
    return config


def _errors_along(errors: np.ndarray, mask: str) -> list[float]:
    out, k = [], 0
    for i, m in enumerate(mask):
        out.append(float(errors[k, i]) if i else 0.0)
        if m == "C":
            k = i
    return out
