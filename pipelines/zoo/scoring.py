"""Score a reference pipeline on held-out prompts, and scorers for `accel bench`.

    >>> from pipelines.zoo import load_reference
    >>> from pipelines.zoo.scoring import evaluate_pipeline
    >>> report = evaluate_pipeline(load_reference("shapes-t2i"), "shapes-t2i", n=20)
    >>> report["image_accuracy"], report["attributes"]
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from tqdm.auto import tqdm

from .evaluate import as_clip, as_image, features, frechet_distance, score_clips, score_images
from .recipes import RECIPES
from .shapes import caption, render_clip, render_image, sample_scenes

# call settings of each reference model's evaluation: the size the model was trained at (WanPipeline's
# defaults are 480 x 832, 81 frames and 512 text positions)
EVAL_CALL = {
    # clean_caption: PixArt's web-text cleaning needs bs4 (and warns on every call without it); our
    # captions are plain lowercase words, so it is off either way
    "shapes-t2i": {"num_inference_steps": 20, "clean_caption": False},
    "shapes-t2v": {"num_inference_steps": 20, "height": 128, "width": 128, "num_frames": 17,
                   "max_sequence_length": RECIPES["shapes-t2v"].text_pad_length},
}


def is_video(name: str) -> bool:
    return name.endswith("t2v")


def heldout_scenes(name: str, n: int, start: int = 0):
    return sample_scenes("heldout", n, start=start, video=is_video(name))


def heldout_prompts(name: str, n: int = 20, start: int = 0) -> list[str]:
    """The first `n` held-out prompts (the fixed list of 20 is `heldout_prompts(name, 20)`)."""
    return [caption(s) for s in heldout_scenes(name, n, start)]


def calibration_prompts(name: str, n: int = 16) -> list[str]:
    return [caption(s) for s in sample_scenes("calibration", n, video=is_video(name))]


def _render(name: str, scene, call: dict):
    if is_video(name):
        return render_clip(scene, call["num_frames"], call["height"])
    return render_image(scene)


def _frames(output):
    """Images (PIL or HWC) or clips (THWC) of a pipeline call, one per prompt."""
    return list(output.images) if hasattr(output, "images") else list(output.frames)


def _feats(name, outputs):
    # a clip is described by its middle frame's features
    return np.stack([features(o[len(o) // 2] if is_video(name) else o) for o in outputs])


def score_outputs(name: str, outputs, prompts) -> dict:
    return (score_clips if is_video(name) else score_images)(outputs, prompts)


# the classifier-free guidance each reference model's *quality* is read at (`accel zoo eval`), chosen on
# calibration prompts, never held-out ones, by `accel zoo guidance NAME` (benchmarks/results/
# zoo-shapes-t2i-guidance.md: on 128 calibration prompts, 86.7 % of images fully correct at 2.5 against
# 66.4 % at PixArt's default 4.5; shape is what high guidance spoils). Acceleration benchmarks and
# searches keep EVAL_CALL, the pipeline's own default guidance, so their baselines stay the ones they
# were measured against
# shapes-t2v keeps Wan's default 5: its scan spread 59-63 % over 2-6, within the noise of 64 prompts
QUALITY_GUIDANCE = {"shapes-t2i": 2.5}


@torch.no_grad()
def _generate(pipe, name: str, prompts: list[str], seed: int, batch: int, progress: bool, call: dict,
              desc: str) -> list[np.ndarray]:
    """One uint8 image/clip per prompt; prompt i is drawn with a generator seeded `seed + i`."""
    outputs = []
    for i in tqdm(range(0, len(prompts), batch), desc=desc, disable=not progress):
        chunk = prompts[i:i + batch]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        kw = {"output_type": "np"} if is_video(name) else {}
        outputs += _frames(pipe(chunk, generator=gens, **call, **kw))
    return [_as_uint8(name, o) for o in outputs]


def evaluate_pipeline(pipe, name: str, n: int = 200, seed: int = 0, batch: int = 4, progress: bool = True,
                      **call) -> dict:
    """Generate the first `n` held-out prompts (seed `seed + i` for prompt i) and score them.

    Returns the evaluator's report plus the Fréchet distance to real renders of the same scenes.
    """
    call = {**EVAL_CALL[name], **call}
    scenes = heldout_scenes(name, n)
    prompts = [caption(s) for s in scenes]
    outputs = _generate(pipe, name, prompts, seed, batch, progress, call, f"eval {name}")
    report = score_outputs(name, outputs, prompts)
    real = [_render(name, s, call) for s in scenes]
    report["frechet"] = frechet_distance(_feats(name, outputs), _feats(name, real))
    report["real_frechet_floor"] = _split_half_frechet(name, real)
    report["prompts"] = prompts
    report["call"] = call
    report["seed"] = seed
    return report, outputs


def scan_guidance(pipe, name: str, scales, n: int = 128, seed: int = 1000, batch: int = 4,
                  progress: bool = True, **call) -> dict:
    """Score classifier-free guidance scales on the first `n` *calibration* prompts and pick the best.

        >>> scan = scan_guidance(load_reference("shapes-t2i"), "shapes-t2i", [1.5, 2.5, 4.5], n=32)
        >>> scan["best"], [(r["guidance_scale"], r["image_accuracy"]) for r in scan["rows"]]

    The best scale has the highest overall adherence, ties broken by the fully-correct rate, then by
    the scale closest to the pipeline's default. Held-out prompts are never looked at, so a held-out
    evaluation at the chosen scale stays a held-out figure. Every scale sees the same prompts and seeds.
    """
    scales = check_guidance(scales)
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    call = {**EVAL_CALL[name], **call}
    prompts = calibration_prompts(name, n)
    rows = []
    for g in scales:
        outputs = _generate(pipe, name, prompts, seed, batch, progress, {**call, "guidance_scale": g},
                            f"guidance {g:g}")
        report = score_outputs(name, outputs, prompts)
        rows.append({"guidance_scale": g, "overall": report["overall"], "image_accuracy": report["image_accuracy"],
                     "attributes": report["attributes"], "count": report["count"]})
    default = _default_guidance(pipe)
    best = max(rows, key=lambda r: (r["overall"], r["image_accuracy"], -abs(r["guidance_scale"] - default)))
    return {"name": name, "split": "calibration", "n": len(prompts), "seed": seed, "call": call,
            "default_guidance": default, "rows": rows, "best": best["guidance_scale"]}


def check_guidance(scales) -> list[float]:
    """The scales as floats; ValueError unless there is at least one and each is finite and >= 1."""
    scales = [float(g) for g in scales]
    if not scales or any(not np.isfinite(g) or g < 1.0 for g in scales):
        raise ValueError(f"guidance scales must be finite numbers >= 1 (1 turns guidance off), got {scales}")
    return scales


def _default_guidance(pipe) -> float:
    p = inspect.signature(type(pipe).__call__).parameters.get("guidance_scale")
    return float(p.default) if p is not None and p.default is not inspect.Parameter.empty else 1.0


def _as_uint8(name: str, x) -> np.ndarray:
    return as_clip(x) if is_video(name) else as_image(x)


def _channels_last(out):
    """One bench output (a batch-of-one tensor, PIL list or array) as HWC / THWC numpy."""
    if isinstance(out, list | tuple):
        out = out[0]
    if hasattr(out, "convert"):
        return np.asarray(out.convert("RGB"))
    if isinstance(out, torch.Tensor):
        out = out.detach().float().cpu()
        if out.ndim in (4, 5) and out.shape[0] == 1:
            out = out[0]
        if out.ndim == 3 and out.shape[0] in (1, 3):          # CHW
            out = out.permute(1, 2, 0)
        elif out.ndim == 4 and out.shape[1] in (1, 3):        # TCHW
            out = out.permute(0, 2, 3, 1)
        return out.numpy()
    out = np.asarray(out)
    return out[0] if out.ndim in (4, 5) and out.shape[0] == 1 and out.shape[-1] == 3 else out


def _split_half_frechet(name, real) -> float:
    """Fréchet distance between two halves of the real samples (different scenes, half as many each): a
    scale reference, not a lower bound, since generated samples are compared with renders of *their own*
    scenes, which shares the scene layouts and can land far below it."""
    if len(real) < 8:
        return float("nan")
    f = _feats(name, real)
    return frechet_distance(f[0::2], f[1::2])


def bench_scorers(name: str, real_scenes=None, call: dict | None = None) -> dict:
    """Scorers for :func:`accel.bench.run_bench`: evaluator accuracy, adherence and Fréchet distance.

    The bench passes its outputs and prompts; the Fréchet distance compares them with real renders
    of held-out scenes (`real_scenes`, default the first 64).
    """
    call = {**EVAL_CALL[name], **(call or {})}
    scenes = real_scenes if real_scenes is not None else heldout_scenes(name, 64)
    real_feats = _feats(name, [_render(name, s, call) for s in scenes])

    def _outs(outputs):
        return [_as_uint8(name, _channels_last(o)) for o in outputs]

    def accuracy(outputs, prompts):
        return score_outputs(name, _outs(outputs), prompts)["image_accuracy"]

    def adherence(outputs, prompts):
        return score_outputs(name, _outs(outputs), prompts)["overall"]

    def frechet(outputs, prompts):
        return frechet_distance(_feats(name, _outs(outputs)), real_feats)

    return {"evaluator_accuracy": accuracy, "adherence": adherence, "frechet": frechet}
