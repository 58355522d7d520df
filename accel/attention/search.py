"""Offline sparse-attention search: per-(layer, head) errors of every candidate pattern, cheapest
admissible pattern per head, written as a plan (spec § 5).

    >>> from accel.attention.search import SparseSearchSettings, search_plan
    >>> from pipelines.tiny import build_tiny
    >>> pipe = build_tiny("wan")
    >>> kw = dict(pipe.tiny_call_kwargs, height=64, width=64, num_frames=9)
    >>> plan = search_plan(pipe, ["a red circle"], kw, SparseSearchSettings(block=16, rows=64), progress=False)
    >>> plan.stats["density"] <= 1.0
    True

Two passes over the calibration prompts, each a full-compute generation (same scheduler and step
count as the call): the first accumulates each head's attention mass per key column (for the
stripe candidates' top-k columns outside the first frame), the second measures, at every step
after the dense warm-up and on ``rows`` video query rows spread evenly over the sequence,

    e(l, h, c) = || (O_c - O_full)_h W_o,h^T ||_F / || O_full W_o^T ||_F

(the head's share of the layer output after the output projection), averaged over steps and
maximised over prompts. Each head then takes the cheapest candidate with ``e <= tau`` (full is always
admissible); with ``target_cost`` a multiplier lambda on ``e^2`` is bisected instead so the plan's
predicted attention cost meets the target. The cost of a candidate comes from a table (seconds per
head, measured by ``accel bench sparse-kernel`` on a GPU) or, without one, from the analytic
density-proportional model: computed block pairs / all pairs, plus a small permutation overhead for
mdiag, 0 for skip.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import api
from ..adapters import get_adapter
from ..errors import ConfigError
from .masks import Grid, HeadPattern, build_indices, check_block, token_mask
from .plan import SparseAttentionConfig
from .processors import _stock_classes

PERMUTE_OVERHEAD = 0.02    # analytic cost of the mdiag gather/scatter, in units of one dense head


@dataclass
class SparseSearchSettings:
    """Args:
        tau: error budget per head (spec default 0.02).
        rows: sampled video query rows per layer and call.
        block: block size of the plan.
        dense_warmup: leading fraction of steps that run dense (not captured).
        dense_layers: layers that always run dense.
        mdiag_r / stripe_k: candidate band radii for mdiag and column counts for stripe; diag radii
            are derived from the frame size P: ceil(P/2B), ceil(P/B), ceil(2P/B).
        target_cost: optional predicted attention cost (fraction of dense) to hit via lambda.
        seed: generation seed of every calibration prompt.
        cost_table: optional ``{candidate name: per-head time}`` (from a GPU microbenchmark).
    """

    tau: float = 0.02
    rows: int = 512
    block: int = 128
    dense_warmup: float = 0.2
    dense_layers: tuple[int, ...] = (0,)
    mdiag_r: tuple[int, ...] = (0, 1, 2, 4)
    stripe_k: tuple[int, ...] = (0, 512, 2048)
    target_cost: float | None = None
    seed: int = 0
    cost_table: dict | None = None

    def __post_init__(self):
        check_block(self.block)
        if not 0 < self.tau:
            raise ConfigError(f"tau must be > 0, got {self.tau}")
        if self.rows < 1:
            raise ConfigError(f"rows must be >= 1, got {self.rows}")


def candidate_names(grid: Grid, block: int, settings: SparseSearchSettings) -> list[tuple[str, HeadPattern, int]]:
    """(name, pattern, stripe k) of every candidate; stripe patterns get their columns per head later."""
    p = grid.per_frame
    diag = sorted({math.ceil(p / (2 * block)), math.ceil(p / block), math.ceil(2 * p / block)})
    rest = grid.tokens - p
    ks = sorted({min(k, rest // 2) for k in settings.stripe_k})
    out = [("full", HeadPattern("full"), 0), ("skip", HeadPattern("skip"), 0)]
    out += [(f"diag{r}", HeadPattern("diag", r=r), 0) for r in diag]
    out += [(f"mdiag{r}", HeadPattern("mdiag", r=r), 0) for r in settings.mdiag_r]
    out += [(f"stripe{k}", HeadPattern("stripe", first_frame=True, diag_r=0), k) for k in ks]
    return out


def analytic_cost(pattern: HeadPattern, grid: Grid, block: int) -> float:
    """Computed (query block, key block) pairs over all pairs, plus gathered columns as a fraction."""
    if pattern.mode == "skip":
        return 0.0
    if pattern.mode == "full":
        return 1.0
    cost = build_indices([pattern], grid, block).density()
    cost += len(pattern.cols) / grid.tokens
    return cost + (PERMUTE_OVERHEAD if pattern.mode == "mdiag" else 0.0)


def grid_of(model, hidden_states: torch.Tensor) -> Grid:
    """Latent token grid from the denoiser's input latents and its patch sizes."""
    cfg = model.config
    layout = get_adapter(model).latent_layout
    if layout == "BCTHW":
        f, h, w = hidden_states.shape[2:]
    elif layout == "BTCHW":
        f, h, w = hidden_states.shape[1], hidden_states.shape[3], hidden_states.shape[4]
    else:
        raise ConfigError(f"{type(model).__name__} is not a video model")
    patch = cfg.patch_size
    if isinstance(patch, (tuple, list)):
        pt, ph, pw = patch
    else:
        pt, ph, pw = (getattr(cfg, "patch_size_t", None) or 1), patch, patch
    return Grid(math.ceil(f / pt), h // ph, w // pw)


class _Capture:
    """Stands in for a layer's :class:`SparseLayer`: returns the stock output and records statistics."""

    def __init__(self, run, index: int, w_o: torch.Tensor, heads: int):
        self.run, self.index, self.w_o, self.heads = run, index, w_o, heads
        self.mass = None
        self.err_sum = None
        self.calls = 0

    @property
    def grid(self) -> Grid:
        return self.run.grid

    @torch.no_grad()
    def attend(self, q, k, v, dense, video=slice(None), text=None, len_t=None):
        out = dense(q, k, v)
        if self.index in self.run.settings.dense_layers:
            return out
        grid = self.grid
        n = grid.tokens
        rows = torch.linspace(0, n - 1, min(self.run.settings.rows, n)).round().long().unique()
        qv = q[:, video][:, rows].float()
        kv, vv = k[:, video].float(), v[:, video].float()
        z, _, h, d = q.shape
        if text is not None:
            kt, vt = k[:, text].float(), v[:, text].float()
            valid = torch.arange(kt.shape[1], device=q.device)[None] < (
                len_t.to(q.device)[:, None] if len_t is not None else kt.shape[1])
        scale = 1.0 / math.sqrt(d)
        scores = torch.einsum("zrhd,znhd->zhrn", qv, kv) * scale
        if text is not None:
            st = torch.einsum("zrhd,znhd->zhrn", qv, kt) * scale
            st = st.masked_fill(~valid[:, None, None, :], -math.inf)
        else:
            st = None

        def attend_masked(mask):  # mask [R, N] or [H, R, N] over video keys
            s = scores.masked_fill(~mask, -math.inf)
            vals = [vv]
            if st is not None:
                s = torch.cat([s, st], -1)
                vals.append(vt)
            lse = torch.logsumexp(s, -1, keepdim=True)
            p = torch.exp(s - torch.where(torch.isfinite(lse), lse, 0.0))
            values = torch.cat(vals, 1)
            return torch.einsum("zhrn,znhd->zrhd", p, values), p[..., :n]

        full, probs = attend_masked(torch.ones(len(rows), n, dtype=torch.bool, device=q.device))
        if self.run.phase == "mass":
            mass = probs.sum((0, 2)).cpu()                                 # [H, N]
            self.mass = mass if self.mass is None else self.mass + mass
            return out
        w = self.w_o.float().to(q.device)                                   # [dim, H*D]
        denom = torch.linalg.norm(full.reshape(z, len(rows), h * d) @ w.T).clamp_min(1e-12)
        errs = torch.zeros(h, len(self.run.candidates))
        for c, (name, pattern, k_cols) in enumerate(self.run.candidates):
            if name == "full":
                continue
            if name == "skip":
                diff = -full
            else:
                masks = torch.stack([self.run.mask(self.index, head, name, pattern, k_cols)[rows] for head in range(h)])
                o_c, _ = attend_masked(masks[None].to(q.device))
                diff = o_c - full
            for head in range(h):
                part = diff[:, :, head] @ w[:, head * d:(head + 1) * d].T
                errs[head, c] = float(torch.linalg.norm(part) / denom)
        self.err_sum = errs if self.err_sum is None else self.err_sum + errs
        self.calls += 1
        return out


class _Run:
    def __init__(self, settings: SparseSearchSettings):
        self.settings = settings
        self.grid: Grid | None = None
        self.phase = "mass"
        self.candidates: list = []
        self.captures: list[_Capture] = []
        self._masks: dict = {}

    def columns(self, layer: int, head: int, k: int) -> tuple[int, ...]:
        if k == 0:
            return ()
        mass = self.captures[layer].mass
        if mass is None:
            return ()
        m = mass[head].clone()
        m[: self.grid.per_frame] = -1            # first-frame columns are in the sink blocks already
        return tuple(sorted(torch.topk(m, k).indices.tolist()))

    def pattern(self, layer: int, head: int, name: str, pattern: HeadPattern, k: int) -> HeadPattern:
        if pattern.mode != "stripe":
            return pattern
        return HeadPattern("stripe", first_frame=True, diag_r=0, cols=self.columns(layer, head, k))

    def mask(self, layer, head, name, pattern, k) -> torch.Tensor:
        key = (name,) if pattern.mode != "stripe" or k == 0 else (name, layer, head)
        if key not in self._masks:
            self._masks[key] = token_mask(self.pattern(layer, head, name, pattern, k), self.grid,
                                          self.settings.block)
        return self._masks[key]


def _output_weight(model, name: str, module) -> torch.Tensor:
    to_out = getattr(module, "to_out", None)
    if to_out is not None:
        return to_out[0].weight.detach()
    parent = model.get_submodule(name.rsplit(".", 1)[0])           # Hunyuan single-stream block
    return parent.proj_out.weight.detach()[:, : module.to_q.out_features]


def _select(errors: torch.Tensor, costs: torch.Tensor, tau: float, lam: float | None) -> torch.Tensor:
    """Candidate index per head: cheapest with e <= tau (full = 0 always admissible), or argmin
    cost + lam * e^2 when ``lam`` is given."""
    if lam is not None:
        return torch.argmin(costs[None] + lam * errors**2, dim=1)
    score = torch.where(errors <= tau, costs[None], math.inf)
    score[:, 0] = costs[0]
    return torch.argmin(score, dim=1)


def search_plan(pipe, prompts: list[str], call_kwargs: dict | None = None,
                settings: SparseSearchSettings | None = None, progress: bool = True) -> SparseAttentionConfig:
    """Run the search on ``pipe`` at the resolution/frames of ``call_kwargs``; returns the plan."""
    from tqdm.auto import tqdm

    settings = settings or SparseSearchSettings()
    call_kwargs = dict(call_kwargs or {})
    model = pipe.transformer
    name = type(model).__name__
    if name not in _stock_classes():
        raise ConfigError(f"sparse search supports {', '.join(_stock_classes())}; got {name}")
    if not prompts:
        raise ConfigError("the search needs at least one calibration prompt")
    sparse_cls = _stock_classes()[name][1]
    modules = get_adapter(model).self_attention_modules(model)
    heads = modules[0][1].heads
    run = _Run(settings)
    probe = SparseAttentionConfig.uniform(name, grid=(1, 1, 1), layers=len(modules), heads=heads, mode="full",
                                          block=settings.block, dense_warmup=settings.dense_warmup, dense_layers=(),
                                          text={"position": sparse_cls.text_position, "length": 0})

    def set_grid(module, args, kwargs):
        latents = kwargs.get("hidden_states", args[0] if args else None)
        grid = grid_of(model, latents)
        if run.grid is None:
            run.grid = grid
            run.candidates = candidate_names(grid, settings.block, settings)
        return None

    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=2 * len(prompts), desc="sparse search", disable=not progress)
    handle = model.register_forward_pre_hook(set_grid, with_kwargs=True)
    try:
        api.apply(pipe, probe)
        for index, (mname, module) in enumerate(modules):
            proc = module.processor
            assert isinstance(proc, sparse_cls)
            cap = _Capture(run, index, _output_weight(model, mname, module), heads)
            run.captures.append(cap)
            proc.layer = cap
        per_prompt = []
        for phase in ("mass", "error"):
            run.phase = phase
            for prompt in prompts:
                for cap in run.captures:
                    cap.err_sum, cap.calls = None, 0
                pipe(prompt, generator=torch.Generator("cpu").manual_seed(settings.seed), **call_kwargs)
                if phase == "error":
                    per_prompt.append([cap.err_sum / max(cap.calls, 1) if cap.err_sum is not None else None
                                       for cap in run.captures])
                bar.update()
    finally:
        bar.close()
        handle.remove()
        api.remove(pipe)
    if run.grid is None or not run.captures or all(e is None for e in per_prompt[0]):
        raise ConfigError("nothing was captured: check dense_warmup (all steps dense?) and dense_layers")
    return _plan_from(run, per_prompt, modules, name, sparse_cls.text_position, call_kwargs, len(prompts), heads)


def _plan_from(run: _Run, per_prompt, modules, name, text_position, call_kwargs, n_prompts,
               heads_per_layer: int) -> SparseAttentionConfig:
    s, grid = run.settings, run.grid
    patterns = {}
    layer_errors = {}
    for index in range(len(modules)):
        if index in s.dense_layers or per_prompt[0][index] is None:
            continue
        layer_errors[index] = torch.stack([p[index] for p in per_prompt]).amax(0)     # max over prompts
        patterns[index] = [[run.pattern(index, h, *cand) for cand in run.candidates]
                           for h in range(layer_errors[index].shape[0])]
    table = s.cost_table or {}

    def cost(index, h, c):
        cname = run.candidates[c][0]
        return float(table[cname]) if cname in table else analytic_cost(patterns[index][h][c], grid, s.block)

    costs = {i: torch.tensor([[cost(i, h, c) for c in range(len(run.candidates))] for h in range(len(patterns[i]))])
             for i in patterns}

    def choose(lam):
        picks = {}
        for i in patterns:
            picks[i] = [int(_select(layer_errors[i][h:h + 1], costs[i][h], s.tau, lam)[0])
                        for h in range(len(patterns[i]))]
        return picks

    def mean_cost(picks):
        vals = [float(costs[i][h, c]) for i in picks for h, c in enumerate(picks[i])]
        return sum(vals) / max(1, len(vals))

    picks = choose(None)
    if s.target_cost is not None:
        # a larger lambda buys accuracy with cost: keep the largest lambda whose plan meets the target
        lo, hi = 1e-6, 1e8
        for _ in range(60):
            mid = math.sqrt(lo * hi)
            if mean_cost(choose(mid)) <= s.target_cost:
                lo = mid
            else:
                hi = mid
        picks = choose(lo)
    layers, densities, skipped, errs = [], [], 0, []
    n_heads = 0
    for i, choice in picks.items():
        heads = [patterns[i][h][c].to_dict() for h, c in enumerate(choice)]
        layers.append({"index": i, "module": modules[i][0], "heads": heads})
        for h, c in enumerate(choice):
            p = patterns[i][h][c]
            densities.append(0.0 if p.mode == "skip" else 1.0 if p.mode == "full"
                             else build_indices([p], grid, s.block).density() + len(p.cols) / grid.tokens)
            skipped += p.mode == "skip"
            errs.append(float(layer_errors[i][h, c]))
            n_heads += 1
    all_heads = len(modules) * heads_per_layer          # dense layers count as density 1
    density_all = (sum(densities) + (all_heads - n_heads)) / max(1, all_heads)
    pred = s.dense_warmup + (1 - s.dense_warmup) * (
        (sum(float(costs[i][h, c]) for i in picks for h, c in enumerate(picks[i])) + (all_heads - n_heads))
        / max(1, all_heads))
    return SparseAttentionConfig(
        model_class=name, grid=(grid.frames, grid.height, grid.width), layers=layers, block=s.block,
        dense_warmup=s.dense_warmup, dense_layers=tuple(s.dense_layers),
        text={"position": text_position, "length": 0},
        height=call_kwargs.get("height"), width=call_kwargs.get("width"), num_frames=call_kwargs.get("num_frames"),
        search={"prompts": n_prompts, "steps": call_kwargs.get("num_inference_steps"), "tau": s.tau, "rows": s.rows,
                "target_cost": s.target_cost, "candidates": [c[0] for c in run.candidates],
                "cost_model": "table" if s.cost_table else "analytic density"},
        stats={"density": round(density_all, 4), "density_sparse_layers": round(sum(densities) / max(1, n_heads), 4),
               "skipped": round(skipped / max(1, all_heads), 4), "pred_attn_ratio": round(pred, 4),
               "max_head_error": round(max(errs, default=0.0), 5),
               "modes": {m: sum(h["mode"] == m for la in layers for h in la["heads"])
                         for m in ("full", "skip", "diag", "mdiag", "stripe")}},
    )
