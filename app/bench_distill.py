"""``accel bench one-step``: distilled one-step students against their 20-step teacher.

    $ accel bench one-step --path dmd=runs/dmd/pipeline --prompts 200
    $ accel bench one-step --path dmd=runs/dmd/pipeline,msd=runs/msd/pipeline --threads 2

Quality: the shapes evaluator on the first N held-out prompts (seed i for prompt i, the teacher at
its default 20 steps and CFG, each student in one step without CFG): per-attribute adherence, the
fully-correct rate (``evaluator_accuracy``) and the Fréchet distance to real renders. Speed, batch 1,
median over ``runs`` interleaved rounds of a few prompts: end-to-end latency and *denoiser time*
(wall time inside the transformer's forward calls, read by :class:`accel.bench.ComputeProbe`). Ratios are within
this run. A student folder with ``router.json`` loads as a multi-student pipeline.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from accel.bench import ComputeProbe, hardware


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

    base = load_reference(teacher)
    rows = [("teacher (20 steps, CFG)", base, {}, [base.transformer])]
    for label, path in _parse_paths(paths):
        pipe, nets = _load_student(path)
        rows.append((label, pipe, {"num_inference_steps": 1, "guidance_scale": 1.0}, nets))
    results = []
    for label, pipe, call, _ in rows:
        pipe.set_progress_bar_config(disable=True)
        report, _ = evaluate_pipeline(pipe, teacher, n=n, progress=progress, **call)
        results.append({"method": label, "call": {**EVAL_CALL[teacher], **call},
                        "adherence": report["overall"], "evaluator_accuracy": report["image_accuracy"],
                        "attributes": report["attributes"], "frechet": report["frechet"],
                        "real_frechet_floor": report["real_frechet_floor"]})
    prompts = heldout_prompts(teacher, timing_prompts)
    probes = [[ComputeProbe(net) for net in nets] for *_, nets in rows]    # denoiser calls and time
    lat: list[list[float]] = [[] for _ in rows]
    den: list[list[float]] = [[] for _ in rows]
    calls = [0] * len(rows)
    try:
        for r in range(runs + 1):                 # round 0 warms up; rounds interleave the methods
            for i, (_, pipe, call, _) in enumerate(rows):
                for k, prompt in enumerate(prompts):
                    for probe in probes[i]:
                        probe.denoiser_seconds, probe.denoiser_calls = 0.0, 0
                    t = time.perf_counter()
                    with torch.inference_mode():
                        pipe(prompt, generator=torch.Generator().manual_seed(k), **call)
                    if r:
                        lat[i].append(time.perf_counter() - t)
                        den[i].append(sum(probe.denoiser_seconds for probe in probes[i]))
                        calls[i] = sum(probe.denoiser_calls for probe in probes[i])
    finally:
        for probe in (p for group in probes for p in group):
            probe.close()
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
    lines += ["", f"Fréchet distance is to real renders of the same scenes; two halves of the real renders (different "
              f"scenes) are {result['results'][0]['real_frechet_floor']:.3f} apart, a scale reference, not a floor. "
              "adherence = mean per-attribute accuracy; evaluator_accuracy = fraction of images read back "
              "fully correct. Denoiser time counts the transformer forward calls only (the teacher's CFG "
              "runs as one batch-2 call per step)."]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir="benchmarks/results") -> Path:
    from accel.bench import write_report

    return write_report(result, markdown(result), out_dir, "one-step-shapes-t2i")


def layout_scores(images, scenes) -> dict:
    """How well the evaluator's reading of each image's layout matches its scene's layout (the control).

    The evaluator reads which of the grid cells hold an object (:func:`pipelines.zoo.evaluate.read_image`,
    whatever the object's colour or shape); per image that set is compared with the scene's cells.
    ``exact``: share of images whose occupied cells are exactly the control's; ``recall``: share of
    control objects whose cell is read as occupied; ``precision``: share of occupied cells the control
    has an object in.
    """
    from pipelines.zoo.evaluate import read_image

    exact, hit, want, got = 0, 0, 0, 0
    for image, scene in zip(images, scenes, strict=True):
        cells = {c for c, r in read_image(image).items() if r.present}
        target = {o.cell for o in scene.objects}
        exact += cells == target
        hit, want, got = hit + len(cells & target), want + len(target), got + len(cells)
    return {"exact": exact / len(scenes), "recall": hit / max(want, 1), "precision": hit / max(got, 1)}


def run_control(student: str, adapter: str, teacher: str = "shapes-t2i", n: int = 200, batch: int = 8,
                progress: bool = True) -> dict:
    """NCT control adherence: held-out scenes, prompts *without* positions, the layout map of the
    scene's real render as the control. Control adherence is the evaluator's reading of the generated
    layout against the control (:func:`layout_scores`, exact per image: the consistency metric of
    NCT, read by the evaluator); the evaluator's position accuracy (against the full captions, so it
    also needs the object's colour, shape and size right at the named cell) is reported beside it.
    Caption adherence is colour/shape/size scored against the position-free prompts the student was
    given, each object read at its best-matching cell, so it does not depend on where the object was
    drawn; count is read the same way. The plain student on the same prompts and seeds is the reference."""
    import contextlib
    import dataclasses

    import numpy as np
    from tqdm.auto import tqdm

    from distill.export import load_adapter
    from distill.methods.nct import layout_map
    from pipelines.zoo.evaluate import score_images
    from pipelines.zoo.scoring import heldout_scenes
    from pipelines.zoo.shapes import caption, render_image

    pipe, nets = _load_student(student)
    if len(nets) != 1:
        raise SystemExit("the control bench takes a single one-step student")
    if not (Path(adapter) / "adapter_config.json").exists():
        raise SystemExit(f"no control adapter in {adapter} (`accel distill nct` writes OUTPUT_DIR/adapter)")
    net, (ctrl_adapter, control) = nets[0], load_adapter(adapter)
    if control != "layout":
        raise SystemExit(f"the control bench measures layout adapters; this one is {control!r}")
    pipe.set_progress_bar_config(disable=True)
    scenes = heldout_scenes(teacher, n)
    full = [caption(s) for s in scenes]
    unplaced = [caption(dataclasses.replace(s, says_position=False)) for s in scenes]
    latent = (net.config.sample_size, net.config.sample_size)
    outs: dict[str, list] = {"plain": [], "controlled": []}
    agree: list[float] = []
    for i in tqdm(range(0, n, batch), desc="control bench", disable=not progress):
        chunk = scenes[i:i + batch]
        real = torch.from_numpy(np.stack([render_image(s) for s in chunk])).permute(0, 3, 1, 2)
        ctrl = layout_map(real, latent)
        for key in outs:
            gens = [torch.Generator().manual_seed(i + j) for j in range(len(chunk))]
            kw = dict(generator=gens, output_type="np", num_inference_steps=1, guidance_scale=1.0)
            attach = ctrl_adapter.attached(net, ctrl) if key == "controlled" else contextlib.nullcontext()
            with torch.inference_mode(), attach:
                images = pipe(unplaced[i:i + batch], **kw).images
            images = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
            outs[key] += list(images)
            if key == "controlled":
                got = layout_map(torch.from_numpy(images).permute(0, 3, 1, 2), latent)
                agree += (got == ctrl).float().mean((1, 2, 3)).tolist()
    rows = []
    for key, images in outs.items():
        rep = score_images(images, full)
        asked = score_images(images, unplaced)       # what the student was asked: read at the best match
        a, c = rep["attributes"], asked["attributes"]
        layout = layout_scores(images, scenes)
        rows.append({"method": f"{key} student", "control_adherence": layout["exact"], "layout": layout,
                     "position": a["position"],
                     "caption_adherence": float(np.mean([c[k] for k in ("colour", "shape", "size") if k in c])),
                     "count": asked["count"],
                     "caption_attributes": c, "attributes": a})
    rows[1]["layout_agreement"] = float(np.mean(agree))
    return {"suite": "nct-control", "student": student, "adapter": adapter, "prompts": n,
            "hardware": hardware(), "rows": rows,
            "caption_change_points": 100 * (rows[1]["caption_adherence"] - rows[0]["caption_adherence"])}


def control_markdown(result: dict) -> str:
    lines = ["# Benchmark `nct-control`", "", f"Command: `{result.get('command', '')}`",
             f"{result['prompts']} held-out scenes; prompts with the positions left out; control = layout map of the "
             "scene's real render at latent resolution; one step, same seeds with and without the adapter.", "",
             "| method | control adherence (layout read = control) | layout recall | layout precision | "
             "position accuracy | caption adherence (colour, shape, size) | count | colour | shape | size |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        a, lay = r["caption_attributes"], r["layout"]
        lines.append(f"| {r['method']} | {r['control_adherence']:.3f} | {lay['recall']:.3f} | {lay['precision']:.3f} | "
                     f"{r['position']:.3f} | {r['caption_adherence']:.3f} | "
                     f"{r['count']:.3f} | {a['colour']:.3f} | {a['shape']:.3f} | {a.get('size', float('nan')):.3f} |")
    lines += ["", f"Caption adherence change with the adapter: {result['caption_change_points']:+.1f} points. "
              f"Latent-cell agreement of the generated layout with the control: "
              f"{result['rows'][1]['layout_agreement']:.3f}.", "",
              "Control adherence: the evaluator reads which grid cells of the generated image hold an object "
              "and the image counts when that set equals the control's cells (NCT's consistency metric, read "
              "by the evaluator). Position accuracy is the evaluator's position attribute against the full "
              "captions (it also needs the object's colour, shape and size right at the named cell). Caption "
              "adherence, count, colour, shape and size are scored against the position-free prompts the "
              "student was given (each object read at its best-matching cell), so they do not depend on where "
              "objects were drawn."]
    return "\n".join(lines) + "\n"
