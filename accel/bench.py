"""Benchmark harness: baseline, diffusers peers and our configs on the same seeds, in one process.

    >>> from accel.bench import BenchEntry, run_bench, write_results
    >>> from caching import StaticCacheConfig
    >>> from pipelines.tiny import build_tiny
    >>> pipe = build_tiny("pixart")
    >>> result = run_bench(pipe, [BenchEntry("static-2", (StaticCacheConfig(interval=2),))],
    ...                    prompts=["a red circle", "a blue square"], call_kwargs=pipe.tiny_call_kwargs,
    ...                    runs=3, progress=False)
    >>> print(result["table"])  # doctest: +SKIP

Protocol (DESIGN § 6): quality = mean over the prompts of PSNR/SSIM against the baseline output of
the same seed, plus any extra scorers (plain callables ``f(outputs, prompts) -> float``, e.g. a
reference model's evaluator accuracy); speed = median end-to-end wall time over ``runs`` timed runs
after ``warmup`` runs, rounds interleaved (baseline, then each method) so drift hits all alike;
speedup = baseline median / method median. Denoiser-only time is reported beside it, and the
fraction of component computations skipped is counted by probes inside each cacheable component,
so it is the same measure for our plug-ins and diffusers' own caches.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import _compat, api, metrics
from .adapters import get_adapter

Scorer = Callable[[list, list], float]


@dataclass
class BenchEntry:
    """One row of the table: a name and the configs to apply (empty = baseline)."""

    name: str
    configs: tuple = ()
    peer: bool = False  # a diffusers built-in, run through accel.apply like ours
    settings: dict = field(default_factory=dict)  # what to print about it (e.g. {"interval": 2})
    family: str = ""  # rows of one method at several settings share a family (default: first word of name)

    def __post_init__(self):
        self.family = self.family or self.name.split(" ")[0]


def hardware() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_cores": os.cpu_count(),
        "cpu_model": platform.processor() or "unknown",
    }
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    info["cpu_model"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import diffusers
        import transformers

        info["diffusers"], info["transformers"] = diffusers.__version__, transformers.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _outputs(result):
    out = getattr(result, "images", None)
    return out if out is not None else result.frames


PROBE_HOOK = "accel_bench_probe"


class _CountHook(_compat.ModelHook):
    def __init__(self, probe: ComputeProbe):
        super().__init__()
        self.probe = probe

    def new_forward(self, module, *args, **kwargs):
        self.probe.component_calls += 1
        return self.fn_ref.original_forward(*args, **kwargs)


class ComputeProbe:
    """Counts real computations of every cacheable component, and the denoiser's calls and wall time.

    Create it *before* applying plug-ins: its counting hook then sits innermost on each component,
    so it fires only when the component really runs, whichever plug-in (ours, or diffusers' PAB,
    FirstBlockCache …) decided to skip it. ``close()`` leaves the model as it found it.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.component_calls = 0
        self.denoiser_calls = 0
        self.denoiser_seconds = 0.0
        self._t0 = 0.0
        self._modules = [slot.module for slot in get_adapter(model).slots(model)]
        self._created = {id(m) for m in self._modules if not _compat.has_hook_registry(m)}
        for module in self._modules:
            _compat.registry_of(module).register_hook(_CountHook(self), PROBE_HOOK)
        self._handles = [model.register_forward_pre_hook(self._start), model.register_forward_hook(self._stop)]

    def _sync(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _start(self, *_):
        self._sync()
        self._t0 = time.perf_counter()

    def _stop(self, *_):
        self._sync()
        self.denoiser_seconds += time.perf_counter() - self._t0
        self.denoiser_calls += 1

    def close(self):
        for module in self._modules:
            _compat.remove_hook(module, PROBE_HOOK)
        _compat.drop_empty_registries(self.model, self._created)
        for handle in self._handles:
            handle.remove()


def _generate(pipe, prompt, seed, call_kwargs, probe=None):
    generator = torch.Generator("cpu").manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = _outputs(pipe(prompt, generator=generator, **call_kwargs))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, leave=False)


def run_bench(pipe, entries: list[BenchEntry], prompts: list[str], call_kwargs: dict | None = None, *,
              runs: int = 5, warmup: int = 1, seed: int = 0, scorers: dict[str, Scorer] | None = None,
              progress: bool = True, suite: str = "custom", notes: str = "") -> dict:
    """Run the protocol and return the result dict (``rows``, ``hardware``, ``table`` …)."""
    if runs < 1 or not prompts:
        raise ValueError("need runs >= 1 and at least one prompt")
    call_kwargs = dict(call_kwargs or {})
    call_kwargs.setdefault("output_type", "pt")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    scorers = scorers or {}
    model = pipe.transformer
    baseline = BenchEntry("baseline")
    all_entries = [baseline, *entries]
    total = len(all_entries) * (len(prompts) + warmup + runs)
    bar = _progress(total, progress, f"bench {suite}")

    rows: dict[str, dict] = {}
    references: list = []
    probe = ComputeProbe(model)
    try:
        for entry in all_entries:  # quality pass
            with api.applying(pipe, *entry.configs):
                outs, calls = [], []
                for i, prompt in enumerate(prompts):
                    probe.component_calls = 0
                    out, _ = _generate(pipe, prompt, seed + i, call_kwargs)
                    outs.append(out)
                    calls.append(probe.component_calls)
                    bar.update()
                for _ in range(warmup):
                    _generate(pipe, prompts[0], seed, call_kwargs)
                    bar.update()
            if entry is baseline:
                references = outs
            row = {"name": entry.name, "family": entry.family, "peer": entry.peer, "settings": entry.settings,
                   "configs": [type(c).__name__ for c in entry.configs],
                   "component_calls": sum(calls) / len(calls)}
            row["psnr"] = statistics.fmean(metrics.psnr(o, r) for o, r in zip(outs, references))
            row["ssim"] = statistics.fmean(metrics.ssim(o, r) for o, r in zip(outs, references))
            for name, scorer in scorers.items():
                row[name] = float(scorer(outs, prompts))
            rows[entry.name] = row

        times = {e.name: [] for e in all_entries}
        den_times = {e.name: [] for e in all_entries}
        for _ in range(runs):  # interleaved timing rounds
            for entry in all_entries:
                with api.applying(pipe, *entry.configs):
                    probe.denoiser_seconds = 0.0
                    _, seconds = _generate(pipe, prompts[0], seed, call_kwargs)
                times[entry.name].append(seconds)
                den_times[entry.name].append(probe.denoiser_seconds)
                bar.update()
    finally:
        probe.close()
        bar.close()

    base = rows["baseline"]
    base["latency_s"] = statistics.median(times["baseline"])
    base["denoiser_s"] = statistics.median(den_times["baseline"])
    for entry in all_entries:
        row = rows[entry.name]
        row["latency_s"] = statistics.median(times[entry.name])
        row["latency_all_s"] = times[entry.name]
        row["denoiser_s"] = statistics.median(den_times[entry.name])
        row["speedup"] = base["latency_s"] / row["latency_s"]
        row["denoiser_speedup"] = base["denoiser_s"] / row["denoiser_s"] if row["denoiser_s"] else math.nan
        row["skipped_fraction"] = 1.0 - row["component_calls"] / max(base["component_calls"], 1)

    result = {
        "suite": suite,
        "notes": notes,
        "hardware": hardware(),
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(next(model.parameters()).device),
        "model_class": type(model).__name__,
        "pipeline_class": type(pipe).__name__,
        "call_kwargs": {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool))},
        "prompts": list(prompts),
        "runs": runs,
        "warmup": warmup,
        "seed": seed,
        "scorers": sorted(scorers),
        "rows": list(rows.values()),
    }
    result["table"] = markdown_table(result)
    return result


def envelope(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The (speedup, psnr) points no other point beats (faster and at least as good), by speedup."""
    out: list[tuple[float, float]] = []
    for s, q in sorted(points, key=lambda p: (-p[0], -p[1])):
        if not out or q > out[-1][1]:
            out.append((s, q))
    return out[::-1]


def psnr_at(points: list[tuple[float, float]], speedup: float) -> float | None:
    """A method's PSNR at ``speedup`` by DESIGN § 6: linear interpolation along its envelope of
    (speedup, psnr) settings; ``None`` when no setting reaches that speedup. Below the slowest
    setting, that setting's PSNR."""
    env = [(s, q) for s, q in envelope(points) if math.isfinite(q)]
    if not env or speedup > env[-1][0]:
        return None
    if speedup <= env[0][0]:
        return env[0][1]
    for (s0, q0), (s1, q1) in zip(env, env[1:]):
        if s0 <= speedup <= s1:
            return q0 + (q1 - q0) * (speedup - s0) / (s1 - s0)
    return None


SPEEDUP_KEYS = {"speedup": "speedup", "denoiser_speedup": "denoiser speedup"}


def compare_families(result: dict, family: str, speedups: tuple[float, ...] = (2.0, 2.5),
                     peers: tuple[str, ...] | None = None, key: str = "speedup") -> dict:
    """PSNR of ``family`` minus each other family's (or each of ``peers``) at each speedup (``None`` for
    a peer that cannot reach it: it counts as below). Returns ``{speedup: {"ours": psnr, "peers": {family: psnr},
    "margin": ours - best reachable peer}}``.

    ``key`` picks the speedup the curves are drawn along: ``"speedup"`` (end to end, DESIGN § 6's rule)
    or ``"denoiser_speedup"`` (the denoiser alone; for a model whose VAE decode dominates the latency,
    where no cache reaches the compared speedups end to end).
    """
    if key not in SPEEDUP_KEYS:
        raise ValueError(f"key must be one of {sorted(SPEEDUP_KEYS)}, got {key!r}")
    groups: dict[str, list[tuple[float, float]]] = {}
    for row in result["rows"]:
        if row["name"] != "baseline":
            groups.setdefault(row.get("family") or row["name"].split(" ")[0], []).append((row[key], row["psnr"]))
    if family not in groups:
        raise ValueError(f"no rows of family {family!r}; families: {sorted(groups)}")
    out = {}
    for s in speedups:
        ours = psnr_at(groups[family], s)
        peers_at = {f: psnr_at(p, s) for f, p in groups.items() if f != family and (peers is None or f in peers)}
        reachable = [v for v in peers_at.values() if v is not None]
        margin = None if ours is None else (ours - max(reachable) if reachable else math.inf)
        out[s] = {"ours": ours, "peers": peers_at, "margin": margin}
    return out


def comparison_markdown(comparison: dict, family: str, key: str = "speedup") -> str:
    peers = sorted({f for v in comparison.values() for f in v["peers"]})
    head = [SPEEDUP_KEYS[key], f"{family} PSNR", *[f"{p} PSNR" for p in peers], "margin over best peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for s, v in comparison.items():
        cells = [f"{s:g}×", _fmt(v["ours"]), *[_fmt(v["peers"][p]) if v["peers"][p] is not None else "cannot reach"
                                                for p in peers], _fmt(v["margin"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value, digits=2):
    if value is None:
        return "–"
    if isinstance(value, float) and math.isinf(value):
        return "∞ (identical)"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_table(result: dict) -> str:
    extra = result.get("scorers", [])
    head = ["method", "latency (s)", "speedup", "denoiser (s)", "denoiser speedup", "PSNR (dB)", "SSIM",
            "skipped", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result["rows"]:
        name = row["name"] + (" (diffusers)" if row.get("peer") else "")
        cells = [name, _fmt(row["latency_s"], 4), f"{row['speedup']:.3f}×", _fmt(row["denoiser_s"], 4),
                 f"{row['denoiser_speedup']:.3f}×", _fmt(row["psnr"]), _fmt(row["ssim"], 4),
                 f"{100 * row['skipped_fraction']:.1f}%", *(_fmt(row.get(k), 3) for k in extra)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_results(result: dict, path: str | os.PathLike) -> None:
    """Speedup vs PSNR, one line per family (identical outputs drawn at the top of the axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups: dict[str, list[tuple[float, float]]] = {}
    for row in result["rows"]:
        if row["name"] != "baseline" and row["psnr"] is not None and math.isfinite(row["psnr"]):
            groups.setdefault(row.get("family") or row["name"].split(" ")[0], []).append((row["speedup"], row["psnr"]))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, (family, points) in enumerate(sorted(groups.items())):
        points.sort()
        ax.plot(*zip(*points), marker="os^vD<>"[k % 7], lw=1.2 if family != "ECAD" else 2.2, label=family)
    ax.set_xlabel("speedup (end-to-end, measured)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title(f"{result['suite']}: {result['hardware'].get('gpu') or result['hardware']['cpu_model']}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _json_safe(value):
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    return value


def write_report(result: dict, markdown: str, out_dir: str | os.PathLike, stem: str) -> Path:
    """Write ``STEM.json`` (the result) and ``STEM.md`` (``markdown``) into ``out_dir``; returns the JSON path."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stem}.json"
    path.write_text(json.dumps(_json_safe(result), indent=2) + "\n")
    path.with_suffix(".md").write_text(markdown)
    return path


def write_results(result: dict, out_dir: str | os.PathLike = "benchmarks/results", command: str = "") -> Path:
    """Write ``SUITE.json`` and ``SUITE.md``; returns the JSON path. PSNR ``null`` = identical output."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = dict(result, command=command)
    path = out_dir / f"{result['suite']}.json"
    path.write_text(json.dumps(_json_safe(result), indent=2) + "\n")
    hw = result["hardware"]
    md = [
        f"# Benchmark `{result['suite']}`", "",
        f"Command: `{command}`" if command else "",
        f"Model: {result['pipeline_class']} / {result['model_class']}, {result['dtype']} on {result['device']}; "
        f"{hw.get('gpu') or hw['cpu_model']} ({hw['cpu_cores']} cores); torch {hw['torch']}, "
        f"diffusers {hw.get('diffusers')}.",
        f"{len(result['prompts'])} prompts for quality; median of {result['runs']} timed runs after "
        f"{result['warmup']} warm-up; speedups are ratios within this run.",
        "", result["table"], "",
    ]
    if result.get("comparison_md"):
        md += ["PSNR at equal speedup (interpolated along each method's settings; DESIGN § 6):", "",
               result["comparison_md"], ""]
    if result.get("notes"):
        md += [result["notes"], ""]
    if len(result["rows"]) > 2:
        plot_results(result, out_dir / f"{result['suite']}.png")
    (out_dir / f"{result['suite']}.md").write_text("\n".join(md))
    return path
