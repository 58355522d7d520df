"""``SparseAttentionConfig``: a validated per-(layer, head) sparse-attention plan file.

    >>> from accel.attention import SparseAttentionConfig
    >>> plan = SparseAttentionConfig.uniform("WanTransformer3DModel", grid=(2, 4, 8), layers=2, heads=2,
    ...                                      mode="diag", r=1, block=16, dense_layers=())
    >>> plan.save("/tmp/plan.json")
    >>> SparseAttentionConfig.load("/tmp/plan.json") == plan
    True

Fields follow the spec's plan JSON: the model class, pixel size and frame count it was made for,
the latent token ``grid`` ``[F, H', W']`` (the loader refuses another grid at run time unless
``on_grid_mismatch="dense"``), the text segment of the self-attention sequence, the block size,
the dense warm-up fraction and dense layers, and ``layers``: ``{"index", "module", "heads": [...]}``
with one head pattern per head (see :mod:`accel.attention.masks`). Layers not listed stay dense.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..config import PluginConfig, check_int
from ..errors import ConfigError
from .masks import Grid, HeadPattern, check_block

TEXT_POSITIONS = ("none", "prefix", "suffix")


@dataclass
class SparseAttentionConfig(PluginConfig):
    """Args:
        model_class: denoiser class name the plan was made for.
        grid: latent token grid ``[frames, height, width]`` of the video sequence.
        layers: per-layer head plans (layers not listed run dense).
        block: block size (16, 32, 64 or 128).
        dense_warmup: fraction of the leading steps that run dense.
        dense_layers: layer indices that always run dense.
        text: ``{"position": "none"|"prefix"|"suffix", "length": n}`` of the self-attention sequence.
        height / width / num_frames: pixel size and frames the plan was made for (informational).
        search / stats: provenance and summary numbers.
        on_grid_mismatch: ``"error"`` (default) or ``"dense"`` (run calls on another grid densely).
    """

    model_class: str = ""
    grid: tuple[int, int, int] = (0, 0, 0)
    layers: list[dict[str, Any]] = field(default_factory=list)
    block: int = 128
    dense_warmup: float = 0.2
    dense_layers: tuple[int, ...] = (0,)
    text: dict[str, Any] = field(default_factory=lambda: {"position": "none", "length": 0})
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    search: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    on_grid_mismatch: str = "error"

    kind = "attention"
    format_name = "sparse_vdit.plan"

    def __post_init__(self):
        if not isinstance(self.model_class, str) or not self.model_class:
            raise ConfigError(f"model_class must name the denoiser class, got {self.model_class!r}")
        if (not isinstance(self.grid, (list, tuple)) or len(self.grid) != 3
                or not all(isinstance(g, int) and not isinstance(g, bool) and g > 0 for g in self.grid)):
            raise ConfigError(f"grid must be [frames, height, width] positive integers, got {self.grid!r}")
        self.grid = tuple(self.grid)
        check_block(self.block)
        if not isinstance(self.dense_warmup, (int, float)) or not 0 <= self.dense_warmup <= 1:
            raise ConfigError(f"dense_warmup must be a fraction in [0, 1], got {self.dense_warmup!r}")
        self.dense_layers = tuple(self.dense_layers)
        for i in self.dense_layers:
            check_int("dense_layers entry", i, 0)
        if (not isinstance(self.text, dict) or self.text.get("position") not in TEXT_POSITIONS
                or not isinstance(self.text.get("length", 0), int)):
            raise ConfigError(f"text must be {{'position': one of {TEXT_POSITIONS}, 'length': int}}, got {self.text!r}")
        if self.on_grid_mismatch not in ("error", "dense"):
            raise ConfigError(f"on_grid_mismatch must be 'error' or 'dense', got {self.on_grid_mismatch!r}")
        if not isinstance(self.layers, list):
            raise ConfigError(f"layers must be a list, got {type(self.layers).__name__}")
        seen = set()
        for n, layer in enumerate(self.layers):
            where = f"layers[{n}]"
            if not isinstance(layer, dict) or not {"index", "heads"} <= set(layer):
                raise ConfigError(f"{where}: expected an object with 'index' and 'heads'")
            check_int(f"{where}.index", layer["index"], 0)
            if layer["index"] in seen:
                raise ConfigError(f"{where}: layer {layer['index']} is listed twice")
            seen.add(layer["index"])
            if not isinstance(layer["heads"], list) or not layer["heads"]:
                raise ConfigError(f"{where}.heads must be a non-empty list")
            for h, head in enumerate(layer["heads"]):
                HeadPattern.from_dict(head, f"{where}.heads[{h}]")

    @property
    def token_grid(self) -> Grid:
        return Grid(*self.grid)

    def head_patterns(self) -> dict[int, list[HeadPattern]]:
        return {layer["index"]: [HeadPattern.from_dict(h) for h in layer["heads"]] for layer in self.layers}

    def dense_steps(self, num_steps: int) -> int:
        return math.ceil(self.dense_warmup * num_steps)

    @classmethod
    def uniform(cls, model_class: str, grid, layers: int, heads: int, mode: str = "full", block: int = 128,
                **kwargs) -> SparseAttentionConfig:
        """Every head of every layer in one mode (``r``/``cols``/... passed through to the pattern)."""
        pattern_keys = {"r", "first_frame", "diag_r", "cols"}
        head = HeadPattern(mode, **{k: kwargs.pop(k) for k in list(kwargs) if k in pattern_keys}).to_dict()
        return cls(model_class=model_class, grid=tuple(grid), block=block,
                   layers=[{"index": i, "heads": [dict(head) for _ in range(heads)]} for i in range(layers)], **kwargs)
