"""The ``accel`` command.

    $ accel app                 # the Gradio app on 127.0.0.1:7860 (reference models by default)
    $ accel bench tiny          # tiny PixArt: StaticCache vs diffusers' caches, table + JSON
    $ accel bench overhead      # hook overhead on a 12-block PixArt
    $ accel bench shapes-t2i    # the trained reference model: fidelity, evaluator accuracy, Fréchet
    $ accel zoo train shapes-t2i --work-dir runs/shapes-t2i    # retrain a reference model (resumable)
    $ accel zoo eval shapes-t2i # held-out prompt adherence of the shipped model
    $ accel zoo export shapes-t2i --work-dir runs/shapes-t2i   # a run's latest checkpoint, as a pipeline
    $ accel zoo guidance shapes-t2i --scales 1.5,2.5,4.5   # guidance scan on calibration prompts
    $ accel ecad search --model shapes-t2i --work-dir runs/ecad   # NSGA-II cache-schedule search
    $ accel ecad show runs/ecad/frontier/00_*.json                # summary + heat-map PNG
    $ accel erta profile --model shapes-t2i --target-speedup 2 --out erta.json   # ERTACache profile
    $ accel sparse search --model shapes-t2v --out plan.json     # Sparse-vDiT per-head plan search
    $ accel distill dmd --teacher shapes-t2i --output-dir runs/dmd   # one-step student (accelerate)
    $ accel bench one-step --path dmd=runs/dmd/pipeline   # one-step students vs the 20-step teacher
    $ accel bench nct-control --path runs/dmd/pipeline --adapter runs/nct/adapter   # layout control
    $ accel bench sparse-kernel # block-sparse kernel vs SDPA/FlexAttention (GPU; lists what is unmeasured)

Results go to ``benchmarks/results/SUITE.json`` and ``SUITE.md``.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def _special_suite(args: argparse.Namespace):
    """Suites outside the caching harness: (run, markdown, file stem), an error message, or None."""
    progress = not args.quiet
    if args.suite == "dllm":
        from app import bench_dllm as m

        return (lambda: m.run(n=args.prompts or 64, progress=progress, path=args.path, device=args.device),
                m.markdown, "dllm")
    if args.suite == "one-step":
        if not args.path:
            return "one-step needs --path LABEL=STUDENT_FOLDER[,...] (e.g. dmd=runs/dmd/pipeline)"
        from app import bench_distill as m

        return (lambda: m.run(args.path, n=args.prompts or 200, runs=args.runs or 5, progress=progress),
                m.markdown, "one-step-shapes-t2i")
    if args.suite == "nct-control":
        if not (args.path and args.adapter):
            return "nct-control needs --path STUDENT_FOLDER --adapter ADAPTER_FOLDER"
        from app import bench_distill as m

        return (lambda: m.run_control(args.path, args.adapter, n=args.prompts or 200, progress=progress),
                m.control_markdown, "nct-control-shapes-t2i")
    if args.suite == "sparse-kernel":
        from app import bench_sparse as m

        return (lambda: m.run(shape=args.shape, dtype=args.dtype)), m.markdown, "sparse-kernel"
    return None


def _bench(args: argparse.Namespace) -> int:
    import torch

    from accel.bench import run_bench, write_report, write_results
    from app.bench_suites import SUITES

    special = _special_suite(args)
    if isinstance(special, str):
        print(special, file=sys.stderr)
        return 2
    if special is not None:
        run, markdown, stem = special
        if args.threads:
            torch.set_num_threads(args.threads)
        result = run()
        result["command"] = "accel " + shlex.join(sys.argv[1:])
        path = write_report(result, markdown(result), args.out, stem)
        print(markdown(result))
        print(f"wrote {path} and {path.with_suffix('.md')}")
        return 0
    if args.suite not in SUITES:
        print(f"unknown suite {args.suite!r}; choose one of: {', '.join(sorted(SUITES))}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    suite = SUITES[args.suite](schedules=args.schedules) if args.schedules else SUITES[args.suite]()
    result = run_bench(
        suite.pipe, suite.entries, suite.prompts[: args.prompts] if args.prompts else suite.prompts,
        suite.call_kwargs, runs=args.runs or suite.runs, warmup=suite.warmup, suite=args.suite,
        notes=suite.notes, progress=not args.quiet, scorers=suite.scorers,
    )
    if suite.compare:
        from accel.bench import SPEEDUP_KEYS, compare_families, comparison_markdown

        parts = []
        for key in suite.compare_on:
            cmp = compare_families(result, suite.compare, suite.compare_speedups, suite.compare_peers, key=key)
            result["comparison" if key == "speedup" else f"comparison_{key}"] = cmp
            table = comparison_markdown(cmp, suite.compare, key)
            parts.append(table if len(suite.compare_on) == 1 else f"Along the {SPEEDUP_KEYS[key]}:\n\n{table}")
        result["comparison_md"] = "\n\n".join(parts)
    path = write_results(result, args.out, command="accel " + shlex.join(sys.argv[1:]))
    print(result["table"])
    if suite.compare:
        print("\n" + result["comparison_md"])
    print(f"\nwrote {path} and {path.with_suffix('.md')}")
    return 0


def _zoo_train(args: argparse.Namespace) -> int:
    from pipelines.zoo.recipes import RECIPES
    from pipelines.zoo.train import VAECheckError, train

    if args.name == "dlm-tasks":
        from pipelines.zoo.dlm import DLMRecipe
        from pipelines.zoo.dlm import train as train_dlm

        recipe = DLMRecipe(steps=args.steps) if args.steps else DLMRecipe()
        out = train_dlm(args.work_dir or "runs/dlm-tasks", recipe, args.out, progress=not args.quiet,
                        threads=args.threads or None, stop_at=args.stop_at, device=args.device)
        print(f"pipeline written to {out}" if out else "stopped at a checkpoint; rerun to resume")
        return 0
    if args.name not in RECIPES:
        print(f"unknown reference model {args.name!r}; choose one of: {', '.join(sorted(RECIPES))}", file=sys.stderr)
        return 2
    recipe = RECIPES[args.name].replace(steps=args.steps) if args.steps else RECIPES[args.name]
    try:
        out = train(recipe, args.work_dir or f"runs/{args.name}", args.out, progress=not args.quiet,
                    threads=args.threads or None, stop_at=args.stop_at, device=args.device)
    except VAECheckError as e:
        print(e, file=sys.stderr)
        return 1
    print(f"pipeline written to {out}" if out else f"stopped at a checkpoint at or after step {args.stop_at}; "
          "run the same command without --stop-at to resume")
    return 0


def _zoo_export(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from pipelines.zoo.recipes import RECIPES
    from pipelines.zoo.train import pipeline_from_checkpoint, run_recipe

    if args.name not in RECIPES:
        print(f"accel zoo export takes an image or video reference model ({', '.join(sorted(RECIPES))}), "
              f"not {args.name!r}", file=sys.stderr)
        return 2
    work = Path(args.work_dir)
    try:
        recipe = run_recipe(work)
    except (FileNotFoundError, ValueError, TypeError) as e:
        print(e, file=sys.stderr)
        return 2
    if recipe.name != args.name:
        print(f"{work} is a {recipe.name} run, not {args.name}", file=sys.stderr)
        return 2
    meta = work / "denoiser" / "meta.json"
    if not meta.exists():
        print(f"no denoiser checkpoint in {work} yet (the first is written at step {recipe.checkpoint_every})",
              file=sys.stderr)
        return 2
    step = json.loads(meta.read_text())["step"]
    weights = "raw" if args.no_ema else "ema"
    out = Path(args.out) if args.out else work / "exports" / f"step{step}-{weights}"
    pipe = pipeline_from_checkpoint(recipe, work, ema=not args.no_ema)
    pipe.save_pretrained(out, safe_serialization=True)
    print(f"step {step} of {recipe.steps} ({weights} weights) written to {out}; "
          f"score it with: accel zoo eval {args.name} --path {out}")
    return 0


def _zoo_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    import torch

    from pipelines.zoo import load_reference
    from pipelines.zoo.scoring import QUALITY_GUIDANCE, check_guidance, evaluate_pipeline

    if args.name == "dlm-tasks" and args.guidance is not None:
        print("--guidance is for the image and video models; dlm-tasks has no guidance", file=sys.stderr)
        return 2
    if args.guidance is not None:
        try:
            check_guidance([args.guidance])
        except ValueError as e:
            print(f"--guidance: {e}", file=sys.stderr)
            return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_reference(args.name, path=args.path)
    if args.name == "dlm-tasks":
        from pipelines.zoo.dlm import evaluate

        report = evaluate(pipe, n=args.n, **({"steps": args.steps} if args.steps else {}))
        report["command"] = "accel " + shlex.join(sys.argv[1:])
        print(json.dumps({k: report[k] for k in ("n", "exact_match", "per_task", "call")}, indent=1))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
        return 0
    call = {"num_inference_steps": args.steps} if args.steps else {}
    guidance = args.guidance if args.guidance is not None else QUALITY_GUIDANCE.get(args.name)
    if guidance is not None:
        call["guidance_scale"] = guidance
    report, _ = evaluate_pipeline(pipe, args.name, n=args.n, seed=args.seed, progress=not args.quiet, **call)
    report["command"] = "accel " + shlex.join(sys.argv[1:])
    summary = {k: report[k] for k in ("n", "attributes", "count", "overall", "image_accuracy", "frechet",
                                      "real_frechet_floor")}
    print(json.dumps(summary, indent=1))
    if args.out:
        _write_report(args.out, report, lambda r: _zoo_markdown(args.name, r))
    return 0


def _write_report(path: str, report: dict, markdown) -> None:
    """`report` plus the machine as JSON at `path`, and `markdown(report)` beside it (.md)."""
    import json
    from pathlib import Path

    from accel.bench import hardware

    report["hardware"] = hardware()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out} and {out.with_suffix('.md')}")


def _zoo_guidance(args: argparse.Namespace) -> int:
    import torch

    from pipelines.zoo import load_reference
    from pipelines.zoo.scoring import scan_guidance

    if args.name == "dlm-tasks":
        print("guidance scans are for the image and video models; dlm-tasks has no guidance", file=sys.stderr)
        return 2
    try:
        scales = [float(g) for g in args.scales.split(",") if g.strip()]
    except ValueError:
        print(f"--scales must be comma-separated numbers, got {args.scales!r}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_reference(args.name, path=args.path)
    pipe.set_progress_bar_config(disable=True)
    call = {"num_inference_steps": args.steps} if args.steps else {}
    try:
        scan = scan_guidance(pipe, args.name, scales, n=args.n, seed=args.seed, progress=not args.quiet, **call)
    except ValueError as e:
        print(str(e), file=sys.stderr)
        return 2
    scan["command"] = "accel " + shlex.join(sys.argv[1:])
    print(_guidance_markdown(scan))
    if args.out:
        _write_report(args.out, scan, _guidance_markdown)
    return 0


def _guidance_markdown(scan: dict) -> str:
    attrs = list(scan["rows"][0]["attributes"])
    lines = [
        f"# {scan['name']}: guidance scan on calibration prompts", "",
        f"`{scan['command']}` — the first {scan['n']} calibration prompts (never the held-out ones), "
        f"{scan['call']}, seeds {scan['seed']}+i; the pipeline's default guidance is {scan['default_guidance']:g}.",
        "", "| guidance | " + " | ".join(attrs) + " | count | overall | fully correct |",
        "|---" * (len(attrs) + 4) + "|",
    ]
    for r in scan["rows"]:
        mark = " (best)" if r["guidance_scale"] == scan["best"] else ""
        lines.append(f"| {r['guidance_scale']:g}{mark} | " + " | ".join(f"{r['attributes'][a]:.1%}" for a in attrs)
                     + f" | {r['count']:.1%} | {r['overall']:.1%} | {r['image_accuracy']:.1%} |")
    lines += ["", f"Best (highest overall adherence, then fully-correct rate): guidance {scan['best']:g}.", ""]
    if "hardware" in scan:
        lines += [f"Hardware: {scan['hardware']}", ""]
    return "\n".join(lines)


def _zoo_markdown(name: str, report: dict) -> str:
    first20 = report["correct"][:20]
    lines = [
        f"# {name}: held-out evaluation", "",
        f"`{report['command']}` — {report['n']} held-out prompts, {report['call']}, seeds {report['seed']}+i.", "",
        "| metric | value |", "|---|---|",
        *[f"| {a} accuracy | {v:.1%} |" for a, v in report["attributes"].items()],
        f"| count correct | {report['count']:.1%} |",
        f"| overall adherence (mean of attributes) | {report['overall']:.1%} |",
        f"| fully correct images | {report['image_accuracy']:.1%} |",
        f"| fully correct, first 20 prompts | {sum(first20)}/{len(first20)} |",
        f"| Fréchet distance to real renders | {report['frechet']:.3f} "
        f"(two halves of the real renders, different scenes: {report['real_frechet_floor']:.3f}) |",
        "", f"Hardware: {report.get('hardware', {})}", "",
    ]
    return "\n".join(lines)


def _search_target(model: str, steps: int, n_prompts: int, prompts_file: str | None):
    """(pipeline, call kwargs, calibration prompts, extra scorer) for ``--model``."""
    from pathlib import Path

    from pipelines.zoo import REFERENCES

    if model == "tiny":
        from pipelines.tiny import build_tiny

        pipe = build_tiny("pixart")
        call, prompts, extra = dict(pipe.tiny_call_kwargs), None, None
    elif model in REFERENCES:
        from pipelines.zoo import load_reference
        from pipelines.zoo.scoring import EVAL_CALL, bench_scorers, calibration_prompts

        pipe = load_reference(model)
        call, prompts = dict(EVAL_CALL[model]), calibration_prompts(model, n_prompts)
        extra = bench_scorers(model)["evaluator_accuracy"]
    elif Path(model).is_dir():
        from diffusers import DiffusionPipeline

        pipe, call, prompts, extra = DiffusionPipeline.from_pretrained(model), {}, None, None
    else:
        raise SystemExit(f"--model {model!r}: not 'tiny', a reference model ({', '.join(REFERENCES)}) "
                         "or a local diffusers pipeline folder")
    if steps:
        call["num_inference_steps"] = steps
    if prompts_file:
        prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    if prompts is None:
        from caching.ecad_search import default_prompts

        prompts = default_prompts()
    return pipe, call, prompts[:n_prompts], extra


def _ecad_search(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from caching.ecad_search import SearchSettings, fidelity_scorer, search

    if args.threads:
        torch.set_num_threads(args.threads)
    n = args.prompts + args.confirm
    pipe, call, prompts, extra = _search_target(args.model, args.steps, n, args.prompts_file)
    if len(prompts) < n:
        raise SystemExit(f"--prompts {args.prompts} --confirm {args.confirm} needs {n} prompts, "
                         f"only {len(prompts)} available")
    prompts, confirm = prompts[:args.prompts], prompts[args.prompts:n]
    scorer = fidelity_scorer
    if extra is not None:
        def scorer(outputs, references, prompts_):
            return {**fidelity_scorer(outputs, references, prompts_), "evaluator_accuracy": extra(outputs, prompts_)}

    settings = SearchSettings(pop_size=args.pop_size, generations=args.generations, seed=args.seed,
                              cost=args.cost, reject_margin=args.reject_margin if args.reject_margin >= 0 else None,
                              profile_seeds=args.profile_seeds, speedup_range=args.speedup_range,
                              latency_threads=args.latency_threads or None, confirm_within=args.confirm_within)
    costs = None
    if args.costs:
        import json

        try:
            costs = json.loads(Path(args.costs).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SystemExit(f"--costs {args.costs}: cannot read a cost table ({e})") from e
    result = search(pipe, prompts, args.work_dir, settings, call_kwargs=call, scorer=scorer, resume=args.resume,
                    progress=not args.quiet, confirm=confirm, costs=costs)
    table = Path(args.work_dir) / "frontier" / "frontier.md"
    if table.exists():
        print(table.read_text())
        print(f"schedules, frontier.md and frontier.png in {table.parent}")
    return 0 if result["frontier"] else 1


def _ecad_show(args: argparse.Namespace) -> int:
    from pathlib import Path

    from caching import ECADConfig
    from caching.ecad_search import heatmap, summary

    config = ECADConfig.load(args.file)
    print(summary(config))
    png = Path(args.png) if args.png else Path(args.file).with_suffix(".png")
    heatmap(config, png)
    print(f"heat-map: {png}")
    return 0


def _ecad_transfer(args: argparse.Namespace) -> int:
    """Run one schedule at the model's default resolution and at ``--size``: speedup kept, PSNR change."""
    import json

    import torch

    from accel.bench import BenchEntry, hardware, run_bench
    from caching import ECADConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, call, _, _ = _search_target(args.model, 0, 0, None)
    from pipelines.zoo import REFERENCES

    prompts = None
    if args.model in REFERENCES:
        from pipelines.zoo.scoring import heldout_prompts

        prompts = heldout_prompts(args.model, args.prompts)
    else:
        from caching.ecad_search import default_prompts

        prompts = default_prompts()[: args.prompts]
    config = ECADConfig.load(args.schedule)
    runs = {}
    for label, extra in (("default", {}), (f"{args.size}px", {"height": args.size, "width": args.size,
                                                              "use_resolution_binning": False})):
        result = run_bench(pipe, [BenchEntry("ECAD", (config,))], prompts, {**call, **extra}, runs=args.runs,
                           progress=not args.quiet, suite=f"ecad-transfer-{label}")
        runs[label] = {k: result["rows"][1][k] for k in ("speedup", "psnr", "ssim", "latency_s")}
        runs[label]["baseline_latency_s"] = result["rows"][0]["latency_s"]
    (a, b) = runs.values()
    report = {"schedule": str(args.schedule), "model": args.model, "size": args.size, "runs": runs,
              "speedup_kept": b["speedup"] / a["speedup"], "psnr_change_db": b["psnr"] - a["psnr"],
              "hardware": hardware(), "command": "accel " + shlex.join(sys.argv[1:])}
    print(json.dumps(report, indent=1))
    if args.out:
        from pathlib import Path

        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")
        md = [f"# ECAD schedule at another resolution ({args.model})", "", f"Command: `{report['command']}`", "",
              f"Schedule: `{args.schedule}` ({config.resolution} at search time); {len(prompts)} held-out prompts; "
              f"{report['hardware'].get('gpu') or report['hardware']['cpu_model']}.", "",
              "| resolution | speedup | PSNR (dB) | SSIM |", "|---|---|---|---|"]
        md += [f"| {k} | {v['speedup']:.3f}× | {v['psnr']:.2f} | {v['ssim']:.4f} |" for k, v in runs.items()]
        md += ["", f"Speedup kept: {report['speedup_kept']:.1%}; PSNR change: {report['psnr_change_db']:+.2f} dB.", ""]
        out.with_suffix(".md").write_text("\n".join(md))
    return 0


def _erta_profile(args: argparse.Namespace) -> int:
    import torch

    from caching.ertacache_profile import make_profile
    from pipelines.zoo import REFERENCES

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe, call, prompts, _ = _search_target(args.model, args.steps, args.prompts, args.prompts_file)
    if args.model in REFERENCES and not args.prompts_file:
        from pipelines.zoo.scoring import calibration_prompts

        prompts = calibration_prompts(args.model, args.prompts)
    profile = make_profile(pipe, prompts, call, target_speedup=None if args.delta is not None else args.target_speedup,
                           delta=args.delta, warmup=args.warmup, seed=args.seed, scalar=args.scalar,
                           fit_phi=not args.no_phi, mask_rule=args.mask_rule, progress=not args.quiet)
    profile.save(args.out)
    print(f"mask {profile.mask} ({profile.reuse_fraction:.0%} of steps reused, delta "
          f"{profile.calibration['delta']:.4g}); phi on reused steps: "
          + " ".join(f"{p:.3f}" for p, m in zip(profile.phi, profile.mask) if m == "R"))
    print(f"wrote {args.out}")
    return 0


def _app(args: argparse.Namespace) -> int:
    from app.gradio_app import launch

    launch(args.host, args.port, preload_default=not args.no_preload)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="accel", description="Diffusion acceleration suite")
    parser.add_argument("--version", action="version", version="accel-suite 0.1.0")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench", help="run a benchmark suite and write JSON + markdown")
    bench.add_argument("suite", nargs="?", default="tiny", help="suite name (default: tiny)")
    bench.add_argument("--runs", type=int, default=0, help="timed runs per method (default: the suite's)")
    bench.add_argument("--prompts", type=int, default=0, help="use only the first N prompts")
    bench.add_argument("--out", default="benchmarks/results", help="output folder")
    bench.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    bench.add_argument("--quiet", action="store_true", help="no progress bar")
    bench.add_argument("--schedules", help="ecad-*/erta-* suites: a folder of schedules/profiles (default: shipped)")
    bench.add_argument("--path", help="dllm: a trained dlm-tasks pipeline folder (default: the shipped one); "
                       "one-step: LABEL=FOLDER[,LABEL=FOLDER...] of exported students")
    bench.add_argument("--adapter", help="nct-control: the folder `accel distill nct` wrote (OUTPUT_DIR/adapter)")
    bench.add_argument("--shape", default="wan-1.3b-480p", help="sparse-kernel: wan-1.3b-480p, cogvideox1.5, "
                       "hunyuan-720p")
    bench.add_argument("--device", help="dllm: where the model runs (default: the CPU)")
    bench.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"], help="sparse-kernel: input dtype")
    bench.set_defaults(func=_bench)

    zoo = sub.add_parser("zoo", help="reference models: train and evaluate")
    zsub = zoo.add_subparsers(dest="zoo_command", required=True)
    zt = zsub.add_parser("train", help="train (or resume training) a reference model")
    zt.add_argument("name", help="shapes-t2i, shapes-t2v or dlm-tasks")
    zt.add_argument("--work-dir", help="checkpoints and caches (default runs/NAME); rerun to resume")
    zt.add_argument("--out", help="where the pipeline is written (default WORK_DIR/pipeline)")
    zt.add_argument("--threads", type=int, default=0, help="torch CPU threads")
    zt.add_argument("--stop-at", type=int, help="stop at the first checkpoint at or after this denoiser step")
    zt.add_argument("--steps", type=int, default=0,
                    help="denoiser steps (default: the recipe's); a larger value continues a finished run")
    zt.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available, else the CPU)")
    zt.add_argument("--quiet", action="store_true")
    zt.set_defaults(func=_zoo_train)
    zx = zsub.add_parser("export", help="save the pipeline at a training run's latest checkpoint (to score it "
                                        "before the run ends)")
    zx.add_argument("name", help="shapes-t2i or shapes-t2v")
    zx.add_argument("--work-dir", required=True, help="the work dir of `accel zoo train`")
    zx.add_argument("--out", help="pipeline folder (default WORK_DIR/exports/stepN-ema)")
    zx.add_argument("--no-ema", action="store_true", help="the trained weights instead of their EMA")
    zx.set_defaults(func=_zoo_export)
    ze = zsub.add_parser("eval", help="score a reference model on held-out prompts")
    ze.add_argument("name", help="shapes-t2i, shapes-t2v or dlm-tasks")
    ze.add_argument("--path", help="a trained pipeline folder (default: the shipped weights)")
    ze.add_argument("--n", type=int, default=200, help="number of held-out prompts")
    ze.add_argument("--steps", type=int, default=0, help="inference steps (default: the model's evaluation setting)")
    ze.add_argument("--seed", type=int, default=0)
    ze.add_argument("--guidance", type=float, default=None,
                    help="classifier-free guidance (default: the model's quality setting, chosen on calibration "
                         "prompts by `accel zoo guidance`; 2.5 for shapes-t2i, the pipeline's default otherwise)")
    ze.add_argument("--out", help="write the full report (JSON) here")
    ze.add_argument("--threads", type=int, default=0)
    ze.add_argument("--quiet", action="store_true")
    ze.set_defaults(func=_zoo_eval)
    zg = zsub.add_parser("guidance", help="score guidance scales on calibration prompts (never held-out ones)")
    zg.add_argument("name", help="shapes-t2i or shapes-t2v")
    zg.add_argument("--path", help="a trained pipeline folder (default: the shipped weights)")
    zg.add_argument("--scales", default="1.5,2,2.5,3,3.5,4.5", help="comma-separated guidance scales")
    zg.add_argument("--n", type=int, default=128, help="number of calibration prompts")
    zg.add_argument("--steps", type=int, default=0, help="inference steps (default: the model's evaluation setting)")
    zg.add_argument("--seed", type=int, default=1000, help="prompt i is drawn with seed SEED+i")
    zg.add_argument("--out", help="write the scan (JSON, and markdown beside it) here")
    zg.add_argument("--threads", type=int, default=0)
    zg.add_argument("--quiet", action="store_true")
    zg.set_defaults(func=_zoo_guidance)

    ecad = sub.add_parser("ecad", help="ECAD cache schedules: search and inspect")
    esub = ecad.add_subparsers(dest="ecad_command", required=True)
    es = esub.add_parser("search", help="NSGA-II search for a speed/quality frontier of schedules")
    es.add_argument("--model", default="shapes-t2i",
                    help="'tiny', a reference model name, or a local diffusers pipeline folder")
    es.add_argument("--work-dir", required=True, help="checkpoints and the frontier (frontier/ inside)")
    es.add_argument("--resume", action="store_true", help="continue a search stopped in WORK_DIR")
    es.add_argument("--prompts", type=int, default=8, help="number of calibration prompts")
    es.add_argument("--prompts-file", help="calibration prompts, one per line (default: the shipped list)")
    es.add_argument("--steps", type=int, default=0, help="inference steps (default: the model's)")
    es.add_argument("--pop-size", type=int, default=72)
    es.add_argument("--generations", type=int, default=20)
    es.add_argument("--cost", choices=("latency", "macs"), default="latency")
    es.add_argument("--reject-margin", type=float, default=3.0, help="early rejection margin in dB (<0: off)")
    es.add_argument("--seed", type=int, default=0)
    es.add_argument("--profile-seeds", action="store_true",
                    help="also seed with step masks from the uncached run's residual profile")
    es.add_argument("--speedup-range", type=float, nargs=2, metavar=("LO", "HI"),
                    help="only run schedules whose estimated speedup is in [LO, HI] (the population refines that band)")
    es.add_argument("--confirm", type=int, default=0, metavar="N",
                    help="after the generations, re-score the schedules near the frontier on N more calibration "
                         "prompts and draw the frontier from the mean over all (works on a finished search with "
                         "--resume)")
    es.add_argument("--confirm-within", type=float, default=0.75, metavar="DB",
                    help="with --confirm: re-score schedules at most DB below the frontier (default 0.75)")
    es.add_argument("--costs", metavar="COSTS_JSON",
                    help="reuse the cost table (costs.json) of an earlier search instead of timing the components "
                         "again: the same table, seed and prompts give the same frontier")
    es.add_argument("--threads", type=int, default=0)
    es.add_argument("--latency-threads", type=int, default=0,
                    help="CPU threads while timing components for the latency cost model (default: --threads); "
                         "set it to the thread count the schedules will run at, e.g. under torchrun")
    es.add_argument("--quiet", action="store_true")
    es.set_defaults(func=_ecad_search)
    eshow = esub.add_parser("show", help="summarise a schedule file and draw its heat-map")
    eshow.add_argument("file")
    eshow.add_argument("--png", help="heat-map path (default: FILE with .png)")
    eshow.set_defaults(func=_ecad_show)
    et = esub.add_parser("transfer", help="check a schedule at a second resolution (speedup kept, PSNR change)")
    et.add_argument("schedule")
    et.add_argument("--model", default="shapes-t2i")
    et.add_argument("--size", type=int, default=320, help="second resolution in pixels (binning off)")
    et.add_argument("--prompts", type=int, default=16)
    et.add_argument("--runs", type=int, default=5)
    et.add_argument("--threads", type=int, default=0)
    et.add_argument("--out", help="write JSON (and .md) here")
    et.add_argument("--quiet", action="store_true")
    et.set_defaults(func=_ecad_transfer)

    erta = sub.add_parser("erta", help="ERTACache: offline profiling")
    rsub = erta.add_subparsers(dest="erta_command", required=True)
    rp = rsub.add_parser("profile", help="profile a pipeline on calibration prompts and write a profile file")
    rp.add_argument("--model", default="shapes-t2i",
                    help="'tiny', a reference model name, or a local diffusers pipeline folder")
    rp.add_argument("--out", required=True, help="profile JSON to write")
    rp.add_argument("--target-speedup", type=float, default=2.0, help="reuse 1 - 1/target of the steps")
    rp.add_argument("--delta", type=float, help="relative-error threshold instead of a target speedup")
    rp.add_argument("--prompts", type=int, default=16)
    rp.add_argument("--prompts-file")
    rp.add_argument("--steps", type=int, default=0)
    rp.add_argument("--warmup", type=int, default=1, help="leading steps that always compute")
    rp.add_argument("--scalar", action="store_true", help="one rectification gain per step, no offset")
    rp.add_argument("--no-phi", action="store_true", help="do not fit interval coefficients (phi = 1)")
    rp.add_argument("--mask-rule", choices=("greedy", "min-sum"), default="greedy",
                    help="greedy: the spec's threshold walk; min-sum: the target's reuse count at the least "
                         "summed residual error (exact dynamic program)")
    rp.add_argument("--seed", type=int, default=0)
    rp.add_argument("--threads", type=int, default=0)
    rp.add_argument("--quiet", action="store_true")
    rp.set_defaults(func=_erta_profile)

    from app import cli_sparse

    cli_sparse.add_parser(sub)
    from distill import run as distill_run

    app = sub.add_parser("app", help="the Gradio app: baseline vs accelerated side by side")
    app.add_argument("--host", default="127.0.0.1", help="bind address (default: 127.0.0.1, this machine only)")
    app.add_argument("--port", type=int, default=7860)
    app.add_argument("--no-preload", action="store_true", help="do not load the default model at start")
    app.set_defaults(func=_app)

    dist = sub.add_parser("distill", help="one-step distillation of a teacher pipeline (dmd, sid); accelerate")
    distill_run.add_arguments(dist)
    dist.set_defaults(func=distill_run.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    finally:
        _end_process_group()


def _end_process_group() -> None:
    """Under a ``torch.distributed`` launcher, tear the process group down before the interpreter exits: gloo
    threads still running at exit abort a process that finished its work."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
