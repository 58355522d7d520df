"""``accel sparse search|show``: the offline Sparse-vDiT search and plan inspection.

    $ accel sparse search --model tiny-wan --height 64 --width 64 --frames 9 --block 16 --out plan.json
    $ accel sparse show plan.json          # per-layer summary and a layer x head mode map (PNG)
"""

from __future__ import annotations

import argparse
from pathlib import Path

TINY = {"tiny-wan": "wan", "tiny-hunyuan": "hunyuan", "tiny-cogvideox": "cogvideox"}
MODE_CODES = {"full": 0, "diag": 1, "mdiag": 2, "stripe": 3, "skip": 4}


def _target(args):
    from pipelines.zoo import REFERENCES

    if args.model in TINY:
        from pipelines.tiny import build_tiny

        pipe = build_tiny(TINY[args.model])
        call = dict(pipe.tiny_call_kwargs)
        prompts = ["a red circle moving left", "a blue square moving up", "two green triangles"]
    elif args.model in REFERENCES:
        from pipelines.zoo import load_reference
        from pipelines.zoo.scoring import EVAL_CALL, calibration_prompts

        pipe = load_reference(args.model)
        call, prompts = dict(EVAL_CALL[args.model]), calibration_prompts(args.model, args.prompts)
    elif Path(args.model).is_dir():
        from diffusers import DiffusionPipeline

        from caching.ecad_search import default_prompts

        pipe, call, prompts = DiffusionPipeline.from_pretrained(args.model), {}, default_prompts()
    else:
        raise SystemExit(f"--model {args.model!r}: not one of {', '.join(TINY)}, a reference model "
                         f"({', '.join(REFERENCES)}) or a local diffusers pipeline folder")
    for key, value in (("height", args.height), ("width", args.width), ("num_frames", args.frames),
                       ("num_inference_steps", args.steps)):
        if value:
            call[key] = value
    if args.prompts_file:
        prompts = [line.strip() for line in Path(args.prompts_file).read_text().splitlines() if line.strip()]
    return pipe, call, prompts[: args.prompts]


def sparse_search(args: argparse.Namespace) -> int:
    import torch

    from accel.attention.search import SparseSearchSettings, search_plan
    from accel.config import read_json

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, call, prompts = _target(args)
    table = read_json(args.cost_table)["per_head"] if args.cost_table else None
    settings = SparseSearchSettings(tau=args.tau, rows=args.rows, block=args.block, dense_warmup=args.dense_warmup,
                                    dense_layers=tuple(args.dense_layers), target_cost=args.target_cost,
                                    seed=args.seed, cost_table=table)
    plan = search_plan(pipe, prompts, call, settings, progress=not args.quiet)
    plan.save(args.out)
    print(_summary(plan))
    print(f"wrote {args.out}")
    return 0


def _summary(plan) -> str:
    s = plan.stats
    lines = [f"{plan.model_class} grid {'x'.join(map(str, plan.grid))} block {plan.block}: "
             f"density {s.get('density')}, skipped {s.get('skipped')}, predicted attention time "
             f"{s.get('pred_attn_ratio')} of dense (dense warm-up {plan.dense_warmup:.0%}, dense layers "
             f"{list(plan.dense_layers)})"]
    for layer in plan.layers:
        modes = [h["mode"] for h in layer["heads"]]
        counts = ", ".join(f"{m} {modes.count(m)}" for m in MODE_CODES if modes.count(m))
        lines.append(f"  layer {layer['index']:>3} {layer.get('module', '')}: {counts}")
    return "\n".join(lines)


def sparse_show(args: argparse.Namespace) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from accel.attention import SparseAttentionConfig

    plan = SparseAttentionConfig.load(args.plan)
    print(_summary(plan))
    n_layers = max([la["index"] for la in plan.layers] + list(plan.dense_layers) + [0]) + 1
    n_heads = max(len(la["heads"]) for la in plan.layers) if plan.layers else 1
    grid = np.zeros((n_layers, n_heads))
    for la in plan.layers:
        for h, head in enumerate(la["heads"]):
            grid[la["index"], h] = MODE_CODES[head["mode"]]
    fig, ax = plt.subplots(figsize=(1 + 0.35 * n_heads, 1 + 0.25 * n_layers))
    cmap = matplotlib.colors.ListedColormap(["#d9d9d9", "#4c72b0", "#55a868", "#dd8452", "#c44e52"])
    ax.imshow(grid, cmap=cmap, vmin=-0.5, vmax=4.5, aspect="auto", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{plan.model_class}: modes (grey full, blue diag, green mdiag, orange stripe, red skip)",
                 fontsize=8)
    out = Path(args.png or Path(args.plan).with_suffix(".png"))
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    print(f"wrote {out}")
    return 0


def add_parser(sub) -> None:
    sp = sub.add_parser("sparse", help="sparse attention for video DiTs: offline plan search and inspection")
    ssub = sp.add_subparsers(dest="sparse_command", required=True)
    ss = ssub.add_parser("search", help="measure per-(layer, head) pattern errors and write a plan")
    ss.add_argument("--model", default="shapes-t2v",
                    help=f"{', '.join(TINY)}, a reference model name, or a local diffusers pipeline folder")
    ss.add_argument("--out", required=True, help="plan JSON to write")
    ss.add_argument("--height", type=int, default=0)
    ss.add_argument("--width", type=int, default=0)
    ss.add_argument("--frames", type=int, default=0)
    ss.add_argument("--steps", type=int, default=0, help="denoising steps of the calibration runs")
    ss.add_argument("--prompts", type=int, default=6)
    ss.add_argument("--prompts-file")
    ss.add_argument("--tau", type=float, default=0.02, help="per-head error budget")
    ss.add_argument("--target-cost", type=float, help="bisect lambda to this predicted attention cost instead")
    ss.add_argument("--rows", type=int, default=512, help="sampled query rows per layer and call")
    ss.add_argument("--block", type=int, default=128)
    ss.add_argument("--dense-warmup", type=float, default=0.2)
    ss.add_argument("--dense-layers", type=int, nargs="*", default=[0])
    ss.add_argument("--cost-table", help="kernel microbenchmark JSON from `accel bench sparse-kernel`")
    ss.add_argument("--seed", type=int, default=0)
    ss.add_argument("--threads", type=int, default=0)
    ss.add_argument("--quiet", action="store_true")
    ss.set_defaults(func=sparse_search)
    sh = ssub.add_parser("show", help="summarise a plan and draw its layer x head mode map")
    sh.add_argument("plan")
    sh.add_argument("--png", help="image to write (default: next to the plan)")
    sh.set_defaults(func=sparse_show)
