"""Read generated shapes images and clips back into objects and score prompt adherence.

    >>> from pipelines.zoo.shapes import sample_scenes, render_image, caption
    >>> from pipelines.zoo.evaluate import score_images
    >>> scenes = sample_scenes("heldout", 8)
    >>> report = score_images([render_image(s) for s in scenes], [caption(s) for s in scenes])
    >>> report["overall"], report["attributes"]["shape"]

How it works. The data generator is ours, so no learned detector is needed:

1. *Foreground*: a pixel is foreground when its RGB distance to the background colour exceeds 60.
2. *Cells*: the image is cut into the generator's 3 x 3 grid. A cell holds an object when at least
   4 % of it is foreground. Its colour is the palette colour nearest (RGB) to the median foreground
   pixel; its extent is the 5-95 % percentile span of the foreground coordinates (small/large split
   at the midpoint of the two nominal sizes); its shape comes from two numbers measured inside that
   extent, the fill ratio (square ~1, circle ~0.79, triangle ~0.5) and how much wider the lower
   half is than the upper half (a triangle's is, a circle's and square's are not).
3. *Matching prompt to image*: the prompt is parsed back into objects. Colour, shape and size of a
   prompted object are read at the cell the prompt names ("what is where the prompt says"); if the
   prompt names no position, at the best match. The best match is the cell that agrees best on
   presence, colour, shape and size (position is never looked at; the share of the object's colour
   breaks ties); position is correct when it is the named cell (for k identical prompted objects:
   when the named cell is among the k best).
   Every reading is a forced choice, so on pure noise each attribute scores close to chance.
4. *Scores*: per attribute, the fraction of prompted objects read correctly; ``count`` is whether the
   image holds exactly as many objects as the prompt; an image is ``correct`` when every attribute
   of every object and the count are right. ``overall`` (prompt adherence) is the mean of the
   per-attribute accuracies; ``image_accuracy`` is the fraction of fully correct images.

Clips are read frame by frame: attributes come from the middle frame and the motion direction from
the displacement of the object's colour mask between the first and the last frame.

The Fréchet distance (:func:`frechet_distance`) compares Gaussians fitted to :func:`features`, a
per-cell descriptor vector (foreground fraction, median colour, extent, fill, asymmetry), between
generated and real samples: it stands in for FID, which needs weights we cannot download.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from .shapes import BACKGROUND, CELLS, COLOURS, DIRECTIONS, GRID, PHRASE_TO_CELL, SHAPES, SIZE_FRACTION, SIZES

FG_THRESHOLD = 60.0
PRESENCE = 0.04
ATTRIBUTES = ("colour", "shape", "size", "position")
_PALETTE = np.array(list(COLOURS.values()), np.float32)
_COLOUR_NAMES = list(COLOURS)


@dataclass
class Reading:
    """What the evaluator sees in one cell."""

    present: bool
    colour: str
    shape: str
    size: str
    fill: float
    widening: float
    extent: float
    fraction: float
    shares: np.ndarray        # fraction of the cell nearest to each palette colour (foreground only)


def _uint8_array(x, ndim: int, layout: str) -> np.ndarray:
    """A tensor, PIL image or array (uint8, or float in [0, 1]) as a uint8 array of `ndim` dims ending in 3."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if hasattr(x, "convert"):      # PIL
        x = x.convert("RGB")
    x = np.asarray(x)
    if x.dtype != np.uint8:
        x = np.clip(np.rint(x.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    if x.ndim != ndim or x.shape[-1] != 3:
        raise ValueError(f"expected a {layout} array, got shape {x.shape}")
    return x


def as_image(image) -> np.ndarray:
    """An image (uint8 HWC, float HWC in [0, 1], tensor or PIL) as uint8 HWC."""
    return _uint8_array(image, 3, "(H, W, 3) image")


def foreground(image: np.ndarray) -> np.ndarray:
    diff = image.astype(np.float32) - np.asarray(BACKGROUND, np.float32)
    return np.sqrt((diff**2).sum(-1)) > FG_THRESHOLD


def _nearest_colour(rgb: np.ndarray) -> str:
    return _COLOUR_NAMES[int(np.argmin(((_PALETTE - rgb) ** 2).sum(-1)))]


def _shape_of(fill: float, widening: float) -> str:
    if widening > 0.35 or fill < 0.62:
        return "triangle"
    return "square" if fill > 0.9 else "circle"


def read_cell(image: np.ndarray, fg: np.ndarray, cell) -> Reading:
    h, w = fg.shape
    y0, y1 = round(cell[0] * h / GRID), round((cell[0] + 1) * h / GRID)
    x0, x1 = round(cell[1] * w / GRID), round((cell[1] + 1) * w / GRID)
    m = fg[y0:y1, x0:x1]
    fraction = float(m.mean())
    ys, xs = np.nonzero(m)
    side = (y1 - y0 + x1 - x0) / 2
    if len(ys) < 4:
        # nothing there: still a forced choice (constant readings, so noise stays at chance)
        return Reading(False, _COLOUR_NAMES[0], SHAPES[0], SIZES[0], 0.0, 0.0, 0.0, fraction,
                       np.zeros(len(_COLOUR_NAMES)))
    pixels = image[y0:y1, x0:x1][m].astype(np.float32)
    colour = _nearest_colour(np.median(pixels, axis=0))
    nearest = ((pixels[:, None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)
    shares = np.bincount(nearest, minlength=len(_COLOUR_NAMES)) / m.size
    # the object is the largest connected foreground blob of the cell; stray specks do not count
    labels, n = ndimage.label(m)
    blob = labels == (np.bincount(labels.ravel())[1:].argmax() + 1) if n > 1 else m
    ys, xs = np.nonzero(blob)
    ext_y, ext_x = ys.max() - ys.min() + 1, xs.max() - xs.min() + 1
    extent = float(max(ext_y, ext_x)) / side
    box = blob[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    fill = float(box.mean())
    half = box.shape[0] // 2
    top, bottom = box[:half].sum(), box[box.shape[0] - half:].sum()
    widening = float((bottom - top) / max(bottom + top, 1))
    threshold = (SIZE_FRACTION["small"] + SIZE_FRACTION["large"]) / 2
    return Reading(
        present=fraction >= PRESENCE,
        colour=colour,
        shape=_shape_of(fill, widening),
        size="large" if extent > threshold else "small",
        fill=fill, widening=widening, extent=extent, fraction=fraction, shares=shares,
    )


def read_image(image) -> dict[tuple[int, int], Reading]:
    """Readings of every grid cell of an image (uint8 HWC, float HWC in [0, 1], or PIL)."""
    image = as_image(image)
    fg = foreground(image)
    return {cell: read_cell(image, fg, cell) for cell in CELLS}


# --------------------------------------------------------------------------- prompts

_ALT = {k: "|".join(v) for k, v in
        {"size": SIZES, "colour": COLOURS, "shape": SHAPES, "dir": DIRECTIONS}.items()}
_OBJECT = re.compile(
    rf"^an? (?:(?P<size>{_ALT['size']}) )?(?P<colour>{_ALT['colour']}) (?P<shape>{_ALT['shape']})"
    rf"(?: at the (?P<pos>[a-z ]+?))?(?: moving (?P<dir>{_ALT['dir']}))?$"
)


def parse_prompt(prompt: str) -> list[dict]:
    """'a large red circle at the top left and a blue square' -> a list of attribute dicts.

    Unstated attributes are None. Raises ValueError for a prompt outside the shapes grammar.
    """
    objects = []
    for part in prompt.strip().lower().rstrip(".").split(" and "):
        m = _OBJECT.match(part.strip())
        if not m or (m["pos"] is not None and m["pos"] not in PHRASE_TO_CELL):
            raise ValueError(f"not a shapes prompt: {part!r} (in {prompt!r})")
        objects.append({
            "colour": m["colour"], "shape": m["shape"], "size": m["size"],
            "position": PHRASE_TO_CELL[m["pos"]] if m["pos"] else None, "direction": m["dir"],
        })
    return objects


def _match_score(r: Reading, obj) -> tuple[int, float]:
    """How well a cell's reading agrees with a prompted object, position never considered.

    Discrete agreement first (presence, colour, shape, size); the share of the object's colour in
    the cell breaks ties, so that identical cells do not all tie.
    """
    score = 8 * r.present + 4 * (r.colour == obj["colour"]) + 2 * (r.shape == obj["shape"])
    score += obj["size"] is not None and r.size == obj["size"]
    return score, float(r.shares[_COLOUR_NAMES.index(obj["colour"])])


def _best_matches(readings, obj, k: int = 1) -> list[tuple[int, int]]:
    """The `k` cells agreeing best with the object (ties in reading order)."""
    return sorted(CELLS, key=lambda c: _match_score(readings[c], obj), reverse=True)[:k]


def score_readings(readings, prompt: str) -> dict:
    """Per-object attribute verdicts for one image (see the module docstring)."""
    objs = parse_prompt(prompt)
    verdicts = []
    for obj in objs:
        desc = (obj["colour"], obj["shape"], obj["size"])
        twins = sum((o["colour"], o["shape"], o["size"]) == desc for o in objs)
        # identical prompted objects share their best-matching cells
        matches = _best_matches(readings, obj, twins)
        at = readings[obj["position"]] if obj["position"] is not None else readings[matches[0]]
        v = {"colour": at.colour == obj["colour"], "shape": at.shape == obj["shape"]}
        if obj["size"] is not None:
            v["size"] = at.size == obj["size"]
        if obj["position"] is not None:
            v["position"] = obj["position"] in matches
        verdicts.append(v)
    n_present = sum(r.present for r in readings.values())
    count_ok = n_present == len(objs)
    correct = count_ok and all(all(v.values()) for v in verdicts)
    return {"objects": verdicts, "count": count_ok, "correct": correct}


def _summarise(results: list[dict], attributes) -> dict:
    per_attr = {}
    for a in attributes:
        vals = [v[a] for r in results for v in r["objects"] if a in v]
        if vals:
            per_attr[a] = float(np.mean(vals))
    return {
        "n": len(results),
        "attributes": per_attr,
        "count": float(np.mean([r["count"] for r in results])) if results else 0.0,
        "overall": float(np.mean(list(per_attr.values()))) if per_attr else 0.0,
        "image_accuracy": float(np.mean([r["correct"] for r in results])) if results else 0.0,
        "correct": [bool(r["correct"]) for r in results],
    }


def score_images(images, prompts) -> dict:
    """GenEval-style adherence of images to shapes prompts.

    Returns ``{"n", "attributes": {colour, shape, size, position}, "count", "overall",
    "image_accuracy", "correct": [per image]}``.
    """
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
    results = [score_readings(read_image(img), p) for img, p in zip(images, prompts, strict=True)]
    return _summarise(results, ATTRIBUTES)


def chance_rates() -> dict[str, float]:
    """Accuracy of a uniform random guess per attribute."""
    return {"colour": 1 / len(COLOURS), "shape": 1 / len(SHAPES), "size": 1 / len(SIZES),
            "position": 1 / len(CELLS), "direction": 1 / len(DIRECTIONS)}


# --------------------------------------------------------------------------- clips

def as_clip(clip) -> np.ndarray:
    """A clip (THWC uint8/float, tensor, or a list of frames) as uint8 THWC."""
    if isinstance(clip, list | tuple):
        clip = np.stack([as_image(f) for f in clip])
    return _uint8_array(clip, 4, "(T, H, W, 3) clip")


def _colour_centroid(frame: np.ndarray, colour: str, near) -> np.ndarray | None:
    """Centroid of the pixels of `colour` closest to `near` (within 1.5 cells); None if none."""
    fg = foreground(frame)
    d = ((frame.astype(np.float32)[..., None, :] - _PALETTE) ** 2).sum(-1)
    mask = fg & (d.argmin(-1) == _COLOUR_NAMES.index(colour))
    ys, xs = np.nonzero(mask)
    if len(ys) == 0:
        return None
    h, w = mask.shape
    pts = np.stack([xs, ys], 1).astype(np.float32)
    keep = np.abs(pts - near).max(1) <= 1.5 * w / GRID
    if not keep.any():
        return None
    return pts[keep].mean(0)


def read_direction(clip: np.ndarray, colour: str, cell) -> str:
    """Direction of travel of the `colour` object around `cell` (forced choice), from the first and
    the last frame in which it is found: the causal Wan VAE may draw frame 0 without the object."""
    h, w = clip.shape[1:3]
    near = np.array([(cell[1] + 0.5) * w / GRID, (cell[0] + 0.5) * h / GRID], np.float32)
    # scan in from each end; only the two frames found are read in full
    first = next(((i, c) for i, f in enumerate(clip) if (c := _colour_centroid(f, colour, near)) is not None), None)
    last = next(((i, c) for i in range(len(clip) - 1, first[0], -1)
                 if (c := _colour_centroid(clip[i], colour, near)) is not None), None) if first else None
    if last is None:
        return DIRECTIONS[0]
    dx, dy = last[1] - first[1]
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def score_clips(clips, prompts) -> dict:
    """Adherence of clips to moving-shapes prompts: the image attributes plus ``direction``."""
    if len(clips) != len(prompts):
        raise ValueError(f"{len(clips)} clips but {len(prompts)} prompts")
    results = []
    for clip, prompt in zip(clips, prompts, strict=True):
        clip = as_clip(clip)
        readings = read_image(clip[len(clip) // 2])
        res = score_readings(readings, prompt)
        for obj, v in zip(parse_prompt(prompt), res["objects"], strict=True):
            if obj["direction"] is not None:
                where = obj["position"] if obj["position"] is not None else _best_matches(readings, obj)[0]
                v["direction"] = read_direction(clip, obj["colour"], where) == obj["direction"]
        res["correct"] = res["count"] and all(all(v.values()) for v in res["objects"])
        results.append(res)
    return _summarise(results, (*ATTRIBUTES, "direction"))


# --------------------------------------------------------------------------- Fréchet distance

def features(image) -> np.ndarray:
    """The evaluator's feature vector of an image: 7 numbers per grid cell (63 in all)."""
    readings = read_image(image)
    feats = []
    for cell in CELLS:
        r = readings[cell]
        rgb = np.asarray(COLOURS[r.colour], np.float32) / 255.0 if r.present else np.zeros(3, np.float32)
        feats += [r.fraction, *rgb, r.extent, r.fill, r.widening]
    return np.asarray(feats, np.float64)


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two `(N, D)` feature sets."""
    a, b = np.asarray(feats_a, np.float64), np.asarray(feats_b, np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1] or min(len(a), len(b)) < 2:
        raise ValueError(f"need two (N>=2, D) feature sets with equal D, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr sqrt(ca cb) = sum of sqrt eigenvalues of sqrt(ca) cb sqrt(ca)  (both PSD)
    w, v = np.linalg.eigh(ca)
    sa = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = sa @ cb @ sa
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * tr_sqrt)


def image_frechet(generated, real) -> float:
    return frechet_distance(np.stack([features(x) for x in generated]), np.stack([features(x) for x in real]))
