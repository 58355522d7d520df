"""NSGA-II search for ECAD schedules: a Pareto frontier of cost vs fidelity on calibration prompts.

    >>> from caching.ecad_search import SearchSettings, search
    >>> from pipelines.tiny import build_tiny
    >>> pipe = build_tiny("pixart")
    >>> result = search(pipe, ["a red circle", "a blue square"], "/tmp/ecad-demo",
    ...                 SearchSettings(pop_size=8, generations=2, cost="macs"),
    ...                 call_kwargs=pipe.tiny_call_kwargs, progress=False)
    >>> len(result["frontier"]) >= 1
    True

How it works (spec: ``shared/specs/ecad.md``):

* **Genome**: the schedule bits of steps 1..N-1 (step 0 always computes), flattened step-major
  over the adapter's slots. pymoo's ``NSGA2`` evolves it with ``PointCrossover`` (4 points) and
  ``BitflipMutation``, duplicates removed, one constraint: at least one reused bit.
* **Objectives** (both minimised): ``-quality`` and ``cost``. Quality is a scorer's number on the
  calibration prompts (default: PSNR of the decoded output against the uncached output of the same
  seed, computed once and stored); any callable ``scorer(outputs, references, prompts) -> dict``
  works, and its other keys are recorded. Cost is MACs (measured once per slot with torch's flop
  counter, then analytic) or latency (each slot's measured time per step, then analytic).
* **Seeds**: every-N schedules (FORA-like) with and without warm-up, attention-only and
  feed-forward-only variants, cross-attention reuse late in sampling; bit-flipped copies fill the
  population.
* **Early rejection**: a candidate first runs prompt 0 alone; if an archived schedule that costs no
  more is better by ``reject_margin`` on that basis, the rest is skipped (its record says so and it
  never enters the frontier).
* **Checkpoints**: every evaluation is appended to ``evals.rank<k>.jsonl`` as it finishes, and
  ``generation.json`` is rewritten after each generation. ``resume=True`` replays the algorithm from
  its seed, taking every already-evaluated genome from those files, so a run killed at any point
  continues exactly where it stopped; resuming with more ``generations`` extends a finished search.
* **Confirmation** (optional, ``confirm=`` more prompts): a frontier picked on a few calibration
  prompts flatters itself (its members are the ones whose errors happened to be small there). After
  the generations, every fully evaluated schedule within ``confirm_within`` of the frontier is run on
  the extra prompts too, and the frontier is recomputed from the mean over all prompts. The extra
  evaluations are checkpointed in ``confirm.rank<k>.jsonl`` like the others.
* **Processes**: under ``accelerate launch`` (or any ``torch.distributed`` launcher) each process
  evaluates a contiguous share of the generation's new candidates; results are gathered in order and
  every process tells the same values to the same seeded algorithm, so the result equals a
  one-process run with the same seed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from accel import api, metrics
from accel.adapters import get_adapter
from accel.errors import ConfigError

from .ecad import ECADConfig, slot_names

FEED_FORWARD = ("ff", "ffn", "ff_context", "proj_mlp", "proj_out")
PSNR_CAP = 99.0  # identical outputs score this instead of inf (keeps the objective finite)

Scorer = Callable[[list, list, list], dict]


@dataclass
class SearchSettings:
    """Args:
        pop_size: NSGA-II population (the paper uses 72 on PixArt).
        generations: number of generations (including the initial one).
        seed: seeds pymoo's generator and the seed-population fill.
        cost: ``"macs"`` (analytic, from measured per-slot MACs) or ``"latency"`` (analytic, from
            measured per-slot time per step).
        quality: key of the scorer's result to maximise (``"psnr"`` by default).
        reject_margin: early-rejection margin in ``quality`` units (``None`` disables it).
        n_points / crossover_prob / mutation_prob: pymoo operator settings (paper: 4, 0.9, 0.05).
        image_seed: generator seed of calibration prompt ``i`` is ``image_seed + i``.
        profile_seeds: also seed (first) with step masks built from the uncached run's block-stack
            residuals (ERTACache's greedy rule at every reuse count; all components follow the mask).
            Off by default: on shapes-t2i it gave no better frontier by generation 18.
        speedup_range: ``(lo, hi)``: only schedules whose estimated speedup (by ``cost``) lies in
            [lo, hi] are run; the others are infeasible to NSGA-II (a constraint, by their distance
            to the band) and cost no generation, so the whole population refines that band.
        confirm_within: with confirmation prompts, the schedules re-run on them are those at most
            this far (``quality`` units) below the best schedule that costs no more.
        latency_threads: CPU threads while the components are timed for the latency cost model
            (``None``: the current setting). A multi-process CPU search runs each process on few
            threads; timed at one thread, shapes-t2i's estimates ran ~7 % above the speedups measured
            at two, so time at the thread count the schedules will run at.
    """

    pop_size: int = 72
    generations: int = 20
    seed: int = 0
    cost: str = "latency"
    quality: str = "psnr"
    reject_margin: float | None = 3.0
    n_points: int = 4
    crossover_prob: float = 0.9
    mutation_prob: float = 0.05
    image_seed: int = 0
    profile_seeds: bool = False
    speedup_range: tuple[float, float] | None = None
    latency_threads: int | None = None
    confirm_within: float = 0.75

    def __post_init__(self):
        if self.pop_size < 4 or self.generations < 1:
            raise ConfigError(f"need pop_size >= 4 and generations >= 1, got {self.pop_size}, {self.generations}")
        if self.cost not in ("macs", "latency"):
            raise ConfigError(f"cost must be 'macs' or 'latency', got {self.cost!r}")
        if self.speedup_range is not None:
            lo, hi = self.speedup_range = tuple(float(v) for v in self.speedup_range)
            if not 1.0 <= lo < hi:
                raise ConfigError(f"speedup_range must be (lo, hi) with 1 <= lo < hi, got {self.speedup_range}")
        if self.latency_threads is not None and self.latency_threads < 1:
            raise ConfigError(f"latency_threads must be >= 1, got {self.latency_threads}")
        if not self.confirm_within >= 0:
            raise ConfigError(f"confirm_within must be >= 0, got {self.confirm_within}")


# -- costs --------------------------------------------------------------------------------------
def _capture_step(pipe, prompt: str, call_kwargs: dict, seed: int) -> list[tuple[tuple, dict]]:
    """The denoiser calls of one step (one per CFG branch when cond/uncond are split)."""
    calls: list = []
    model = pipe.transformer
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        kwargs = dict(call_kwargs, num_inference_steps=2, output_type="latent")
        pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **kwargs)
    finally:
        handle.remove()
    return calls[: len(calls) // 2]


def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs):
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(q, k, v)


@torch.no_grad()
def measure_costs(pipe, prompt: str, call_kwargs: dict | None = None, seed: int = 0) -> dict:
    """MACs of one denoising step: ``base`` (everything outside the cacheable components) and each
    slot. Counted by torch's flop counter on the step's real inputs (CFG branches included)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = pipe.transformer
    calls = _capture_step(pipe, prompt, dict(call_kwargs or {}), seed)
    mapping = {}
    cpu_flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_flash is not None:  # torch's counter has no formula for the CPU flash kernel
        mapping[cpu_flash] = _sdpa_cpu_flops
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        for args, kwargs in calls:
            model(*args, **kwargs)
    flops = counter.get_flop_counts()
    root = type(model).__name__
    slots = {}
    for name in slot_names(model):
        slots[name] = sum(flops.get(f"{root}.{name}", {}).values()) / 2.0
    total = counter.get_total_flops() / 2.0
    return {"unit": "MACs per step", "base": total - sum(slots.values()), "slots": slots,
            "calls_per_step": len(calls)}


@torch.no_grad()
def measure_latency(pipe, prompt: str, call_kwargs: dict | None = None, seed: int = 0, runs: int = 2) -> dict:
    """Seconds per step: ``base`` (the generation's time outside cacheable components, per step) and
    each slot (mean over the runs), from timing hooks on an uncached generation. A slot's time
    includes its input norm's (skipped with it on reuse, :mod:`accel.reuse`)."""
    model = pipe.transformer
    call_kwargs = dict(call_kwargs or {})
    slots = get_adapter(model).slots(model)
    spent = {s.name: 0.0 for s in slots}
    start: dict = {}
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    handles = []
    for s in slots:
        def pre(module, args, name=s.name):
            sync()
            start[name] = time.perf_counter()

        def post(module, args, out, name=s.name):
            sync()
            spent[name] += time.perf_counter() - start[name]

        for module in (s.module, s.input_norm):
            if module is not None:
                handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        _generate(pipe, prompt, seed, call_kwargs)  # warm-up
        for k in spent:
            spent[k] = 0.0
        total = 0.0
        for _ in range(runs):
            sync()
            t0 = time.perf_counter()
            _generate(pipe, prompt, seed, call_kwargs)
            sync()
            total += time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    steps = _num_steps(pipe, call_kwargs)
    per_slot = {k: v / runs / steps for k, v in spent.items()}
    return {"unit": "seconds per step", "base": total / runs / steps - sum(per_slot.values()), "slots": per_slot,
            "total_s": total / runs}


def _num_steps(pipe, call_kwargs: dict) -> int:
    if "num_inference_steps" in call_kwargs:
        return int(call_kwargs["num_inference_steps"])
    import inspect

    default = inspect.signature(type(pipe).__call__).parameters.get("num_inference_steps")
    if default is None or not isinstance(default.default, int):
        raise ConfigError("pass num_inference_steps in call_kwargs")
    return default.default


class CostModel:
    """Analytic cost of a bit matrix from per-step ``base`` and per-slot costs (MACs or seconds)."""

    def __init__(self, table: dict, slots: list[str]):
        self.table = table
        self.base = float(table["base"])
        self.col = np.array([table["slots"][s] for s in slots], float)

    def __call__(self, bits: np.ndarray) -> float:
        bits = np.asarray(bits, bool).copy()
        bits[0] = True
        return float(len(bits) * self.base + (bits * self.col[None, :]).sum())


# -- seeds --------------------------------------------------------------------------------------
def seed_schedules(slots: list[str], num_steps: int,
                   cross_attention: tuple[str, ...] = ()) -> list[tuple[str, np.ndarray]]:
    """Hand-made starting points: (name, bits). FORA-like every-N (plain, with 2 warm-up steps,
    feed-forward always computed, attention only), and cross-attention reused late."""
    comps = np.array([s.rsplit(".", 1)[1] for s in slots])
    ff = np.isin(comps, FEED_FORWARD)
    out: list[tuple[str, np.ndarray]] = []

    def add(name: str, rows: np.ndarray, cached: np.ndarray) -> None:
        bits = rows[:, None] | ~cached[None, :]
        bits[0] = True
        if not bits.all() and not any((bits == b).all() for _, b in out):
            out.append((name, bits))

    steps = np.arange(num_steps)
    everything = np.ones(len(slots), bool)
    intervals = [n for n in (2, 3, 4, 5, 6, 7, 10, 20) if n < num_steps]
    # most promising first: the population keeps the first pop_size seeds
    for n in intervals[:5]:
        add(f"every {n} warm-up 2", (steps < 2) | ((steps - 2) % n == 0), everything)
    for growth in (0.5, 1.0, 1.5):  # computed steps at growing gaps: early steps matter most
        rows = np.zeros(num_steps, bool)
        at, gap = 0.0, 1.0
        while at < num_steps:
            rows[int(at)] = True
            at, gap = at + gap, gap + growth
        add(f"growing gaps +{growth}", rows, everything)
    for n in intervals:
        add(f"every {n}", steps % n == 0, everything)
        add(f"every {n}, ff always", steps % n == 0, ~ff)
        add(f"every {n}, ff only", steps % n == 0, ff)
    for n in intervals[:4]:
        add(f"every {n} warm-up 4", (steps < 4) | ((steps - 4) % n == 0), everything)
    if cross_attention:
        cross = np.isin(comps, cross_attention)
        for frac in (0.3, 0.5, 0.7):
            add(f"cross-attention reused after {frac:.0%}", steps < round(frac * num_steps), cross)
    return out


def _profile_seeds(pipe, prompts, call_kwargs, settings, work_dir: Path, state, n_slots: int):
    """Step masks from the residual profile of an uncached run (stored in ``profile_seeds.json``)."""
    from accelerate.utils import broadcast_object_list

    from .ertacache_profile import _blank, _call, _handle, delta_for_reuse, greedy_mask, relative_errors

    path = work_dir / "profile_seeds.json"
    masks = [None]
    if state.is_main_process:
        if not path.exists():
            steps = _num_steps(pipe, call_kwargs)
            residuals: list[dict] = [dict() for _ in range(steps)]
            blank = _blank(pipe, steps)
            kwargs = {**call_kwargs, "output_type": "latent"}
            with api.applying(pipe, blank):
                _handle(pipe, blank).state.record = (
                    lambda step, ctx, u, r: residuals[step].__setitem__(ctx, r.detach().float().cpu()))
                _call(pipe, prompts, kwargs, settings.image_seed)
            errors = relative_errors(residuals)
            found = []
            for reuse in range(2, steps - 2):
                mask = greedy_mask(errors, delta_for_reuse(errors, reuse, warmup=2), warmup=2)
                if mask not in found and "R" in mask:
                    found.append(mask)
            _atomic_json(path, found)
        masks = [json.loads(path.read_text())]
    if state.num_processes > 1:
        broadcast_object_list(masks)
    out = []
    for mask in masks[0]:
        rows = np.array([m == "C" for m in mask])
        out.append((f"residual profile {mask}", np.repeat(rows[:, None], n_slots, axis=1)))
    return out


def initial_population(seeds: list[np.ndarray], size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` genomes: the seeds (first ``size`` of them), then bit-flipped copies of them."""
    base = [s[1:].reshape(-1) for s in seeds]
    pop = [b.copy() for b in base[:size]]
    i = 0
    while len(pop) < size:
        child = base[i % len(base)].copy()
        flips = rng.random(child.shape) < rng.uniform(0.02, 0.15)
        child ^= flips
        if child.all():
            child[rng.integers(len(child))] = False
        if not any((child == p).all() for p in pop):
            pop.append(child)
        i += 1
    return np.array(pop, dtype=bool)


# -- evaluation ---------------------------------------------------------------------------------
def _generate(pipe, prompt: str, seed: int, call_kwargs: dict) -> torch.Tensor:
    out = pipe(prompt, generator=torch.Generator("cpu").manual_seed(seed), **call_kwargs)
    out = out.images if hasattr(out, "images") else out.frames
    return out.detach().float().cpu() if isinstance(out, torch.Tensor) else out


def fidelity_scorer(outputs: list, references: list, prompts: list) -> dict:
    """Default scorer: mean PSNR (uint8, capped at 99 dB) of each output against its reference."""
    values = [min(metrics.psnr(o, r), PSNR_CAP) for o, r in zip(outputs, references)]
    return {"psnr": float(np.mean(values))}


def _key(genome: np.ndarray) -> str:
    return np.packbits(genome.astype(np.uint8)).tobytes().hex() + f":{genome.size}"


class _Evaluator:
    def __init__(self, pipe, prompts, call_kwargs, settings: SearchSettings, references, scorer, costs, slots):
        self.pipe, self.prompts, self.call_kwargs = pipe, prompts, call_kwargs
        self.settings, self.references, self.scorer = settings, references, scorer
        self.slots = slots
        self.steps = _num_steps(pipe, call_kwargs)
        self.macs = CostModel(costs["macs"], slots)
        self.latency = CostModel(costs["latency"], slots)
        self.base_latency = self.latency(np.ones((self.steps, len(slots)), bool))
        self.base_macs = self.macs(np.ones((self.steps, len(slots)), bool))

    def bits(self, genome: np.ndarray) -> np.ndarray:
        rows = genome.reshape(self.steps - 1, len(self.slots))
        return np.vstack([np.ones((1, len(self.slots)), bool), rows])

    def costs(self, bits: np.ndarray) -> dict:
        """Analytic MACs and latency of a schedule and the speedups they give (no generation)."""
        macs, latency = self.macs(bits), self.latency(bits)
        return {"macs": macs, "latency_s": latency, "macs_speedup": self.base_macs / macs,
                "speedup": self.base_latency / latency}

    def estimate(self, genome: np.ndarray) -> float:
        """Estimated speedup of a genome by the search's cost model."""
        return self.costs(self.bits(genome))["macs_speedup" if self.settings.cost == "macs" else "speedup"]

    def cost(self, record: dict) -> float:
        return record["macs"] / 1e9 if self.settings.cost == "macs" else record["latency_s"]

    def run(self, genome: np.ndarray, front: list[tuple[float, float]]) -> dict:
        """Evaluate one genome; ``front`` is (cost, quality) of the archive at generation start."""
        bits = self.bits(genome)
        config = ECADConfig.from_bits(self.pipe, bits)
        record = {"key": _key(genome), **self.costs(bits)}
        cost, q = self.cost(record), self.settings.quality
        outputs = []
        with api.applying(self.pipe, config):
            for i, prompt in enumerate(self.prompts):
                outputs.append(_generate(self.pipe, prompt, self.settings.image_seed + i, self.call_kwargs))
                if i == 0 and len(self.prompts) > 1 and self.settings.reject_margin is not None:
                    first = self.scorer(outputs, self.references[:1], self.prompts[:1])
                    if any(c <= cost and fq >= first[q] + self.settings.reject_margin for c, fq in front):
                        record.update(first, rejected=True)
                        return record
        record.update(self.scorer(outputs, self.references, self.prompts), rejected=False)
        if not math.isfinite(record[q]):
            raise ConfigError(f"scorer returned {q}={record[q]} (outputs may contain NaNs)")
        return record


# -- the archive and the frontier ----------------------------------------------------------------
def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (cost, quality) no other point beats: cost lower-or-equal and quality
    higher-or-equal with one strict. Sorted by cost."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _read_evals(work_dir: Path, pattern: str = "evals.rank*.jsonl") -> dict[str, dict]:
    memo: dict[str, dict] = {}
    for path in sorted(work_dir.glob(pattern)):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # the half-written last line of a killed process
            memo[record["key"]] = record
    return memo


def _atomic_json(path: Path, data) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


def _state():
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def _as_stored(settings: SearchSettings) -> dict:
    """The settings as ``search.json`` holds them (JSON: tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def check_costs(costs: dict, slots: list[str], source: str = "costs") -> dict:
    """A cost table (``costs.json`` of a search) validated against this denoiser's slots."""
    if not isinstance(costs, dict) or not all(isinstance(costs.get(k), dict) for k in ("macs", "latency")):
        raise ConfigError(f"{source}: expected a search's costs.json with 'macs' and 'latency' tables")
    for kind in ("macs", "latency"):
        table = costs[kind]
        have = table.get("slots")
        if not isinstance(have, dict) or sorted(have) != sorted(slots):
            raise ConfigError(f"{source}: the {kind} table's slots do not match this denoiser's {len(slots)} slots")
        values = [table.get("base"), *have.values()]
        if not all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for v in values):
            raise ConfigError(f"{source}: the {kind} table holds a missing, negative or non-finite cost")
    return costs


# settings a resumed search may change: more generations continue the same trajectory, and a
# confirmation stage can follow a finished search; any other change would alter the trajectory
_RESUMABLE = ("generations", "confirm_within")


def _save_references(pipe, prompts, first_seed: int, call_kwargs, path: Path) -> None:
    refs = [_generate(pipe, p, first_seed + i, call_kwargs) for i, p in enumerate(prompts)]
    save_file({f"ref{i}": r.contiguous() for i, r in enumerate(refs)}, str(path))


def _load_references(path: Path, n: int) -> list:
    stored = load_file(str(path))
    return [stored[f"ref{i}"] for i in range(n)]


def _prepare(pipe, prompts, call_kwargs, settings, work_dir: Path, resume: bool, state,
             given_costs: dict | None = None) -> tuple[list, dict]:
    """References and cost tables: computed once (main process) and stored, or read back on resume.
    ``given_costs`` (a previous search's table) is stored instead of measuring one."""
    from accelerate.utils import broadcast_object_list

    meta = {"settings": _as_stored(settings), "prompts": list(prompts),
            "call_kwargs": {k: v for k, v in call_kwargs.items() if isinstance(v, (int, float, str, bool))},
            "model_class": type(pipe.transformer).__name__, "slots": slot_names(pipe)}
    search_file = work_dir / "search.json"
    if state.is_main_process:
        work_dir.mkdir(parents=True, exist_ok=True)
        if search_file.exists() and not resume:
            raise ConfigError(f"{work_dir} already holds a search; pass resume=True (--resume) or another directory")
        if resume and search_file.exists():
            old = json.loads(search_file.read_text())
            # a setting added after the search was stored takes its default (its behaviour then)
            old["settings"] = {**_as_stored(SearchSettings()), **old.get("settings", {})}
            for key in _RESUMABLE:
                old["settings"].pop(key, None)
            now = {**meta, "settings": {k: v for k, v in meta["settings"].items() if k not in _RESUMABLE}}
            if {k: old.get(k) for k in now} != now:
                diff = [k for k in now if old.get(k) != now[k]]
                raise ConfigError(f"{search_file}: cannot resume, {', '.join(diff)} differ from the stored search")
        ref_file, cost_file = work_dir / "references.safetensors", work_dir / "costs.json"
        if given_costs is not None:
            if cost_file.exists() and json.loads(cost_file.read_text()) != given_costs:
                raise ConfigError(f"{cost_file}: this search was made with another cost table")
            if not cost_file.exists():
                _atomic_json(cost_file, given_costs)
        if not ref_file.exists():
            _save_references(pipe, prompts, settings.image_seed, call_kwargs, ref_file)
        if not cost_file.exists():
            threads = torch.get_num_threads()
            timed_at = settings.latency_threads or threads
            torch.set_num_threads(timed_at)
            try:
                costs = {"macs": measure_costs(pipe, prompts[0], call_kwargs, settings.image_seed),
                         "latency": measure_latency(pipe, prompts[0], call_kwargs, settings.image_seed)}
            finally:
                torch.set_num_threads(threads)
            costs["latency"]["threads"] = timed_at
            _atomic_json(cost_file, costs)
        _atomic_json(search_file, meta)
    state.wait_for_everyone()
    shared = [None, None]
    if state.is_main_process:
        shared = [_load_references(work_dir / "references.safetensors", len(prompts)),
                  json.loads((work_dir / "costs.json").read_text())]
    if state.num_processes > 1:
        broadcast_object_list(shared)
    return shared[0], shared[1]


def search(pipe, prompts: list[str], work_dir: str | os.PathLike, settings: SearchSettings | None = None, *,
           call_kwargs: dict | None = None, scorer: Scorer | None = None, resume: bool = False,
           progress: bool = True, confirm: list[str] | None = None, costs: dict | None = None) -> dict:
    """Run (or resume) the search; returns ``{"frontier": [...records], "archive": n, ...}`` and
    writes the frontier with :func:`write_frontier` on the main process. ``confirm``: extra prompts
    (disjoint from ``prompts``) the near-frontier schedules are re-scored on before the frontier is
    drawn (module docstring). ``costs``: a previous search's ``costs.json`` to reuse instead of
    timing the components again (two searches with one table and one seed give one frontier)."""
    from pymoo.algorithms.moo.nsga2 import NSGA2
    from pymoo.core.evaluator import Evaluator
    from pymoo.core.problem import Problem
    from pymoo.operators.crossover.pntx import PointCrossover
    from pymoo.operators.mutation.bitflip import BitflipMutation
    from pymoo.problems.static import StaticProblem

    settings = settings or SearchSettings()
    if not prompts:
        raise ConfigError("the search needs at least one calibration prompt")
    call_kwargs = dict(call_kwargs or {})
    call_kwargs.setdefault("output_type", "pt")
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)
    if api.applied(pipe):
        raise ConfigError("remove the plug-ins applied to the pipeline before searching (accel.remove(pipe))")
    work_dir = Path(work_dir)
    state = _state()
    slots = slot_names(pipe)
    steps = _num_steps(pipe, call_kwargs)
    if steps < 2:
        raise ConfigError("an ECAD search needs at least 2 denoising steps")
    if costs is not None:
        costs = check_costs(costs, slots)
    references, costs = _prepare(pipe, prompts, call_kwargs, settings, work_dir, resume, state, costs)
    evaluator = _Evaluator(pipe, prompts, call_kwargs, settings, references, scorer or fidelity_scorer, costs, slots)
    memo = _read_evals(work_dir) if resume else {}

    adapter = get_adapter(pipe.transformer)
    cross = tuple(c for g in adapter.groups for c in g.cross_attention)
    seeds = seed_schedules(slots, steps, cross)
    if settings.profile_seeds:
        seeds = _profile_seeds(pipe, prompts, call_kwargs, settings, work_dir, state, len(slots)) + seeds
    rng = np.random.default_rng(settings.seed)
    x0 = initial_population([b for _, b in seeds], settings.pop_size, rng)
    seed_names = {_key(b[1:].reshape(-1)): name for name, b in seeds}

    n_var = (steps - 1) * len(slots)
    problem = Problem(n_var=n_var, n_obj=2, n_ieq_constr=2, xl=0, xu=1, vtype=bool)
    algorithm = NSGA2(pop_size=settings.pop_size, sampling=x0,
                      crossover=PointCrossover(n_points=settings.n_points, prob=settings.crossover_prob),
                      mutation=BitflipMutation(prob=settings.mutation_prob), eliminate_duplicates=True)
    algorithm.setup(problem, termination=("n_gen", settings.generations), seed=settings.seed, verbose=False)

    log = open(work_dir / f"evals.rank{state.process_index}.jsonl", "a")  # noqa: SIM115
    from tqdm.auto import tqdm

    bar = tqdm(total=settings.generations, desc="ECAD generations", disable=not (progress and state.is_main_process))
    generation = 0
    try:
        while algorithm.has_next():
            pop = algorithm.ask()
            genomes = np.asarray(pop.get("X"), dtype=bool)
            keys = [_key(g) for g in genomes]
            # distance outside the speedup band (<= 0 inside): out-of-band genomes are not run
            band = np.zeros(len(genomes))
            if settings.speedup_range is not None:
                lo, hi = settings.speedup_range
                est = np.array([evaluator.estimate(g) for g in genomes])
                band = np.maximum(lo - est, est - hi)
            todo = [i for i, k in enumerate(keys) if k not in memo and band[i] <= 0]
            done = [r for r in memo.values() if not r.get("rejected")]
            front = [(evaluator.cost(r), r[settings.quality]) for r in done]
            new = _evaluate_share(evaluator, genomes, todo, front, state, log, generation, progress and bool(todo))
            for record in new:
                memo[record["key"]] = record
            records = [memo.get(k) for k in keys]  # None: outside the band, not run
            quality = np.array([r[settings.quality] if r else 0.0 for r in records], float)
            cost = np.array([evaluator.cost(r) if r else 0.0 for r in records], float)
            F = np.column_stack([-quality, cost])
            G = np.column_stack([1.0 - (~genomes).sum(axis=1), band])  # at least one reused bit; in the band
            Evaluator().eval(StaticProblem(problem, F=F, G=G), pop)
            algorithm.tell(infills=pop)
            generation += 1
            if state.is_main_process:
                _atomic_json(work_dir / "generation.json", {
                    "generation": generation, "evaluated": len(memo),
                    "population": [{"key": k, "F": list(map(float, f))} for k, f in zip(keys, F)]})
            bar.update()
            bar.set_postfix(evaluated=len(memo))
    finally:
        log.close()
        bar.close()
    for record in memo.values():
        record.setdefault("seed", seed_names.get(record["key"]))
    confirmed = 0
    if confirm:
        memo = _confirm(evaluator, memo, list(confirm), work_dir, state, progress)
        confirmed = len(confirm)
    result = _summarise(memo, evaluator, settings, seed_names)
    result["confirm_prompts"] = confirmed
    if state.is_main_process:
        write_frontier(result, evaluator, work_dir, pipe, settings)
    state.wait_for_everyone()
    return result


def _evaluate_share(evaluator, genomes, todo, front, state, log, generation, progress) -> list[dict]:
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    mine = todo
    if state.num_processes > 1:
        with state.split_between_processes(todo) as share:
            mine = list(share)
    out = []
    for i in tqdm(mine, desc=f"generation {generation}", leave=False, disable=not (progress and state.is_main_process)):
        record = evaluator.run(genomes[i], front)
        record["generation"] = generation
        log.write(json.dumps(record) + "\n")
        log.flush()
        out.append(record)
    if state.num_processes > 1:
        out = gather_object(out)
    return out


def near_frontier(records: list[dict], cost, quality: str, within: float) -> list[dict]:
    """Records at most ``within`` below the best quality among records that cost no more."""
    best, out = -math.inf, []
    for r in sorted(records, key=lambda r: (cost(r), -r[quality])):
        best = max(best, r[quality])
        if r[quality] >= best - within:
            out.append(r)
    return out


def _confirm(evaluator: _Evaluator, memo: dict, prompts: list[str], work_dir: Path, state, progress) -> dict:
    """Re-score the near-frontier schedules on ``prompts``; returns the memo with their scores
    replaced by the mean over calibration and confirmation prompts (``<key>_search`` keeps the first)."""
    from accelerate.utils import broadcast_object_list, gather_object
    from tqdm.auto import tqdm

    settings = evaluator.settings
    overlap = set(prompts) & set(evaluator.prompts)
    if overlap:
        raise ConfigError(f"confirmation prompts must differ from the calibration prompts; "
                          f"shared: {sorted(overlap)[:3]}")
    first_seed = settings.image_seed + len(evaluator.prompts)
    meta_file, ref_file = work_dir / "confirm.json", work_dir / "confirm_references.safetensors"
    if state.is_main_process:
        meta = {"prompts": prompts, "first_seed": first_seed}
        if meta_file.exists() and json.loads(meta_file.read_text()) != meta:
            raise ConfigError(f"{meta_file}: this search was confirmed on other prompts; use another work dir "
                              f"or delete confirm.* to re-confirm")
        if not (meta_file.exists() and ref_file.exists()):
            _save_references(evaluator.pipe, prompts, first_seed, evaluator.call_kwargs, ref_file)
            _atomic_json(meta_file, meta)
    state.wait_for_everyone()
    shared = [_load_references(ref_file, len(prompts)) if state.is_main_process else None]
    if state.num_processes > 1:
        broadcast_object_list(shared)
    tables = {"macs": evaluator.macs.table, "latency": evaluator.latency.table}
    checker = _Evaluator(evaluator.pipe, prompts, evaluator.call_kwargs,
                         dataclasses.replace(settings, reject_margin=None, image_seed=first_seed),
                         shared[0], evaluator.scorer, tables, evaluator.slots)
    done = _read_evals(work_dir, "confirm.rank*.jsonl")
    full = [r for r in memo.values() if not r.get("rejected")]
    chosen = near_frontier(full, evaluator.cost, settings.quality, settings.confirm_within)
    todo = [r["key"] for r in chosen if r["key"] not in done]
    # ``chosen`` runs from the cheapest (fastest to generate) to the dearest: deal it out round-robin
    # so each process's contiguous share holds both ends
    n_proc = state.num_processes
    todo = [todo[i] for rank in range(n_proc) for i in range(rank, len(todo), n_proc)]
    mine = todo
    if state.num_processes > 1:
        with state.split_between_processes(todo) as share:
            mine = list(share)
    new = []
    with open(work_dir / f"confirm.rank{state.process_index}.jsonl", "a") as log:
        for key in tqdm(mine, desc=f"confirming on {len(prompts)} more prompts",
                        disable=not (progress and state.is_main_process)):
            record = checker.run(_unkey(key), [])
            log.write(json.dumps(record) + "\n")
            log.flush()
            new.append(record)
    if state.num_processes > 1:
        new = gather_object(new)
    done.update({r["key"]: r for r in new})
    n1, n2 = len(evaluator.prompts), len(prompts)
    not_scores = {"key", "rejected", "generation", "macs", "latency_s", "macs_speedup", "speedup"}
    # the others were not re-run: they stay in the archive but leave the frontier's candidates
    out = {key: r if r.get("rejected") else {**r, "unconfirmed": True} for key, r in memo.items()}
    for r in chosen:
        extra = done[r["key"]]
        merged = {**r, "confirmed": True}
        for name in extra.keys() - not_scores:
            if isinstance(r.get(name), (int, float)) and not isinstance(r.get(name), bool):
                merged[f"{name}_search"] = r[name]
                merged[name] = (n1 * r[name] + n2 * extra[name]) / (n1 + n2)
        out[r["key"]] = merged
    return out


def _summarise(memo: dict, evaluator: _Evaluator, settings: SearchSettings, seed_names: dict) -> dict:
    records = [r for r in memo.values() if not r.get("rejected")]
    candidates = [r for r in records if not r.get("unconfirmed")]
    points = [(evaluator.cost(r), r[settings.quality]) for r in candidates]
    frontier = [candidates[i] for i in pareto_front(points)]
    seeds = [r for r in records if r["key"] in seed_names]
    for r in seeds:
        r["seed"] = seed_names[r["key"]]
    return {"frontier": frontier, "seeds": seeds, "archive": len(memo),
            "rejected": sum(1 for r in memo.values() if r.get("rejected")), "records": records}


# -- outputs ------------------------------------------------------------------------------------
def write_frontier(result: dict, evaluator: _Evaluator, work_dir: Path, pipe, settings: SearchSettings) -> None:
    """Schedule files, ``frontier.md`` and ``frontier.png`` under ``work_dir/frontier``."""
    out = work_dir / "frontier"
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.json"):
        old.unlink()
    resolution = _resolution(evaluator.references[0])
    rows = []
    for k, record in enumerate(result["frontier"]):
        genome = _unkey(record["key"])
        prov = {key: record[key] for key in record if key not in ("key",)}
        prov.update(made_by="ECAD NSGA-II search", search=dataclasses.asdict(settings),
                    calibration_prompts=len(evaluator.prompts) + result.get("confirm_prompts", 0))
        cfg = ECADConfig.from_bits(pipe, evaluator.bits(genome), resolution=resolution, provenance=prov)
        name = f"{k:02d}_speedup{record['speedup']:.2f}_{settings.quality}{record[settings.quality]:.1f}.json"
        cfg.save(out / name)
        rows.append((name, record))
    lines = [f"# ECAD frontier ({len(rows)} schedules from {result['archive']} evaluated, "
             f"{result['rejected']} rejected early)", "",
             f"Cost model: {settings.cost}; quality: {settings.quality} on {len(evaluator.prompts)} "
             "calibration prompts"
             + (f", the schedules within {settings.confirm_within:g} of the frontier re-scored on "
                f"{result['confirm_prompts']} more (quality = mean over all)" if result.get("confirm_prompts") else "")
             + ". "
             "Speedups are the cost model's estimates; measure them with `accel bench`.", "",
             f"| schedule | est. speedup | MACs speedup | {settings.quality} | generation |", "|---|---|---|---|---|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['speedup']:.2f}× | {r['macs_speedup']:.2f}× | {r[settings.quality]:.2f} | "
                     f"{r.get('generation', '')} |")
    (out / "frontier.md").write_text("\n".join(lines) + "\n")
    plot_search(result, settings, out / "frontier.png")


def _unkey(key: str) -> np.ndarray:
    hexbits, n = key.split(":")
    return np.unpackbits(np.frombuffer(bytes.fromhex(hexbits), np.uint8))[: int(n)].astype(bool)


def _resolution(reference) -> list[int] | None:
    if isinstance(reference, torch.Tensor) and reference.ndim >= 3:
        return [int(reference.shape[-2]), int(reference.shape[-1])]
    return None


def plot_search(result: dict, settings: SearchSettings, path: Path, peers: list[tuple[str, float, float]] = ()) -> None:
    """Archive, frontier and the every-N seeds (plus any ``peers`` as (name, speedup, quality))."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    q = settings.quality
    fig, ax = plt.subplots(figsize=(7, 4.5))
    recs = result["records"]
    ax.scatter([r["speedup"] for r in recs], [r[q] for r in recs], s=6, c="0.75", label="evaluated")
    front = result["frontier"]
    ax.plot([r["speedup"] for r in front], [r[q] for r in front], "o-", c="C3", ms=4, label="ECAD frontier")
    every = [r for r in result["seeds"] if r["seed"].startswith("every ") and "," not in r["seed"]]
    ax.scatter([r["speedup"] for r in every], [r[q] for r in every], marker="s", c="C0", s=25, label="every-N seeds")
    for name, speedup, quality in peers:
        ax.scatter([speedup], [quality], marker="^", s=40, label=name)
    ax.set_xlabel(f"speedup ({settings.cost} model)")
    ax.set_ylabel(q)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heatmap(config: ECADConfig, path: str | os.PathLike) -> None:
    """A PNG of the schedule: steps down, slots across (blocks grouped), dark = recompute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bits = config.effective_bits()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.12 * bits.shape[1] + 2), max(3.0, 0.22 * bits.shape[0] + 1.5)))
    ax.imshow(bits, cmap="Greys", vmin=0, vmax=1.4, aspect="auto", interpolation="nearest")
    comps = [s.rsplit(".", 1)[1] for s in config.slots]
    blocks = [s.rsplit(".", 1)[0] for s in config.slots]
    edges = [j for j in range(1, len(blocks)) if blocks[j] != blocks[j - 1]]
    for j in edges:
        ax.axvline(j - 0.5, c="C0", lw=0.5)
    if len(set(comps)) * len(set(blocks)) <= 60:
        ax.set_xticks(range(len(comps)), comps, rotation=90, fontsize=6)
    ax.set_ylabel("step")
    ax.set_xlabel("slot (block boundaries in blue)")
    ax.set_title(f"{config.model_class}: {bits.mean():.0%} recompute", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(config: ECADConfig) -> str:
    """A text summary: shape, recompute fraction per component and per step."""
    bits = config.effective_bits()
    lines = [f"{config.model_class}: {config.num_steps} steps x {len(config.slots)} slots, "
             f"{bits.mean():.1%} recompute (step 0 always computes)"]
    if config.resolution:
        lines.append(f"searched at {config.resolution[0]}x{config.resolution[1]}, scheduler {config.scheduler}")
    for comp, count in config.computations().items():
        total = sum(1 for s in config.slots if s.endswith("." + comp)) * config.num_steps
        lines.append(f"  {comp:>12}: {count}/{total} computed")
    lines.append("  per step: " + " ".join(f"{row.mean():.0%}" for row in bits))
    for key in ("speedup", "macs_speedup", "psnr", "generation", "made_by"):
        if key in config.provenance:
            lines.append(f"  {key}: {config.provenance[key]}")
    return "\n".join(lines)


__all__ = ["SearchSettings", "search", "default_prompts", "measure_costs", "measure_latency", "CostModel",
           "seed_schedules",
           "initial_population", "fidelity_scorer", "pareto_front", "plot_search", "heatmap", "summary"]


def default_prompts() -> list[str]:
    """The shipped calibration prompts for user models (16 varied scenes and styles)."""
    from importlib.resources import files

    text = files("caching").joinpath("data/calibration_prompts.txt").read_text()
    return [line.strip() for line in text.splitlines() if line.strip()]


def shipped_schedules(name: str, kind: str = "schedules", cls=ECADConfig) -> list:
    """Config files shipped for a reference model: ECAD frontiers in ``caching/schedules/NAME/``,
    ERTACache profiles in ``caching/profiles/NAME/`` (``kind="profiles"``, ``cls=ERTACacheConfig``)."""
    from importlib.resources import files

    folder = files("caching").joinpath(kind, name)
    if not folder.is_dir():
        return []
    return [cls.from_dict(json.loads(p.read_text()), source=str(p))
            for p in sorted(folder.iterdir(), key=lambda p: p.name) if p.name.endswith(".json")]
