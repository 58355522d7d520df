"""Sparse-vDiT attention patterns as per-(head, query-block) lists of key blocks.

    >>> from accel.attention.masks import Grid, HeadPattern, build_indices, expand_mask
    >>> grid = Grid(frames=3, height=4, width=6)            # 72 video tokens, frame-major
    >>> idx = build_indices([HeadPattern("diag", r=1), HeadPattern("stripe", cols=(40,))], grid, block=16)
    >>> expand_mask(idx, 0).shape                           # token mask of head 0 (video keys only)
    torch.Size([72, 72])

Video token ``i = f*P + s`` (frame-major, ``P = height*width``); block ``b`` holds tokens
``[b*B, min((b+1)*B, N))``. Modes (spec § 3):

* ``full`` every block; ``skip`` none (the head's output is zero);
* ``diag`` the band ``|k - q| <= r`` of blocks;
* ``mdiag`` the same band in the spatial-major order ``pi(f*P + s) = s*F + f`` ("same place in
  every frame"); the caller permutes q/k/v with :func:`permutation` and runs a band;
* ``stripe`` shared key columns: the first frame's blocks, the query's own band ``diag_r`` (-1: none)
  and gathered columns ``cols`` (columns inside listed blocks are skipped by the kernel).

Index lists are ascending; the last block is "partial" (its keys past ``N`` are masked) when ``N`` is
not a multiple of ``B``, every other listed block is "full" (no masking).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..errors import ConfigError

MODES = ("full", "skip", "diag", "mdiag", "stripe")
BLOCK_SIZES = (16, 32, 64, 128)


@dataclass(frozen=True)
class Grid:
    """Latent token grid of one video: frames x height x width tokens (after patching)."""

    frames: int
    height: int
    width: int

    @property
    def per_frame(self) -> int:
        return self.height * self.width

    @property
    def tokens(self) -> int:
        return self.frames * self.per_frame


@dataclass(frozen=True)
class HeadPattern:
    """One head's mode and its parameters (``r`` for diag/mdiag; first_frame/diag_r/cols for stripe)."""

    mode: str = "full"
    r: int = 0
    first_frame: bool = True
    diag_r: int = 0
    cols: tuple[int, ...] = field(default_factory=tuple)

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"head mode {self.mode!r} is unknown; expected one of {MODES}")
        if self.r < 0:
            raise ConfigError(f"head field 'r' must be >= 0, got {self.r}")
        if self.diag_r < -1:
            raise ConfigError(f"head field 'diag_r' must be >= -1, got {self.diag_r}")
        object.__setattr__(self, "cols", tuple(int(c) for c in self.cols))

    def to_dict(self) -> dict:
        if self.mode in ("diag", "mdiag"):
            return {"mode": self.mode, "r": self.r}
        if self.mode == "stripe":
            return {"mode": "stripe", "first_frame": self.first_frame, "diag_r": self.diag_r,
                    "cols": list(self.cols)}
        return {"mode": self.mode}

    @classmethod
    def from_dict(cls, data: dict, where: str = "head") -> HeadPattern:
        if not isinstance(data, dict) or "mode" not in data:
            raise ConfigError(f"{where}: expected an object with a 'mode' field, got {data!r}")
        unknown = set(data) - {"mode", "r", "first_frame", "diag_r", "cols"}
        if unknown:
            raise ConfigError(f"{where}: unknown fields {sorted(unknown)}")
        try:
            return cls(**data)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {exc}") from None


def check_block(block: int) -> None:
    if block not in BLOCK_SIZES:
        raise ConfigError(f"field 'block' must be one of {BLOCK_SIZES}, got {block!r}")


def permutation(grid: Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """(pi, inverse): ``pi[i]`` is token i's spatial-major position, ``inverse[p]`` the token at p.

    Permute with ``x[:, inverse]`` (position p holds token ``inverse[p]``) and map back with
    ``y[:, pi]``.
    """
    i = torch.arange(grid.tokens)
    f, s = i // grid.per_frame, i % grid.per_frame
    pi = s * grid.frames + f
    inverse = torch.empty_like(pi)
    inverse[pi] = i
    return pi, inverse


def head_blocks(pattern: HeadPattern, grid: Grid, block: int) -> list[list[int]]:
    """Allowed key blocks per query block (ascending), before splitting full/partial."""
    n_b = math.ceil(grid.tokens / block)
    if pattern.mode == "skip":
        return [[] for _ in range(n_b)]
    if pattern.mode == "full":
        return [list(range(n_b)) for _ in range(n_b)]
    if pattern.mode in ("diag", "mdiag"):
        return [list(range(max(0, q - pattern.r), min(n_b, q + pattern.r + 1))) for q in range(n_b)]
    sink = set(range(min(n_b, math.ceil(grid.per_frame / block)))) if pattern.first_frame else set()
    out = []
    for q in range(n_b):
        own = set(range(max(0, q - pattern.diag_r), min(n_b, q + pattern.diag_r + 1))) if pattern.diag_r >= 0 else set()
        out.append(sorted(sink | own))
    return out


def stripe_columns(pattern: HeadPattern, grid: Grid, block: int) -> list[int]:
    """The gathered columns a stripe head keeps: in range, unique, outside the first-frame blocks."""
    if pattern.mode != "stripe":
        return []
    sink_end = math.ceil(grid.per_frame / block) * block if pattern.first_frame else 0
    bad = [c for c in pattern.cols if not 0 <= c < grid.tokens]
    if bad:
        raise ConfigError(f"stripe columns {bad[:4]} are outside the {grid.tokens} video tokens of grid "
                          f"{grid.frames}x{grid.height}x{grid.width}")
    return sorted({c for c in pattern.cols if c >= sink_end})


@dataclass
class BlockIndices:
    """Index tensors of one fused head group, in the layout the kernel reads (no batch dimension)."""

    full_idx: torch.Tensor   # int32 [H_g, n_qb, K_full]
    full_cnt: torch.Tensor   # int32 [H_g, n_qb]
    part_idx: torch.Tensor   # int32 [H_g, n_qb, K_part]
    part_cnt: torch.Tensor   # int32 [H_g, n_qb]
    col_idx: torch.Tensor    # int32 [H_g, C_max]
    col_cnt: torch.Tensor    # int32 [H_g]
    diag_r: torch.Tensor     # int32 [H_g]; gathered columns within this band of blocks are skipped
    block: int
    tokens: int
    text: torch.Tensor       # bool [H_g]: whether the head sees text keys (all but skip)
    # whether any head gathers columns: read once here, not per launch (a device sync on a GPU)
    has_cols: bool | None = None

    def __post_init__(self):
        if self.has_cols is None:
            self.has_cols = bool(int(self.col_cnt.max()) > 0) if self.col_cnt.numel() else False

    def to(self, device) -> BlockIndices:
        moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return BlockIndices(**moved)

    @property
    def heads(self) -> int:
        return self.full_cnt.shape[0]

    def density(self) -> float:
        """Fraction of (query block, key block) pairs computed, over all heads of the group."""
        n_b = self.full_cnt.shape[1]
        pairs = int(self.full_cnt.sum() + self.part_cnt.sum())
        return pairs / max(1, self.heads * n_b * n_b)


def _pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([len(r) for r in rows] + [1])
    idx = torch.zeros(len(rows), width, dtype=torch.int32)
    for i, r in enumerate(rows):
        idx[i, :len(r)] = torch.tensor(r, dtype=torch.int32)
    return idx, torch.tensor([len(r) for r in rows], dtype=torch.int32)


def build_indices(patterns: list[HeadPattern], grid: Grid, block: int) -> BlockIndices:
    """Index tensors for a group of heads (mdiag heads are bands in the permuted order)."""
    check_block(block)
    n_v = grid.tokens
    n_b = math.ceil(n_v / block)
    tail = n_b - 1 if n_v % block else -1
    fulls, parts, cols, diag = [], [], [], []
    for p in patterns:
        lists = head_blocks(p, grid, block)
        fulls.append([[k for k in ks if k != tail] for ks in lists])
        parts.append([[k for k in ks if k == tail] for ks in lists])
        cols.append(stripe_columns(p, grid, block))
        diag.append(p.diag_r if p.mode == "stripe" else -1)

    def stack(per_head: list[list[list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max([len(r) for rows in per_head for r in rows] + [1])
        idx = torch.zeros(len(per_head), n_b, width, dtype=torch.int32)
        cnt = torch.zeros(len(per_head), n_b, dtype=torch.int32)
        for h, rows in enumerate(per_head):
            for q, r in enumerate(rows):
                idx[h, q, :len(r)] = torch.tensor(r, dtype=torch.int32)
                cnt[h, q] = len(r)
        return idx, cnt

    full_idx, full_cnt = stack(fulls)
    part_idx, part_cnt = stack(parts)
    col_idx, col_cnt = _pad(cols)
    return BlockIndices(full_idx, full_cnt, part_idx, part_cnt, col_idx, col_cnt,
                        torch.tensor(diag, dtype=torch.int32), block, n_v,
                        torch.tensor([p.mode != "skip" for p in patterns]))


def expand_mask(indices: BlockIndices, head: int) -> torch.Tensor:
    """Token mask [N, N] over video keys that the kernel computes for group head ``head``."""
    n, b = indices.tokens, indices.block
    n_b = math.ceil(n / b)
    allowed = torch.zeros(n_b, n_b, dtype=torch.bool)
    for idx, cnt in ((indices.full_idx, indices.full_cnt), (indices.part_idx, indices.part_cnt)):
        for q in range(n_b):
            allowed[q, idx[head, q, :cnt[head, q]].long()] = True
    mask = allowed.repeat_interleave(b, 0).repeat_interleave(b, 1)[:n, :n].clone()
    cols = indices.col_idx[head, :indices.col_cnt[head]].long()
    if len(cols):
        qb = torch.arange(n) // b
        far = (qb[:, None] - (cols // b)[None, :]).abs() > indices.diag_r[head]
        mask[:, cols] |= far
    return mask


def token_mask(pattern: HeadPattern, grid: Grid, block: int) -> torch.Tensor:
    """The spec's token-level definition of a mode, in the original (frame-major) order: the oracle
    that :func:`expand_mask` of :func:`build_indices` is tested against."""
    n = grid.tokens
    i = torch.arange(n)
    qb, kb = (i // block)[:, None], (i // block)[None, :]
    if pattern.mode == "full":
        return torch.ones(n, n, dtype=torch.bool)
    if pattern.mode == "skip":
        return torch.zeros(n, n, dtype=torch.bool)
    if pattern.mode == "diag":
        return (qb - kb).abs() <= pattern.r
    if pattern.mode == "mdiag":
        pi, _ = permutation(grid)
        return ((pi // block)[:, None] - (pi // block)[None, :]).abs() <= pattern.r
    sink = (kb < math.ceil(grid.per_frame / block)) & pattern.first_frame
    own = ((qb - kb).abs() <= pattern.diag_r) if pattern.diag_r >= 0 else torch.zeros(n, n, dtype=torch.bool)
    col = torch.zeros(n, dtype=torch.bool)
    col[list(pattern.cols)] = True
    return (sink | own | col[None, :]).expand(n, n).clone()
