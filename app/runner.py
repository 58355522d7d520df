"""The app's engine, without any UI: lazily loaded models, the method catalogue, side-by-side runs.

    >>> from app.runner import Runner
    >>> runner = Runner()
    >>> out = runner.run_image("tiny", "a red circle", seed=0, steps=4, method="StaticCache", setting="interval 2")
    >>> sorted(out["metrics"])[:3]
    ['PSNR (dB)', 'SSIM', 'accelerated (s)']

Every run makes a baseline and an accelerated output on the same seed, times both, and scores
the accelerated one against the baseline (PSNR/SSIM; the shapes evaluator's adherence on the
reference models; exact match of the baseline answer for text). Bad input raises :class:`AppError`
with a message for the UI; the pipeline is always left without plug-ins.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import accel
from pipelines.zoo import REFERENCES  # models with shipped schedules/profiles and an evaluator

LIMITS = {"steps": (1, 50), "size": (64, 512), "frames": (1, 33), "gen_length": (32, 256)}
IMAGE_MODELS = ("shapes-t2i", "tiny")
VIDEO_MODELS = ("shapes-t2v", "tiny-wan")
TEXT_MODELS = ("dlm-tasks", "tiny-dlm")
CACHE_METHODS = ("ECAD", "ERTACache", "StaticCache", "FirstBlockCache", "TaylorSeer")
VIDEO_METHODS = ("StaticCache", "FirstBlockCache", "ERTACache", "Sparse attention", "StaticCache + Sparse attention")
TEXT_METHODS = ("dKV-Cache decode", "dKV-Cache greedy", "dKV-Cache prefill", "Fast-dLLM prefix", "Fast-dLLM dual",
                "parallel decoding", "dKV-Cache decode + parallel")


class AppError(Exception):
    """A problem to show in the UI (bad input, a model that cannot be loaded, an unsupported method)."""


def _bounded(name: str, value, kind: str) -> int:
    lo, hi = LIMITS[kind]
    try:
        value = int(value)
    except (TypeError, ValueError):
        raise AppError(f"{name} must be a whole number, got {value!r}") from None
    if not lo <= value <= hi:
        raise AppError(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _tiny_dlm():
    """A tiny random diffusion LM (for demos and tests; its answers are meaningless)."""
    from pipelines.diffusion_lm import DiffusionLMPipeline
    from pipelines.zoo.dlm import DLMRecipe, build_model, build_tokenizer

    tokenizer = build_tokenizer()
    model = build_model(DLMRecipe(hidden=32, layers=2, heads=2, intermediate=64), len(tokenizer)).eval()
    pipe = DiffusionLMPipeline(model, tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Runner:
    """Loads models on first use and keeps them; one call at a time (the UI queues jobs)."""

    models: dict = field(default_factory=dict)
    history: list = field(default_factory=list)       # live runs: (tab, model, method, speedup, psnr)
    warmed: set = field(default_factory=set)
    lock: threading.RLock = field(default_factory=threading.RLock)

    def warm(self, kind: str, name: str):
        """Load and run once untimed (first calls pay one-off initialisation that would skew latency)."""
        with self.lock:
            pipe = self.load(kind, name)
            if (kind, name) not in self.warmed:
                call = dict(getattr(pipe, "tiny_call_kwargs", {}))
                call.update(num_inference_steps=1, output_type="pt", **_no_caption_cleaning(pipe))
                if kind == "video" and name == "tiny-wan":
                    call.update(height=64, width=96, num_frames=9)
                if kind in ("image", "video"):
                    pipe("warm-up", generator=torch.Generator().manual_seed(0), **call)
                self.warmed.add((kind, name))
            return pipe

    # -- models ----------------------------------------------------------------------------------
    def load(self, kind: str, name: str):
        key = (kind, name)
        if key in self.models:
            return self.models[key]
        try:
            pipe = self._load(kind, name)
        except AppError:
            raise
        except Exception as exc:   # noqa: BLE001 - every loading failure becomes a UI message
            message = f"cannot load {kind} model {name!r}: {type(exc).__name__}: {exc}"
            raise AppError(message.splitlines()[0][:400]) from None
        self.models[key] = pipe
        return pipe

    def _load(self, kind: str, name: str):
        from pipelines.zoo import REFERENCES, TEXT_REFERENCES, load_reference

        name = (name or "").strip()
        if not name:
            raise AppError("choose a model")
        if kind == "text":
            if name == "tiny-dlm":
                return _tiny_dlm()
            if name in TEXT_REFERENCES:
                return self._reference(load_reference, name)
            if Path(name).is_dir():
                from pipelines.zoo.dlm import load_pipeline

                return load_pipeline(name)
            raise AppError(f"unknown text model {name!r}: use dlm-tasks, tiny-dlm or a local folder")
        if name in ("tiny", "tiny-wan"):
            from pipelines.tiny import build_tiny

            pipe = build_tiny("pixart" if name == "tiny" else "wan")
        elif name in REFERENCES:
            pipe = self._reference(load_reference, name)
        else:
            from diffusers import DiffusionPipeline

            if not Path(name).is_dir():
                # offline: only the local Hugging Face cache can serve a model id
                pipe = DiffusionPipeline.from_pretrained(name, local_files_only=True)
            else:
                pipe = DiffusionPipeline.from_pretrained(name)
        if hasattr(pipe, "set_progress_bar_config"):
            pipe.set_progress_bar_config(disable=True)
        return pipe

    @staticmethod
    def _reference(load_reference, name: str):
        try:
            return load_reference(name)
        except (FileNotFoundError, ValueError) as exc:
            raise AppError(f"{name} is not available: {exc}") from None

    # -- methods ---------------------------------------------------------------------------------
    def settings(self, kind: str, model: str, method: str) -> list[str]:
        """Choices of the method's own control (a file path may also be typed in the UI)."""
        from caching.ecad_search import shipped_schedules
        from caching.ertacache import ERTACacheConfig

        if method == "ECAD":
            return _labels(shipped_schedules(model), _ecad_label) if model in REFERENCES else []
        if method == "ERTACache":
            return _labels(shipped_schedules(model, "profiles", ERTACacheConfig),
                           _erta_label) if model in REFERENCES else []
        if method.startswith("StaticCache"):
            return ["interval 2", "interval 3", "interval 4"]
        if method == "FirstBlockCache":
            return ["threshold 0.05", "threshold 0.1", "threshold 0.2", "threshold 0.3"]
        if method == "TaylorSeer":
            return ["interval 2", "interval 3"]
        if method == "Sparse attention":
            return ["diag r=1", "diag r=0", "mdiag r=0"]
        if kind == "text":
            return ["refresh 8", "refresh 4", "refresh 16"] if "decode" in method or "prefill" in method else \
                ["tau 0.9", "tau 0.7"] if "parallel" in method else ["window 32"]
        return []

    def configs(self, kind: str, model: str, pipe, method: str, setting: str, call: dict) -> tuple:
        from diffusers import FirstBlockCacheConfig, TaylorSeerCacheConfig

        from caching import ECADConfig, ERTACacheConfig, StaticCacheConfig

        setting = (setting or "").strip()
        number = _number(setting)
        if method == "ECAD":
            return (self._file_or_shipped(ECADConfig, model, setting, "schedules"),)
        if method == "ERTACache":
            return (self._file_or_shipped(ERTACacheConfig, model, setting, "profiles"),)
        if method == "StaticCache":
            return (StaticCacheConfig(interval=int(number or 2), warmup_steps=1),)
        if method == "FirstBlockCache":
            return (FirstBlockCacheConfig(threshold=number or 0.1),)
        if method == "TaylorSeer":
            return (TaylorSeerCacheConfig(cache_interval=int(number or 2), max_order=1, disable_cache_before_step=1),)
        if method == "Sparse attention":
            return (self._plan(pipe, setting, call),)
        if method == "StaticCache + Sparse attention":
            return (StaticCacheConfig(interval=2, warmup_steps=1), self._plan(pipe, "diag r=1", call))
        raise AppError(f"method {method!r} is not available for {kind}")

    def _file_or_shipped(self, cls, model: str, setting: str, kind: str):
        from caching.ecad_search import shipped_schedules

        if setting and Path(setting).is_file():
            return cls.load(setting)
        shipped = shipped_schedules(model, kind, cls) if model in REFERENCES else []
        labels = _labels(shipped, _ecad_label if kind == "schedules" else _erta_label)
        if not shipped:
            raise AppError(f"no shipped {cls.__name__} for {model!r}: type the path of a schedule/profile file made "
                           f"for this model (`accel ecad search` / `accel erta profile`)")
        if setting in labels:
            return shipped[labels.index(setting)]
        return shipped[len(shipped) // 2]

    def _plan(self, pipe, setting: str, call: dict):
        from accel.attention import SparseAttentionConfig
        from accel.attention.processors import _stock_classes

        if setting and Path(setting).is_file():
            return SparseAttentionConfig.load(setting)
        model = pipe.transformer
        name = type(model).__name__
        if name not in _stock_classes():
            raise AppError(f"sparse attention supports {', '.join(_stock_classes())}; this model is {name}")
        grid = _video_grid(pipe, call)
        mode, r = (setting or "diag r=1").split(" r=")
        heads = model.config.num_attention_heads
        from accel.adapters import get_adapter

        layers = len(get_adapter(model).self_attention_modules(model))
        n = grid[0] * grid[1] * grid[2]
        block = next((b for b in (128, 64, 32, 16) if n / b >= 16), 16)
        text = {"WanTransformer3DModel": "none", "HunyuanVideoTransformer3DModel": "suffix"}.get(name, "prefix")
        return SparseAttentionConfig.uniform(name, grid=grid, layers=layers, heads=heads, mode=mode, r=int(r),
                                             block=block, dense_warmup=0.2, dense_layers=(0,),
                                             text={"position": text, "length": 0})

    # -- runs ------------------------------------------------------------------------------------
    def _pair(self, pipe, configs: tuple, call_fn):
        accel.remove(pipe)
        t0 = time.perf_counter()
        base = call_fn()
        t_base = time.perf_counter() - t0
        try:
            accel.apply(pipe, *configs)
        except (ValueError, TypeError) as exc:
            raise AppError(f"cannot apply {', '.join(type(c).__name__ for c in configs)}: {exc}") from None
        try:
            t0 = time.perf_counter()
            fast = call_fn()
            t_fast = time.perf_counter() - t0
        except accel.ConfigError as exc:
            raise AppError(str(exc)) from None
        finally:
            accel.remove(pipe)
        return base, fast, t_base, t_fast

    def _locked(fn):
        @functools.wraps(fn)
        def wrapper(self, *args, **kwargs):
            with self.lock:
                return fn(self, *args, **kwargs)
        return wrapper

    @_locked
    def run_image(self, model: str, prompt: str, seed: int = 0, steps: int = 20, method: str = "ECAD",
                  setting: str = "", size: int | None = None) -> dict:
        from accel.metrics import psnr, ssim

        steps = _bounded("steps", steps, "steps")
        if not (prompt or "").strip():
            raise AppError("enter a prompt")
        pipe = self.warm("image", model)
        call = {"num_inference_steps": steps, **_no_caption_cleaning(pipe)}
        if model == "tiny":
            call = {**pipe.tiny_call_kwargs, **call}
        elif size:
            size = _bounded("resolution", size, "size")
            call.update(height=size, width=size)
        configs = self.configs("image", model, pipe, method, setting, call)

        call["output_type"] = "pt"

        def generate():
            return pipe(prompt, generator=torch.Generator().manual_seed(int(seed)), **call).images

        base, fast, t_base, t_fast = self._pair(pipe, configs, generate)
        metrics = {"baseline (s)": t_base, "accelerated (s)": t_fast, "speedup": t_base / max(t_fast, 1e-9),
                   "PSNR (dB)": psnr(fast, base), "SSIM": ssim(fast, base)}
        if model == "shapes-t2i":
            from pipelines.zoo.evaluate import score_images

            metrics["adherence baseline"] = score_images([_pil(base[0])], [prompt])["overall"]
            metrics["adherence accelerated"] = score_images([_pil(fast[0])], [prompt])["overall"]
        self.history.append({"tab": "image", "model": model, "method": f"{method} {setting}".strip(),
                             "speedup": metrics["speedup"], "quality": min(metrics["PSNR (dB)"], 60.0)})
        return {"baseline": _pil(base[0]), "accelerated": _pil(fast[0]), "metrics": _rounded(metrics)}

    @_locked
    def run_video(self, model: str, prompt: str, seed: int = 0, steps: int = 20, method: str = "StaticCache",
                  setting: str = "", frames: int | None = None, size: int | None = None) -> dict:
        from accel.metrics import psnr

        steps = _bounded("steps", steps, "steps")
        if not (prompt or "").strip():
            raise AppError("enter a prompt")
        pipe = self.warm("video", model)
        from pipelines.zoo.scoring import EVAL_CALL

        # the reference model's training text length; frames, size and steps come from the controls
        call = dict(pipe.tiny_call_kwargs) if model == "tiny-wan" else \
            {k: v for k, v in EVAL_CALL.get(model, {}).items() if k == "max_sequence_length"}
        if model == "tiny-wan":
            call.update(height=64, width=96, num_frames=9)
        if frames:
            call["num_frames"] = _bounded("frames", frames, "frames")
        if size:
            size = _bounded("resolution", size, "size")
            call.update(height=size, width=size)
        call.update(num_inference_steps=steps, output_type="pt")
        configs = self.configs("video", model, pipe, method, setting, call)

        def generate():
            return pipe(prompt, generator=torch.Generator().manual_seed(int(seed)), **call).frames

        base, fast, t_base, t_fast = self._pair(pipe, configs, generate)
        metrics = {"baseline (s)": t_base, "accelerated (s)": t_fast, "speedup": t_base / max(t_fast, 1e-9),
                   "PSNR (dB)": psnr(fast[0], base[0])}
        if model == "shapes-t2v":
            from pipelines.zoo.evaluate import score_clips

            def clip(x):
                return x.clamp(0, 1).permute(0, 2, 3, 1)          # [T, C, H, W] -> THWC in [0, 1]

            metrics["adherence baseline"] = score_clips([clip(base[0])], [prompt])["overall"]
            metrics["adherence accelerated"] = score_clips([clip(fast[0])], [prompt])["overall"]
        self.history.append({"tab": "video", "model": model, "method": f"{method} {setting}".strip(),
                             "speedup": metrics["speedup"], "quality": min(metrics["PSNR (dB)"], 60.0)})
        return {"baseline": _mp4(base[0]), "accelerated": _mp4(fast[0]), "metrics": _rounded(metrics)}

    @_locked
    def run_text(self, model: str, prompt: str, method: str = "dKV-Cache decode", setting: str = "",
                 gen_length: int = 64, block_length: int = 32, on_baseline=None) -> dict:
        """``on_baseline(text, seconds)`` is called as soon as the baseline answer is ready."""
        from caching import DKVCacheConfig

        gen_length = _bounded("generation length", gen_length, "gen_length")
        if not (prompt or "").strip():
            raise AppError("enter a prompt")
        if gen_length % int(block_length):
            raise AppError(f"generation length {gen_length} must be a multiple of the block length {block_length}")
        pipe = self.load("text", model)
        number = _number(setting)
        threshold = None
        configs: tuple = ()
        variants = {"decode": "decode", "greedy": "greedy", "prefill": "prefill", "prefix": "prefix", "dual": "dual"}
        for word, variant in variants.items():
            if word in method:
                kw = {"refresh_interval": int(number or 8)} if variant in ("decode", "prefill") else {}
                configs = (DKVCacheConfig(variant=variant, **kw),)
        if "parallel" in method:
            threshold = number if number and number < 1 else 0.9
        if not configs and threshold is None:
            raise AppError(f"unknown text method {method!r}")
        call = {"gen_length": gen_length, "block_length": int(block_length), "steps": gen_length}

        def generate(extra):
            def go():
                return pipe([prompt], **call, **extra)[0]
            return go

        accel.remove(pipe)
        t0 = time.perf_counter()
        base = generate({})()
        t_base = time.perf_counter() - t0
        if on_baseline is not None:
            on_baseline(base, t_base)
        extra = {"threshold": threshold} if threshold is not None else {}
        if configs:
            accel.apply(pipe, *configs)
        try:
            t0 = time.perf_counter()
            fast = generate(extra)()
            t_fast = time.perf_counter() - t0
        finally:
            accel.remove(pipe)
        tokens = gen_length
        metrics = {"baseline (s)": t_base, "accelerated (s)": t_fast, "speedup": t_base / max(t_fast, 1e-9),
                   "baseline tokens/s": tokens / t_base, "accelerated tokens/s": tokens / t_fast,
                   "same answer": float(fast == base)}
        if model == "dlm-tasks":     # the reference model's own tasks: is the answer right?
            from pipelines.zoo.dlm import sample_tasks

            known = {t.prompt: t.answer for t in sample_tasks("heldout", 512) + sample_tasks("calibration", 512)}
            if prompt in known:
                metrics["baseline correct"] = float(base == known[prompt])
                metrics["accelerated correct"] = float(fast == known[prompt])
        self.history.append({"tab": "text", "model": model, "method": f"{method} {setting}".strip(),
                             "speedup": metrics["speedup"],
                             "quality": 100 * metrics.get("accelerated correct", metrics["same answer"])})
        return {"baseline": base, "accelerated": fast, "metrics": _rounded(metrics)}

    @_locked
    def run_one_step(self, teacher: str, student: str, prompt: str, seed: int = 0, steps: int = 20) -> dict:
        from accel.metrics import psnr

        steps = _bounded("steps", steps, "steps")
        if not (student or "").strip() or not Path(student).is_dir():
            raise AppError("give the folder of a distilled one-step pipeline (`accel distill dmd … --output-dir D` "
                           "writes D/pipeline)")
        t_pipe = self.warm("image", teacher)
        key = ("student", student)
        if key not in self.models:
            from pipelines.one_step import OneStepPixArtPipeline

            try:
                s = OneStepPixArtPipeline.from_pretrained(student)
            except Exception as exc:  # noqa: BLE001
                raise AppError(f"cannot load the student {student!r}: {exc}".splitlines()[0][:400]) from None
            s.set_progress_bar_config(disable=True)
            self.models[key] = s
        s_pipe = self.models[key]
        call = dict(t_pipe.tiny_call_kwargs) if teacher == "tiny" else {}
        call.pop("num_inference_steps", None)
        g = int(seed)
        t0 = time.perf_counter()
        base = t_pipe(prompt, generator=torch.Generator().manual_seed(g), num_inference_steps=steps,
                      **{**call, "output_type": "pt"}).images
        t_base = time.perf_counter() - t0
        t0 = time.perf_counter()
        fast = s_pipe(prompt, generator=torch.Generator().manual_seed(g), **{**call, "output_type": "pt"}).images
        t_fast = time.perf_counter() - t0
        metrics = {"teacher (s)": t_base, "student (s)": t_fast, "speedup": t_base / max(t_fast, 1e-9),
                   "PSNR vs teacher (dB)": psnr(fast, base), "denoiser calls": f"{steps} vs 1"}
        if teacher == "shapes-t2i":
            from pipelines.zoo.evaluate import score_images

            metrics["adherence teacher"] = score_images([_pil(base[0])], [prompt])["overall"]
            metrics["adherence student"] = score_images([_pil(fast[0])], [prompt])["overall"]
        return {"baseline": _pil(base[0]), "accelerated": _pil(fast[0]), "metrics": _rounded(metrics)}

    # -- the speed/quality plot ------------------------------------------------------------------
    def frontier_points(self, model: str = "shapes-t2i", tab: str = "image") -> list[dict]:
        """Every (method, speedup, quality) measured on ``model``: benchmark files plus live runs.
        Quality is PSNR vs the baseline (dB) for images and video, exact match (%) for text."""
        quality = "exact match (%)" if tab == "text" else "PSNR (dB)"
        points = []
        results = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
        suites = {"image": ("ecad-shapes-t2i", "erta-shapes-t2i"),
                  "video": ("sparse-shapes-t2v", "erta-shapes-t2v", "shapes-t2v"), "text": ("dllm",)}[tab]
        reference = {"image": "shapes-t2i", "video": "shapes-t2v", "text": "dlm-tasks"}[tab]
        for name in suites:
            path = results / f"{name}.json"
            if model != reference or not path.exists():
                continue
            for row in json.loads(path.read_text()).get("rows", []):
                if tab == "text":
                    if row.get("prompts") == "short" and row.get("batch") == 1:
                        points.append({"method": row["method"], "speedup": row["speedup"],
                                       quality: 100 * row["exact_match"], "source": "benchmark"})
                elif row.get("speedup") is not None and row.get("psnr") is not None:
                    points.append({"method": row.get("family") or row.get("name", "?"), "speedup": row["speedup"],
                                   quality: min(row["psnr"], 60.0), "source": "benchmark"})
        for h in self.history:
            if h["model"] == model and h["tab"] == tab and h.get("quality") is not None:
                points.append({"method": h["method"], "speedup": h["speedup"], quality: h["quality"],
                               "source": "live"})
        return points


def _labels(configs, label) -> list[str]:
    """``label`` of each config, numbered where two read the same (a frontier can hold two schedules
    with equal measured speedup, PSNR and computation count): every choice picks its own file."""
    out, seen = [], {}
    for c in configs:
        text = label(c)
        seen[text] = seen.get(text, 0) + 1
        out.append(text if seen[text] == 1 else f"{text} ({seen[text]})")
    return out


def _erta_label(cfg) -> str:
    """A profile by its reuse fraction and mask (C: compute, R: reuse), and its mask rule unless greedy
    (two rules can give the same mask at one reuse count: the labels must still differ)."""
    rule = (cfg.calibration or {}).get("mask_rule", "greedy")
    return f"reuse {cfg.reuse_fraction:.0%} ({cfg.mask})" + ("" if rule == "greedy" else f" {rule}")


def _no_caption_cleaning(pipe) -> dict:
    """PixArt pipelines clean captions with bs4 by default and warn on every call without it; both
    sides of a comparison run without cleaning."""
    import inspect

    return {"clean_caption": False} if "clean_caption" in inspect.signature(pipe.__call__).parameters else {}


def _ecad_label(cfg) -> str:
    """A frontier point as the search measured it: speedup and PSNR on the calibration prompts."""
    prov = cfg.provenance or {}
    speed, q = prov.get("speedup"), prov.get("psnr")
    parts = [f"{speed:.2f}x" if isinstance(speed, (int, float)) else "?x",
             f"{q:.1f} dB" if isinstance(q, (int, float)) else "? dB", f"{cfg.computations()} computations"]
    return " · ".join(parts)


def _number(setting: str) -> float | None:
    import re

    m = re.search(r"(\d+(?:\.\d+)?)", setting or "")
    return float(m.group(1)) if m else None


def _rounded(metrics: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in metrics.items()}


def _pil(image: torch.Tensor):
    from PIL import Image

    arr = (image.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr)


def _mp4(frames: torch.Tensor) -> str:
    """Frames [T, C, H, W] in [0, 1] to an .mp4 file (imageio's ffmpeg), or a GIF without it."""
    import tempfile

    import numpy as np

    arr = (frames.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    try:
        import imageio.v3 as iio

        path = tempfile.NamedTemporaryFile(suffix=".mp4", delete=False).name
        iio.imwrite(path, arr, fps=8, codec="libx264")
    except Exception:  # noqa: BLE001 - no ffmpeg: fall back to an animated GIF
        from PIL import Image

        path = tempfile.NamedTemporaryFile(suffix=".gif", delete=False).name
        images = [Image.fromarray(np.ascontiguousarray(f)) for f in arr]
        images[0].save(path, save_all=True, append_images=images[1:], duration=125, loop=0)
    return path


def _video_grid(pipe, call: dict) -> tuple[int, int, int]:
    model = pipe.transformer
    patch = model.config.patch_size
    pt, ph, pw = patch if isinstance(patch, (tuple, list)) else (getattr(model.config, "patch_size_t", None) or 1,
                                                                 patch, patch)
    t_scale = getattr(pipe, "vae_scale_factor_temporal", 4)
    s_scale = getattr(pipe, "vae_scale_factor_spatial", 8)
    frames = (call.get("num_frames", 81) - 1) // t_scale + 1
    return (-(-frames // pt), call.get("height", 480) // s_scale // ph, call.get("width", 832) // s_scale // pw)
