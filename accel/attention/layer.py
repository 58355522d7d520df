"""One layer's per-head plan, executed as at most four fused head groups.

    >>> import torch
    >>> from accel.attention.layer import SparseLayer
    >>> from accel.attention.masks import Grid, HeadPattern
    >>> layer = SparseLayer([HeadPattern("full"), HeadPattern("diag", r=1)], Grid(2, 4, 8), block=16)
    >>> q = k = v = torch.randn(1, 64, 2, 16)                      # [Z, S, H, D], video only
    >>> sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(
    ...     q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    >>> out = layer.attend(q, k, v, dense=sdpa)

Groups (spec § 6): full heads make the stock dense call on the head subset; skip heads stay zero;
diag and stripe heads share one kernel launch; mdiag heads are permuted to spatial-major order, run
as a band in one launch and scattered back. Text keys (MM-DiT) are seen by every non-skip video
row; text query rows of sparse heads are computed densely by the stock call. Index tensors are
built once per device and cached.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .masks import BlockIndices, Grid, HeadPattern, build_indices, permutation
from .op import block_sparse_attn

Dense = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class SparseLayer:
    def __init__(self, heads: list[HeadPattern], grid: Grid, block: int):
        self.patterns = list(heads)
        self.grid = grid
        self.block = block
        modes = [p.mode for p in self.patterns]
        self.full = [h for h, m in enumerate(modes) if m == "full"]
        self.skip = [h for h, m in enumerate(modes) if m == "skip"]
        self.band = [h for h, m in enumerate(modes) if m in ("diag", "stripe")]
        self.mdiag = [h for h, m in enumerate(modes) if m == "mdiag"]
        self.all_full = len(self.full) == len(modes)
        self._cache: dict[tuple, object] = {}

    def _indices(self, which: str, device) -> tuple[BlockIndices, torch.Tensor]:
        key = (which, str(device))
        if key not in self._cache:
            ids = self.band if which == "band" else self.mdiag
            idx = build_indices([self.patterns[h] for h in ids], self.grid, self.block).to(device)
            self._cache[key] = (idx, torch.tensor(ids, dtype=torch.int32, device=device))
        return self._cache[key]

    def _perm(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = ("perm", str(device))
        if key not in self._cache:
            self._cache[key] = tuple(t.to(device) for t in permutation(self.grid))
        return self._cache[key]

    def density(self) -> float:
        """Computed fraction of video (query block, key block) pairs over all heads (skip = 0)."""
        total, n_b = 0.0, -(-self.grid.tokens // self.block)
        for which in ("band", "mdiag"):
            ids = self.band if which == "band" else self.mdiag
            if ids:
                total += self._indices(which, "cpu")[0].density() * len(ids)
        return (total + len(self.full)) / max(1, len(self.patterns)) if n_b else 0.0

    def attend(self, q, k, v, dense: Dense, video: slice = slice(None), text: slice | None = None,
               len_t: torch.Tensor | None = None) -> torch.Tensor:
        """Attention output ``[Z, S, H, D]`` for inputs in the same layout.

        ``video`` / ``text`` select the two segments of the sequence; ``dense(q, k, v)`` is the stock
        attention call (with its own mask) on any head subset and any query rows.
        """
        if self.all_full:
            return dense(q, k, v)
        out = torch.zeros_like(q)
        if self.full:
            out[:, :, self.full] = dense(q[:, :, self.full], k[:, :, self.full], v[:, :, self.full])
        sparse = self.band + self.mdiag
        if not sparse:
            return out
        if text is not None:
            out[:, text, sparse] = dense(q[:, text][:, :, sparse], k[:, :, sparse], v[:, :, sparse])
            kt, vt = k[:, text], v[:, text]
        else:
            kt = vt = None
        qv, kv, vv = q[:, video], k[:, video], v[:, video]
        if self.band:
            idx, ids = self._indices("band", q.device)
            o, _ = block_sparse_attn(qv, kv, vv, idx, ids, kt, vt, len_t)
            out[:, video, self.band] = o[:, :, self.band]
        if self.mdiag:
            idx, ids = self._indices("mdiag", q.device)
            pi, inverse = self._perm(q.device)
            o, _ = block_sparse_attn(qv[:, inverse], kv[:, inverse], vv[:, inverse], idx, ids, kt, vt, len_t)
            out[:, video, self.mdiag] = o[:, pi][:, :, self.mdiag]
        return out
