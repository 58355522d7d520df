"""Named benchmark suites for ``accel bench SUITE``.

    >>> from app.bench_suites import SUITES
    >>> sorted(SUITES)
    ['ecad-shapes-t2i', 'erta-shapes-t2i', 'overhead', 'shapes-t2i', 'shapes-t2v', 'tiny']

A suite returns (pipeline, entries, prompts, call kwargs, run settings). The tiny suites run on
randomly initialised pipelines: their *speed* ratios and computation counts are real, their PSNR is
fidelity to the uncached output of a random model and says nothing about visual quality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from accel.bench import BenchEntry
from caching import StaticCacheConfig

PROMPTS = [
    "a red circle", "a blue square left of a green star", "a small yellow triangle",
    "a large purple circle above a white square", "two orange stars", "a black cat on a red square",
    "a green triangle right of a blue circle", "a tiny white star",
]


@dataclass
class Suite:
    pipe: object
    entries: list[BenchEntry]
    prompts: list[str]
    call_kwargs: dict
    runs: int = 5
    warmup: int = 1
    notes: str = ""
    extra: dict = field(default_factory=dict)
    scorers: dict = field(default_factory=dict)
    compare: str = ""  # family whose PSNR is compared with every other family's at equal speedup
    compare_speedups: tuple = (2.0, 2.5)
    compare_peers: tuple | None = None  # families compared against (None: all others)
    # speedups the comparison is drawn along: "speedup" (end to end, DESIGN § 6) and optionally
    # "denoiser_speedup" (where the VAE decode bounds every cache's end-to-end speedup)
    compare_on: tuple = ("speedup",)


# diffusers' TaylorSeer default patterns full-match "...attn" and so miss PixArt's attn1/attn2 and
# Wan's attn1/attn2/ffn: the modules it caches, per denoiser
TAYLOR_IDS = {"pixart": [r"^transformer_blocks\.\d+\.attn\d$", r"^transformer_blocks\.\d+\.ff$"],
              "wan": [r"^blocks\.\d+\.attn\d$", r"^blocks\.\d+\.ffn$"]}


def _diffusers_peers(family: str = "pixart") -> list[BenchEntry]:
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    taylor_ids = TAYLOR_IDS[family]
    return [
        BenchEntry("FirstBlockCache t=0.2", (FirstBlockCacheConfig(threshold=0.2),), peer=True,
                   settings={"threshold": 0.2}),
        BenchEntry("PAB spatial=2", (PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800)),), peer=True,
            settings={"spatial_attention_block_skip_range": 2}),
        BenchEntry("TaylorSeer n=2", (TaylorSeerCacheConfig(
            cache_interval=2, disable_cache_before_step=2, taylor_factors_dtype=None, cache_identifiers=taylor_ids),),
            peer=True, settings={"cache_interval": 2}),
    ]


def tiny() -> Suite:
    """Tiny random PixArt (4 blocks): StaticCache at three intervals vs three diffusers caches."""
    from pipelines.tiny import build_pixart

    pipe = build_pixart(num_layers=4, heads=2, head_dim=16, sample_size=16, patch_size=2)
    kwargs = dict(pipe.tiny_call_kwargs, num_inference_steps=10)
    entries = [
        BenchEntry(f"StaticCache n={n}", (StaticCacheConfig(interval=n, warmup_steps=1),),
                   settings={"interval": n, "warmup_steps": 1})
        for n in (2, 3, 4)
    ] + _diffusers_peers()
    return Suite(pipe, entries, PROMPTS[:4], kwargs, runs=5, notes=(
        "Random weights: PSNR here is fidelity to the uncached output of an untrained model, "
        "not a quality claim."))


def overhead() -> Suite:
    """Hook overhead: 12-block PixArt (about 25 ms per denoiser call on 2 cores), interval=1 vs plain."""
    from pipelines.tiny import build_pixart

    pipe = build_pixart(num_layers=12, heads=4, head_dim=32, sample_size=32, patch_size=2)
    kwargs = dict(pipe.tiny_call_kwargs, num_inference_steps=10)
    entries = [BenchEntry("StaticCache n=1 (hooks, no reuse)", (StaticCacheConfig(interval=1),),
                          settings={"interval": 1})]
    return Suite(pipe, entries, PROMPTS[:2], kwargs, runs=15, warmup=2, notes=(
        "Acceptance: StaticCache(interval=1) costs at most 3% end-to-end latency over the plain pipeline "
        "(speedup >= 0.97) and reproduces it exactly (PSNR ∞)."))


def _reference(name: str) -> Suite:
    from pipelines.zoo import load_reference
    from pipelines.zoo.scoring import EVAL_CALL, bench_scorers, heldout_prompts

    pipe = load_reference(name)
    entries = [
        BenchEntry(f"StaticCache n={n}", (StaticCacheConfig(interval=n, warmup_steps=2),),
                   settings={"interval": n, "warmup_steps": 2})
        for n in (2, 3)
    ] + _diffusers_peers("wan" if name == "shapes-t2v" else "pixart")
    return Suite(pipe, entries, heldout_prompts(name, 16), dict(EVAL_CALL[name]), runs=5,
                 scorers=bench_scorers(name), notes=(
                     f"Trained reference model {name}: PSNR/SSIM against the uncached output of the same seed; "
                     "evaluator_accuracy = fraction of fully correct outputs, adherence = mean per-attribute "
                     "accuracy, frechet = Fréchet distance to real renders in the evaluator's feature space."))


def shapes_t2i() -> Suite:
    """The trained shapes-t2i PixArt: static caching and diffusers' caches with evaluator scores."""
    return _reference("shapes-t2i")


def shapes_t2v() -> Suite:
    """The trained shapes-t2v Wan model: static caching and diffusers' caches with evaluator scores."""
    return _reference("shapes-t2v")


def _pick_spread(configs: list, k: int, lo: float = 1.5, hi: float = 3.3) -> list:
    """``k`` schedules spread evenly over the frontier's estimated speedups within [lo, hi]."""
    configs = sorted((c for c in configs if lo <= c.provenance.get("speedup", 0.0) <= hi),
                     key=lambda c: c.provenance.get("speedup", 0.0))
    if len(configs) <= k:
        return configs
    idx = sorted({round(i * (len(configs) - 1) / (k - 1)) for i in range(k)})
    return [configs[i] for i in idx]


def ecad_shapes_t2i(schedules: str | None = None, k: int = 8) -> Suite:
    """ECAD frontier schedules on shapes-t2i against every-N static schedules and diffusers' caches,
    each at four or more settings, compared at equal speedup (DESIGN § 6)."""
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

    from caching import ECADConfig
    from caching.ecad_search import shipped_schedules

    suite = _reference("shapes-t2i")
    configs = shipped_schedules("shapes-t2i") if schedules is None else [
        ECADConfig.load(p) for p in sorted(Path(schedules).glob("*.json")) if p.name[0].isdigit()]
    if not configs:
        raise SystemExit(f"no ECAD schedules found in {schedules or 'the shipped shapes-t2i frontier'}")
    entries = [BenchEntry(f"ECAD est{c.provenance.get('speedup', 0):.2f}x", (c,), family="ECAD",
                          settings={"estimated_speedup": c.provenance.get("speedup")})
               for c in _pick_spread(configs, k)]
    for warmup in (0, 2):
        entries += [BenchEntry(f"StaticCache n={n} w={warmup}", (StaticCacheConfig(interval=n, warmup_steps=warmup),),
                               family="StaticCache", settings={"interval": n, "warmup_steps": warmup})
                    for n in (2, 3, 4, 5)]
    taylor_ids = TAYLOR_IDS["pixart"]
    entries += [BenchEntry(f"FirstBlockCache t={t}", (FirstBlockCacheConfig(threshold=t),), peer=True,
                           settings={"threshold": t}) for t in (0.1, 0.2, 0.3, 0.5)]
    entries += [BenchEntry(f"TaylorSeer n={n}", (TaylorSeerCacheConfig(
        cache_interval=n, disable_cache_before_step=2, taylor_factors_dtype=None, cache_identifiers=taylor_ids),),
        peer=True, settings={"cache_interval": n}) for n in (2, 3, 4, 5)]
    entries += [BenchEntry(f"PAB spatial={r}", (PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=r, spatial_attention_timestep_skip_range=(100, 800)),), peer=True,
        settings={"spatial_attention_block_skip_range": r}) for r in (2, 3, 4, 6)]
    suite.entries = entries
    suite.compare = "ECAD"
    suite.notes = (suite.notes + " ECAD rows are frontier schedules searched on calibration prompts (disjoint from "
                   "these held-out prompts); StaticCache rows are every-N schedules with 0 or 2 warm-up steps.")
    return suite


def _mag_ratios(pipe, prompt: str, call: dict) -> list[float]:
    """MagCache's per-step magnitude ratios for this model, from one calibration run."""
    import contextlib
    import io
    import re

    from diffusers import MagCacheConfig

    import accel

    steps = call["num_inference_steps"]
    buffer = io.StringIO()
    with accel.applying(pipe, MagCacheConfig(calibrate=True, num_inference_steps=steps)), \
            contextlib.redirect_stdout(buffer):
        pipe(prompt, **call)
    found = re.findall(r"\[([-0-9.eE, ]+)\]", buffer.getvalue())
    if not found:
        raise RuntimeError("MagCache calibration printed no ratios")
    return [float(v) for v in found[-1].split(",")]


# the peers' settings (thresholds, TaylorSeer's interval) spanning ~1.2-2.5x at 20 and at 50 steps
PEER_SETTINGS = {
    20: {"FirstBlockCache": (0.1, 0.2, 0.3, 0.5), "MagCache": (0.03, 0.06, 0.12, 0.24),
         "TaylorSeer": (2, 3, 4, 5), "SeaCache": (0.1, 0.25, 0.4, 0.6)},
    50: {"FirstBlockCache": (0.05, 0.1, 0.2, 0.3, 0.5), "MagCache": (0.03, 0.06, 0.12, 0.24, 0.48),
         "TaylorSeer": (2, 4, 6, 8), "SeaCache": (0.25, 0.6, 1.0, 1.5, 2.5)},
}


def _erta_suite(name: str, profiles: list, taylor_ids: list[str]) -> Suite:
    """ERTACache profiles (each as mask only, + rectification, + interval adjustment) against
    FirstBlockCache, MagCache (ratios calibrated on this model), TaylorSeer and SeaCache at four or
    five settings each, on the held-out prompts of a reference model, at the profiles' step count."""
    from diffusers import FirstBlockCacheConfig, MagCacheConfig, SeaCacheConfig, TaylorSeerCacheConfig

    suite = _reference(name)
    entries = []
    for p in profiles:
        target = p.calibration.get("target_speedup")
        rule = p.calibration.get("mask_rule", "greedy")
        tag = "ERTACache" if rule == "greedy" else f"ERTACache {rule}"    # profiles of another mask rule
        for label, variant in (("mask only", p.variant(rectify=False, adjust_timesteps=False)),
                               ("mask+rect", p.variant(adjust_timesteps=False)), ("full", p)):
            family = tag if label == "full" else f"{tag} {label}"
            entries.append(BenchEntry(f"{tag} {label} x{target}", (variant,), family=family,
                                      settings={"target_speedup": target, "mask": p.mask, "variant": label,
                                                "mask_rule": rule}))
    steps = sorted({p.num_steps for p in profiles})
    if len(steps) > 1:
        raise SystemExit(f"the ERTACache profiles were made for different step counts {steps}: bench one at a time")
    call = suite.call_kwargs
    call["num_inference_steps"] = steps[0]  # the profiles' step count
    settings = PEER_SETTINGS[20 if steps[0] <= 30 else 50]
    ratios = _mag_ratios(suite.pipe, suite.prompts[0], dict(call, output_type="latent"))
    entries += [BenchEntry(f"FirstBlockCache t={t}", (FirstBlockCacheConfig(threshold=t),), peer=True,
                           settings={"threshold": t}) for t in settings["FirstBlockCache"]]
    entries += [BenchEntry(f"MagCache t={t}", (MagCacheConfig(
        threshold=t, num_inference_steps=call["num_inference_steps"], mag_ratios=ratios, retention_ratio=0.1),),
        peer=True, settings={"threshold": t}) for t in settings["MagCache"]]
    entries += [BenchEntry(f"TaylorSeer n={n}", (TaylorSeerCacheConfig(
        cache_interval=n, disable_cache_before_step=2, taylor_factors_dtype=None, cache_identifiers=taylor_ids),),
        peer=True, settings={"cache_interval": n}) for n in settings["TaylorSeer"]]
    entries += [BenchEntry(f"SeaCache t={t}", (SeaCacheConfig(threshold=t),), peer=True, settings={"threshold": t})
                for t in settings["SeaCache"]]
    suite.entries = entries
    suite.compare = "ERTACache"
    suite.compare_speedups = (1.5, 2.0)
    suite.compare_peers = ("FirstBlockCache", "MagCache", "TaylorSeer", "SeaCache")
    suite.notes = (suite.notes + " ERTACache profiles were made on calibration prompts (disjoint from these "
                   "held-out prompts) with `accel erta profile`; 'mask only' and 'mask+rect' rows are the ablation.")
    return suite


def _erta_profiles(name: str, schedules: str | None) -> list:
    from caching import ERTACacheConfig
    from caching.ecad_search import shipped_schedules

    if schedules is None:
        profiles = shipped_schedules(name, kind="profiles", cls=ERTACacheConfig)
    else:
        profiles = [ERTACacheConfig.load(p) for p in sorted(Path(schedules).glob("*.json"))]
    if not profiles:
        raise SystemExit(f"no ERTACache profiles found in {schedules or f'the shipped {name} profiles'} "
                         f"(make them with `accel erta profile --model {name} --target-speedup 2 ...`)")
    return profiles


def erta_shapes_t2i(schedules: str | None = None) -> Suite:
    """ERTACache on shapes-t2i (the shipped profiles, or those in ``schedules``) against
    FirstBlockCache, MagCache, TaylorSeer and SeaCache, with the three-part ablation."""
    return _erta_suite("shapes-t2i", _erta_profiles("shapes-t2i", schedules), TAYLOR_IDS["pixart"])


def sparse_shapes_t2v(schedules: str | None = None) -> Suite:
    """Sparse-vDiT on shapes-t2v: plans searched on calibration prompts (block 32: 18 blocks over the
    576 video tokens) at three predicted attention costs, against uniform diag and mdiag plans of
    similar density. Quality = PSNR vs dense on held-out prompts and evaluator accuracy; density from
    each plan. On CPU the processors run the blockwise reference, so speedups here are not kernel
    speedups (those come from `accel bench sparse-kernel` on a GPU)."""
    from accel.attention import SparseAttentionConfig
    from accel.attention.search import SparseSearchSettings, search_plan
    from pipelines.zoo.scoring import calibration_prompts

    suite = _reference("shapes-t2v")
    call = suite.call_kwargs
    if schedules:
        plans = [SparseAttentionConfig.load(p) for p in sorted(Path(schedules).glob("*.json"))]
    else:
        prompts = calibration_prompts("shapes-t2v", 4)
        plans = [search_plan(suite.pipe, prompts, dict(call, num_inference_steps=10),
                             SparseSearchSettings(block=32, rows=256, target_cost=c)) for c in (0.3, 0.4, 0.5)]
    if not plans:
        raise SystemExit(f"no sparse-attention plans in {schedules}")
    model = suite.pipe.transformer
    grid = plans[0].grid
    entries = [BenchEntry(f"searched cost<={p.search.get('target_cost')}", (p,), family="Sparse-vDiT search",
                          settings={"density": p.stats.get("density"), "skipped": p.stats.get("skipped"),
                                    "modes": p.stats.get("modes")}) for p in plans]
    n_layers, heads = model.config.num_layers, model.config.num_attention_heads
    for mode, r in (("diag", 1), ("diag", 3), ("mdiag", 0), ("mdiag", 1)):
        plan = SparseAttentionConfig.uniform("WanTransformer3DModel", grid=grid, layers=n_layers, heads=heads,
                                             mode=mode, r=r, block=32, dense_layers=(0,))
        entries.append(BenchEntry(f"uniform {mode} r={r}", (plan,), family=f"uniform {mode}",
                                  settings={"density": round(_plan_density(plan), 3)}))
    suite.entries = entries
    suite.notes += (" Sparse attention: each row's settings give its attention density (dense layers and the "
                    "20% dense warm-up steps excluded); CPU timings are not kernel timings.")
    return suite


def _plan_density(plan) -> float:
    """Mean computed fraction over the plan's sparse layers."""
    from accel.attention import SparseLayer

    dens = [SparseLayer(heads, plan.token_grid, plan.block).density() for heads in plan.head_patterns().values()]
    return sum(dens) / max(1, len(dens))


def erta_shapes_t2v(schedules: str | None = None) -> Suite:
    """ERTACache on shapes-t2v (flow-matching Euler: the interval adjustment is exact), the shipped
    profiles or those in ``schedules``, against the same four caches as on shapes-t2i. The VAE
    decode of a clip costs as much as ~16 denoiser steps on a CPU: at 20 steps no cache reaches 2x
    end to end, at 50 (Wan's default; profiles made with ``--steps 50``) they can."""
    suite = _erta_suite("shapes-t2v", _erta_profiles("shapes-t2v", schedules), TAYLOR_IDS["wan"])
    suite.compare_on = ("speedup", "denoiser_speedup")
    return suite


SUITES = {"tiny": tiny, "overhead": overhead, "shapes-t2i": shapes_t2i, "shapes-t2v": shapes_t2v,
          "ecad-shapes-t2i": ecad_shapes_t2i, "erta-shapes-t2i": erta_shapes_t2i,
          "sparse-shapes-t2v": sparse_shapes_t2v, "erta-shapes-t2v": erta_shapes_t2v}
