"""Multi-student distillation (MSD, spec 2.9): K one-step students, each owning the captions its
router assigns, trained by independent runs (one accelerate run per student), exported together.

    $ accel distill msd --students 4 --teacher shapes-t2i --output-dir runs/msd --steps 2000

Students have the teacher's size and start from its weights, or, with ``student_layers``, are
smaller (evenly spaced teacher blocks) and first get teacher score matching (``tsm``). Each
student's run is a plain DMD run on its share of the captions, in ``output_dir/student-k``; the
multi-student pipeline goes to ``output_dir/pipeline``.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from pipelines.routing import Router

from .trainer import DistillConfig, train


def shapes_keywords() -> list[str]:
    from pipelines.zoo.shapes import COLOURS, SHAPES

    return [f"{c} {s}" for c in COLOURS for s in SHAPES]


def train_students(config: DistillConfig, pipe, captions: list[str], students: int, keywords: list[str],
                   progress: bool = True, real_latents=None, pairs: int = 0) -> Path:
    """Train K students (``config.student_layers`` set: each first gets TSM, then DMD from it)."""
    if students < 2:
        raise ValueError(f"MSD needs at least 2 students, got {students}")
    router = Router.from_keywords(captions, keywords, students)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    router.save(out / "router.json")
    exported = []
    for k in range(students):
        keep = [i for i, c in enumerate(captions) if router.route(c) == k]
        if not keep:
            raise ValueError(f"student {k} got no captions; use fewer students or other keywords")
        mine = [captions[i] for i in keep]
        real = real_latents[keep] if real_latents is not None else None
        init = config.init_generator
        if config.student_layers:
            tsm = dataclasses.replace(config, method="tsm", output_dir=str(out / f"student-{k}" / "tsm"),
                                      export=True, seed=config.seed + k)
            init = str(train(tsm, pipe, mine, progress=progress, real_latents=real, pairs=pairs))
        sub = dataclasses.replace(config, method="dmd", output_dir=str(out / f"student-{k}"), export=True,
                                  seed=config.seed + k, init_generator=init)
        exported.append(train(sub, pipe, mine, progress=progress, real_latents=real, pairs=pairs))
    return export_students(out / "pipeline", router, exported)


def export_students(out: Path, router: Router, student_pipelines: list) -> Path:
    """Student 0's pipeline folder + every student's transformer under ``students/k`` + the router."""
    from diffusers import PixArtTransformer2DModel

    if student_pipelines[0] is None:
        raise RuntimeError("students must be exported to build the multi-student pipeline")
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(student_pipelines[0], out)
    for k, src in enumerate(student_pipelines):
        model = PixArtTransformer2DModel.from_pretrained(Path(src) / "transformer")
        model.save_pretrained(out / "students" / str(k), safe_serialization=True)
    router.save(out / "router.json")
    return out
