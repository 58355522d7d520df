"""Procedural scenes of coloured shapes (images) and moving shapes (clips), with captions.

    >>> from pipelines.zoo.shapes import sample_scenes, render_image, caption
    >>> scene = sample_scenes("heldout", 1)[0]
    >>> caption(scene)                                   # e.g. 'a large red circle at the top left'
    >>> render_image(scene).shape                        # (256, 256, 3) uint8

An image scene holds one to three objects and a clip one (:data:`MAX_OBJECTS`), each in its own
cell of a 3 x 3 grid. An object has a shape, a colour, a size and a cell (its position); in clips
it also moves in a direction. Everything is drawn from a seeded generator, so the same
(split, index) always gives the same scene.

Splits are disjoint by construction: every split draws from its own seed stream, training scenes
whose layout (objects without jitter) appears in the calibration or held-out lists are rejected,
and training never contains the :data:`HELDOUT_TRIPLES` (colour, shape, cell) combinations, which
about a third of the held-out scenes do contain.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 200),
    "cyan": (30, 200, 215),
}
SIZES = ("small", "large")
GRID = 3
CELLS = tuple((r, c) for r in range(GRID) for c in range(GRID))
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUND = (245, 245, 240)
IMAGE_SIZE = 256
# object extent as a fraction of the cell side, before jitter
SIZE_FRACTION = {"small": 0.40, "large": 0.74}
JITTER = 0.05   # largest centre offset, as a fraction of the cell side

# (colour, shape, cell) triples that never occur in training but do in the held-out split
HELDOUT_TRIPLES = (
    ("red", "circle", (1, 1)),
    ("blue", "triangle", (0, 0)),
    ("yellow", "square", (2, 2)),
    ("green", "circle", (1, 2)),
    ("purple", "triangle", (2, 0)),
    ("cyan", "square", (0, 1)),
)

SPLIT_SEEDS = {"train": 1_000_003, "calibration": 2_000_029, "heldout": 3_000_017}
# the fixed lists the training split must avoid, per kind (False: images, True: clips). One-object clips
# have only 1296 layouts (6 colours x 3 shapes x 2 sizes x 9 cells x 4 directions), so their lists are
# shorter: the 320 reserved layouts leave three quarters of the layouts to training
SPLIT_SIZES = {False: {"calibration": 256, "heldout": 1024}, True: {"calibration": 64, "heldout": 256}}
# objects per scene, the default of every split: images 1-3; clips one moving object, which the CPU
# training budget can learn (two-object clips trained to chance level, see docs/reference_models.md)
MAX_OBJECTS = {False: 3, True: 1}


def cell_phrase(cell: tuple[int, int]) -> str:
    """`(0, 0)` -> 'top left', `(1, 1)` -> 'center', `(0, 1)` -> 'top'."""
    row = ("top", "", "bottom")[cell[0]]
    col = ("left", "", "right")[cell[1]]
    return " ".join(w for w in (row, col) if w) or "center"


PHRASE_TO_CELL = {cell_phrase(c): c for c in CELLS}


@dataclass(frozen=True)
class ShapeObject:
    shape: str
    colour: str
    size: str
    cell: tuple[int, int]
    direction: str | None = None      # clips only
    # jitter, as fractions of a cell: centre offset and extent scale
    dx: float = 0.0
    dy: float = 0.0
    scale: float = 1.0

    def key(self) -> tuple:
        return (self.shape, self.colour, self.size, self.cell, self.direction)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ShapeObject, ...]
    # which attributes the caption states (training drops some so partial prompts work)
    says_size: bool = True
    says_position: bool = True
    order: tuple[int, ...] = field(default=())   # caption order of the objects

    def key(self) -> tuple:
        return tuple(sorted(o.key() for o in self.objects))


def caption(scene: Scene) -> str:
    """The scene's caption, e.g. 'a small blue square at the top and a large red circle at the center'."""
    parts = []
    order = scene.order or tuple(range(len(scene.objects)))
    for i in order:
        o = scene.objects[i]
        words = ["a"]
        if scene.says_size:
            words.append(o.size)
        words += [o.colour, o.shape]
        if scene.says_position:
            words += ["at", "the", cell_phrase(o.cell)]
        if o.direction is not None:
            words += ["moving", o.direction]
        parts.append(" ".join(words))
    return " and ".join(parts)


def vocabulary() -> list[str]:
    """Every word a caption can contain (the tokenizer's vocabulary, besides special tokens)."""
    words = ["a", "and", "at", "the", "moving", *SIZES, *COLOURS, *SHAPES, *DIRECTIONS, "top", "bottom", "center"]
    return list(dict.fromkeys(words))


def _is_heldout_triple(o: ShapeObject) -> bool:
    return (o.colour, o.shape, o.cell) in HELDOUT_TRIPLES


def _draw_object(rng: np.random.Generator, cell, *, video: bool) -> ShapeObject:
    size = SIZES[rng.integers(len(SIZES))]
    scale = float(rng.uniform(0.95, 1.05))
    # keep the object inside its cell (clips also need room to move)
    jit = 0.0 if video else JITTER
    return ShapeObject(
        shape=SHAPES[rng.integers(len(SHAPES))],
        colour=list(COLOURS)[rng.integers(len(COLOURS))],
        size=size,
        cell=cell,
        direction=DIRECTIONS[rng.integers(len(DIRECTIONS))] if video else None,
        dx=float(rng.uniform(-jit, jit)),
        dy=float(rng.uniform(-jit, jit)),
        scale=scale,
    )


def _draw_scene(rng: np.random.Generator, *, video: bool, max_objects: int, partial: float,
                count_weights=None) -> Scene:
    if count_weights is None:
        n = int(rng.integers(1, max_objects + 1))
    else:
        w = np.asarray(count_weights, float)
        n = int(rng.choice(len(w), p=w / w.sum())) + 1
    cells = [CELLS[i] for i in rng.choice(len(CELLS), size=n, replace=False)]
    objects = tuple(_draw_object(rng, c, video=video) for c in cells)
    says_size = not (partial and rng.random() < partial)
    says_position = not (partial and rng.random() < partial)
    order = tuple(int(i) for i in rng.permutation(n))
    return Scene(objects, says_size=says_size, says_position=says_position, order=order)


@functools.lru_cache(maxsize=8)
def _reserved_keys(video: bool) -> frozenset:
    keys = set()
    for split in ("calibration", "heldout"):
        keys.update(s.key() for s in sample_scenes(split, SPLIT_SIZES[video][split], video=video))
    return frozenset(keys)


def sample_scenes(split: str, n: int, *, start: int = 0, video: bool = False,
                  max_objects: int | None = None, partial: float = 0.0, count_weights=None) -> list[Scene]:
    """Scenes `start .. start+n-1` of a split ("train", "calibration" or "heldout").

    `max_objects` defaults to ``MAX_OBJECTS[video]``, so held-out and calibration scenes have as
    many objects as the training scenes of the same kind.

    `partial` (training only) is the probability of leaving size, and separately position,
    out of the caption, so that short prompts such as "a red circle" are in distribution.
    `count_weights` (training only) weights the object counts 1..len(weights) instead of drawing
    them uniformly from 1..max_objects.
    """
    if split not in SPLIT_SEEDS:
        raise ValueError(f"split must be one of {sorted(SPLIT_SEEDS)}, got {split!r}")
    if split != "train" and partial:
        raise ValueError("partial captions are for the training split only")
    if split != "train" and count_weights is not None:
        raise ValueError("object-count weights are for the training split only")
    if split != "train" and start + n > SPLIT_SIZES[video][split]:
        kind = "clip" if video else "image"
        raise ValueError(f"the {split} split has {SPLIT_SIZES[video][split]} {kind} scenes; asked for "
                         f"scenes {start}..{start + n - 1} (training only avoids the listed ones)")
    if max_objects is None:
        max_objects = MAX_OBJECTS[video]
    reserved = _reserved_keys(video) if split == "train" else frozenset()
    scenes = []
    for index in range(start, start + n):
        rng = np.random.default_rng([SPLIT_SEEDS[split], int(video), index])
        while True:
            scene = _draw_scene(rng, video=video, max_objects=max_objects, partial=partial,
                                count_weights=count_weights)
            novel = any(_is_heldout_triple(o) for o in scene.objects)
            if split == "train":
                if novel or scene.key() in reserved:
                    continue
            elif split == "heldout":
                # about a third of held-out scenes carry a combination never seen in training
                if (index % 3 == 0) != novel:
                    continue
            elif novel:
                continue
            break
        scenes.append(scene)
    return scenes


# --------------------------------------------------------------------------- rendering

def _object_mask(o: ShapeObject, size: int, centre_shift=(0.0, 0.0), supersample: int = 4) -> np.ndarray:
    """Anti-aliased coverage mask (float32, size x size) of one object."""
    cell = size / GRID
    cx = (o.cell[1] + 0.5 + o.dx) * cell + centre_shift[0]
    cy = (o.cell[0] + 0.5 + o.dy) * cell + centre_shift[1]
    half = SIZE_FRACTION[o.size] * o.scale * cell / 2
    # sample only the object's bounding box, supersampled for smooth edges
    x0, x1 = int(np.floor(cx - half)) - 1, int(np.ceil(cx + half)) + 1
    y0, y1 = int(np.floor(cy - half)) - 1, int(np.ceil(cy + half)) + 1
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, size), min(y1, size)
    mask = np.zeros((size, size), np.float32)
    if x1 <= x0 or y1 <= y0:
        return mask
    s = supersample
    xs = x0 + (np.arange((x1 - x0) * s) + 0.5) / s
    ys = y0 + (np.arange((y1 - y0) * s) + 0.5) / s
    X, Y = np.meshgrid(xs - cx, ys - cy)
    if o.shape == "circle":
        inside = X**2 + Y**2 <= half**2
    elif o.shape == "square":
        inside = (np.abs(X) <= half) & (np.abs(Y) <= half)
    elif o.shape == "triangle":   # pointing up, base at the bottom of the box
        t = (Y + half) / (2 * half)               # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(X) <= t * half)
    else:
        raise ValueError(f"unknown shape {o.shape!r}")
    cov = inside.reshape(y1 - y0, s, x1 - x0, s).mean(axis=(1, 3))
    mask[y0:y1, x0:x1] = cov
    return mask


def _compose(masks_and_colours, size: int) -> np.ndarray:
    img = np.empty((size, size, 3), np.float32)
    img[:] = BACKGROUND
    for mask, colour in masks_and_colours:
        img = img * (1 - mask[..., None]) + np.asarray(colour, np.float32) * mask[..., None]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def render_image(scene: Scene, size: int = IMAGE_SIZE) -> np.ndarray:
    """The scene as an `(size, size, 3)` uint8 image."""
    return _compose([(_object_mask(o, size), COLOURS[o.colour]) for o in scene.objects], size)


# how far (in cells) an object travels over a clip; it starts off-centre so that it stays in view
TRAVEL = 0.5
_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def motion_offset(direction: str, t: float) -> tuple[float, float]:
    """Centre offset in cells at clip time `t` in [0, 1] (from -TRAVEL/2 to +TRAVEL/2 along the direction)."""
    ux, uy = _STEP[direction]
    a = (t - 0.5) * TRAVEL
    return ux * a, uy * a


def render_clip(scene: Scene, frames: int, size: int) -> np.ndarray:
    """The scene as a `(frames, size, size, 3)` uint8 clip; every object moves along its direction."""
    cell = size / GRID
    out = []
    for f in range(frames):
        t = f / max(frames - 1, 1)
        layers = []
        for o in scene.objects:
            ox, oy = motion_offset(o.direction or "right", t) if o.direction else (0.0, 0.0)
            layers.append((_object_mask(o, size, (ox * cell, oy * cell)), COLOURS[o.colour]))
        out.append(_compose(layers, size))
    return np.stack(out)
