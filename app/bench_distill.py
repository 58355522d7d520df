"""``accel bench one-step``: distilled one-step students against their 20-step teacher.

    $ accel bench one-step --path dmd=runs/dmd/pipeline --prompts 200
    $ accel bench one-step --path dmd=runs/dmd/pipeline,msd=runs/msd/pipeline --threads 2

Quality: the shapes evaluator on the first N held-out prompts (seed i for prompt i, the teacher at
its default 20 steps and CFG, each student in one step without CFG): per-attribute adherence, the
fully-correct rate (``evaluator_accuracy``) and the Fréchet distance to real renders. Speed, batch 1,
median over ``runs`` interleaved rounds of a few prompts: end-to-end latency and *denoiser time*
(wall time inside the transformer's forward calls, measured by forward hooks). Ratios are within
this run. A student folder with ``router.json`` loads as a multi-student pipeline.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from accel.bench import hardware


class _DenoiserClock:
    """Sums the wall time spent inside the forward calls of some modules (hooks, removable)."""

    def __init__(self, modules):
        self.total, self.calls, self._start, self._handles = 0.0, 0, None, []
        for m in modules:
            self._handles.append(m.register_forward_pre_hook(self._pre))
            self._handles.append(m.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._start = time.perf_counter()

    def _post(self, module, args, output):
        self.total += time.perf_counter() - self._start
        self.calls += 1

    def reset(self):
        self.total, self.calls = 0.0, 0

    def remove(self):
        for h in self._handles:
            h.remove()


def _load_student(path: str):
    from pipelines.one_step import MultiStudentPipeline, OneStepPixArtPipeline

    p = Path(path)
    if not p.is_dir():
        raise SystemExit(f"student pipeline folder not found: {path}")
    if (p / "router.json").exists():
        pipe = MultiStudentPipeline.from_pretrained(p)
        return pipe, list(pipe.students)
    pipe = OneStepPixArtPipeline.from_pretrained(p)
    pipe.transformer.eval()
    return pipe, [pipe.transformer]


def _parse_paths(spec: str) -> list[tuple[str, str]]:
    out = []
    for i, item in enumerate(s for s in spec.split(",") if s.strip()):
        label, _, path = item.partition("=") if "=" in item else (f"student {i}", "", item)
        out.append((label.strip(), path.strip()))
    if not out:
        raise SystemExit("--path needs at least one student pipeline folder (LABEL=PATH, comma-separated)")
    return out


def run(paths: str, teacher: str = "shapes-t2i", n: int = 200, runs: int = 5, timing_prompts: int = 4,
        progress: bool = True) -> dict:
    from pipelines.zoo import load_reference
    from pipelines.zoo.scoring import EVAL_CALL, evaluate_pipeline, heldout_prompts

    rows = [("teacher (20 steps, CFG)", load_reference(teacher), {}, None)]
    for label, path in _parse_paths(paths):
        pipe, nets = _load_student(path)
        rows.append((label, pipe, {"num_inference_steps": 1, "guidance_scale": 1.0}, nets))
    rows[0] = rows[0][:3] + ([rows[0][1].transformer],)
    results = []
    for label, pipe, call, _ in rows:
        pipe.set_progress_bar_config(disable=True)
        report, _ = evaluate_pipeline(pipe, teacher, n=n, progress=progress, **call)
        results.append({"method": label, "call": {**EVAL_CALL[teacher], **call},
                        "adherence": report["overall"], "evaluator_accuracy": report["image_accuracy"],
                        "attributes": report["attributes"], "frechet": report["frechet"],
                        "real_frechet_floor": report["real_frechet_floor"]})
    prompts = heldout_prompts(teacher, timing_prompts)
    clocks = [_DenoiserClock(nets) for *_, nets in rows]
    lat: list[list[float]] = [[] for _ in rows]
    den: list[list[float]] = [[] for _ in rows]
    calls = [0] * len(rows)
    try:
        for r in range(runs + 1):                 # round 0 warms up; rounds interleave the methods
            for i, (_, pipe, call, _) in enumerate(rows):
                for k, prompt in enumerate(prompts):
                    clocks[i].reset()
                    t = time.perf_counter()
                    with torch.inference_mode():
                        pipe(prompt, generator=torch.Generator().manual_seed(k), **call)
                    if r:
                        lat[i].append(time.perf_counter() - t)
                        den[i].append(clocks[i].total)
                        calls[i] = clocks[i].calls
    finally:
        for c in clocks:
            c.remove()
    base_lat, base_den = statistics.median(lat[0]), statistics.median(den[0])
    for i, res in enumerate(results):
        res["latency_s"] = statistics.median(lat[i])
        res["denoiser_s"] = statistics.median(den[i])
        res["denoiser_calls"] = calls[i]
        res["speedup"] = base_lat / res["latency_s"]
        res["denoiser_speedup"] = base_den / res["denoiser_s"]
        res["accuracy_vs_teacher"] = (res["evaluator_accuracy"] / results[0]["evaluator_accuracy"]
                                      if results[0]["evaluator_accuracy"] else None)
        res["adherence_vs_teacher"] = res["adherence"] / results[0]["adherence"]
    return {"suite": "one-step", "teacher": teacher, "prompts": n, "timing_prompts": timing_prompts,
            "runs": runs, "paths": paths, "hardware": hardware(), "threads": torch.get_num_threads(),
            "results": results}


def markdown(result: dict) -> str:
    hw = result["hardware"]
    lines = [
        "# Benchmark `one-step`", "",
        f"Command: `{result.get('command', '')}`",
        f"Teacher: {result['teacher']}; {result['prompts']} held-out prompts for quality (seed i for prompt i); "
        f"speed = median over {result['runs']} interleaved rounds of {result['timing_prompts']} prompts at batch 1 "
        f"after one warm-up round; {hw['cpu_model']} ({hw['cpu_cores']} cores, {result['threads']} threads)"
        + (f", GPU {hw['gpu']}" if hw.get("gpu") else "") + f"; torch {hw['torch']}.", "",
        "| method | denoiser calls | latency (s) | speedup | denoiser (s) | denoiser speedup | adherence | "
        "vs teacher | evaluator_accuracy | vs teacher | colour | shape | size | position | frechet |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["results"]:
        a = r["attributes"]
        acc = "–" if r["accuracy_vs_teacher"] is None else f"{r['accuracy_vs_teacher']:.0%}"
        lines.append(
            f"| {r['method']} | {r['denoiser_calls']} | {r['latency_s']:.4f} | {r['speedup']:.2f}× | "
            f"{r['denoiser_s']:.4f} | {r['denoiser_speedup']:.1f}× | {r['adherence']:.3f} | "
            f"{r['adherence_vs_teacher']:.0%} | {r['evaluator_accuracy']:.3f} | {acc} | {a['colour']:.3f} | "
            f"{a['shape']:.3f} | {a['size']:.3f} | {a['position']:.3f} | {r['frechet']:.3f} |")
    lines += ["", f"Real-vs-real Fréchet floor: {result['results'][0]['real_frechet_floor']:.3f}. "
              "adherence = mean per-attribute accuracy; evaluator_accuracy = fraction of images read back "
              "fully correct. Denoiser time counts the transformer forward calls only (the teacher's CFG "
              "runs as one batch-2 call per step)."]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir="benchmarks/results", name: str = "one-step-shapes-t2i") -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{name}.md").write_text(markdown(result))
    return out / f"{name}.json"
