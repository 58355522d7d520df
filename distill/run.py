"""Distillation as a plain training script (``accelerate launch -m distill.run …``) and the body of
``accel distill METHOD``.

    $ accel distill dmd --teacher shapes-t2i --output-dir runs/dmd --steps 2000 --batch 8
    $ accelerate launch --num_processes 2 -m distill.run dmd --teacher shapes-t2i --output-dir runs/dmd
    $ accel distill dmd --config dmd.json --resume latest         # a JSON file of DistillConfig fields

``--teacher`` is ``tiny`` (a tiny random PixArt, for smoke runs), a reference model name, or a local
diffusers pipeline folder. Conditions are the training captions of the reference model's data
generator (or, for other teachers, the shipped calibration prompts or ``--captions FILE``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch


def load_teacher(name: str):
    if name == "tiny":
        from pipelines.tiny import build_tiny

        return build_tiny("pixart")
    from pipelines.zoo import REFERENCES, load_reference

    if name in REFERENCES:
        return load_reference(name)
    if Path(name).is_dir():
        from diffusers import DiffusionPipeline

        return DiffusionPipeline.from_pretrained(name)
    raise SystemExit(f"--teacher {name!r}: not 'tiny', a reference model ({', '.join(REFERENCES)}) or a folder")


def speaks_shapes(pipe) -> bool:
    """Whether ``pipe``'s tokenizer is the shapes models' word-level one (a student exported from
    ``shapes-t2i`` carries it): its captions are the procedural ones, not free text."""
    from pipelines.zoo.recipes import SPECIAL
    from pipelines.zoo.shapes import vocabulary

    vocab = getattr(getattr(pipe, "tokenizer", None), "get_vocab", dict)()
    return set(vocab) == set(vocabulary()) | set(SPECIAL)


def default_captions(teacher: str, n: int, pipe=None, unplaced: bool = False, partial: float = 0.0) -> list[str]:
    """Training captions for ``teacher``: shapes captions for the shapes models and students made from
    them (``unplaced``: with the positions left out, for layout controls; ``partial``: the share leaving
    out the size, and separately the position), else the shipped prompts."""
    from pipelines.zoo import REFERENCES

    if teacher in REFERENCES or (pipe is not None and speaks_shapes(pipe)):
        import dataclasses

        from pipelines.zoo.shapes import caption, sample_scenes

        scenes = sample_scenes("train", n, partial=partial)
        if unplaced:
            scenes = [dataclasses.replace(s, says_position=False) for s in scenes]
        return [caption(s) for s in scenes]
    if teacher == "tiny":
        return ["a red circle", "a blue square", "two green triangles", "a small yellow star"]
    from caching.ecad_search import default_prompts

    return default_prompts()


def shapes_real_latents(pipe, teacher: str, n: int):
    """(captions, latents) of ``n`` rendered training scenes, encoded by the teacher's VAE."""
    import numpy as np
    import torch

    from pipelines.zoo import REFERENCES

    if teacher not in REFERENCES or teacher.endswith("t2v"):
        raise SystemExit("--real-latents renders scenes of the shapes-t2i data generator: use --teacher shapes-t2i")
    from pipelines.zoo.shapes import caption, render_image, sample_scenes

    scenes = sample_scenes("train", n)
    latents = []
    vae = pipe.vae
    with torch.no_grad():
        for i in range(0, n, 16):
            imgs = np.stack([render_image(s) for s in scenes[i:i + 16]]).astype(np.float32) / 127.5 - 1
            x = torch.from_numpy(imgs).permute(0, 3, 1, 2)
            latents.append(vae.encode(x).latent_dist.mode() * vae.config.scaling_factor)
    return [caption(s) for s in scenes], torch.cat(latents)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    from .trainer import DistillConfig

    ap.add_argument("method", help="dmd, sid, regression, tsm, nct or msd")
    ap.add_argument("--students", type=int, default=4, help="msd: number of students")
    ap.add_argument("--keywords", help="msd: comma-separated routing keywords (default for shapes models: "
                    "colour + shape of the first object)")
    ap.add_argument("--config", help="JSON file of DistillConfig fields (flags override it)")
    ap.add_argument("--teacher", default="shapes-t2i")
    ap.add_argument("--captions", help="text file of training captions (one per line)")
    ap.add_argument("--num-captions", type=int, default=4096)
    ap.add_argument("--partial-captions", type=float, default=0.0,
                    help="shapes teachers: share of training captions without the size, and separately without the "
                         "position (the teacher trained with 0.15), so prompts that leave them out are in distribution")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--pairs", type=int, default=0,
                    help="regression: make N (noise, teacher sample) pairs with the teacher's sampler first")
    ap.add_argument("--real-latents", type=int, default=0,
                    help="GAN head: render and encode N training scenes of a shapes teacher as real samples")
    ap.add_argument("--validate-prompts", type=int, default=8,
                    help="held-out prompts sampled in one step and scored at every checkpoint (0: off)")
    skip = {"method"}
    for f in dataclasses.fields(DistillConfig):
        if f.name in skip:
            continue
        kind = {"int": int, "float": float, "str": str}.get(str(f.type).split(" |")[0], str)
        if f.type in ("bool",):
            ap.add_argument("--" + f.name.replace("_", "-"), type=lambda s: s.lower() in ("1", "true", "yes"))
        else:
            ap.add_argument("--" + f.name.replace("_", "-"), type=kind)


def run(args: argparse.Namespace) -> int:
    from .trainer import DistillConfig, train

    fields = {f.name for f in dataclasses.fields(DistillConfig)} - {"method"}
    overrides = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    method = "dmd" if args.method == "msd" else args.method       # MSD = one DMD run per student
    if args.config:
        config = DistillConfig.load(args.config, method=method, **overrides)
    else:
        config = DistillConfig(method=method, **overrides)
    pipe = load_teacher(args.teacher)
    if args.captions:
        captions = [line.strip() for line in Path(args.captions).read_text().splitlines() if line.strip()]
    else:
        # a layout control carries the positions, so NCT's layout adapter trains on captions without them
        captions = default_captions(args.teacher, args.num_captions, pipe,
                                    unplaced=args.method == "nct" and config.control == "layout",
                                    partial=args.partial_captions)
    _check_vocabulary(pipe, captions)
    if args.method == "msd":
        from pipelines.zoo import REFERENCES

        from .msd import shapes_keywords, train_students

        if args.keywords:
            keywords = [k.strip() for k in args.keywords.split(",") if k.strip()]
        elif args.teacher in REFERENCES:
            keywords = shapes_keywords()
        else:
            raise SystemExit("msd: pass --keywords for a teacher that is not a shapes reference model")
        real = None
        if args.real_latents:
            captions, real = shapes_real_latents(pipe, args.teacher, args.real_latents)
        out = train_students(config, pipe, captions, args.students, keywords, progress=not args.quiet,
                             real_latents=real, pairs=args.pairs)
    else:
        validate = None
        if args.validate_prompts and args.method in ("dmd", "sid", "regression"):
            from pipelines.zoo import REFERENCES

            from .validate import Validator

            if args.teacher in REFERENCES:
                from pipelines.zoo.scoring import heldout_prompts

                validate = Validator(pipe, heldout_prompts(args.teacher, args.validate_prompts), config.output_dir)
            elif args.teacher == "tiny":
                validate = Validator(pipe, default_captions("tiny", 4)[: args.validate_prompts], config.output_dir,
                                     score=False, call=dict(height=16, width=16, use_resolution_binning=False,
                                                            max_sequence_length=16, clean_caption=False))
        real = None
        if args.real_latents:
            captions, real = shapes_real_latents(pipe, args.teacher, args.real_latents)
        out = train(config, pipe, captions, progress=not args.quiet, validate=validate, real_latents=real,
                    pairs=args.pairs)
    if out is not None:
        print(json.dumps({"pipeline": str(out)}))
    return 0


def _check_vocabulary(pipe, captions: list[str], limit: float = 0.5) -> None:
    """Refuse captions the teacher's tokenizer mostly cannot read (over ``limit`` of their tokens unknown:
    a word-level tokenizer maps unknown words to its unknown token, and such conditions teach nothing)."""
    tok = getattr(pipe, "tokenizer", None)
    unk = getattr(tok, "unk_token_id", None)
    if tok is None or unk is None:
        return
    ids = [i for c in captions[:256] for i in tok(c, add_special_tokens=False)["input_ids"]]
    share = sum(i == unk for i in ids) / max(len(ids), 1)
    if share > limit:
        raise SystemExit(f"{share:.0%} of the caption tokens are unknown to the teacher's tokenizer; pass "
                         "--captions FILE with captions in its vocabulary")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="one-step distillation (accelerate)")
    add_arguments(ap)
    try:
        return run(ap.parse_args(argv))
    finally:
        # under torchrun, tear the process group down before interpreter exit: gloo's threads left running at
        # exit abort the process ("terminate called without an active exception") after training succeeded
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
