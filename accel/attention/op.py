"""``sparse_vdit::block_sparse_attn``: the kernel as a ``torch.library`` custom op.

    >>> import torch
    >>> from accel.attention.masks import Grid, HeadPattern, build_indices
    >>> from accel.attention.op import block_sparse_attn
    >>> idx = build_indices([HeadPattern("diag", r=1)], Grid(2, 4, 8), block=16)
    >>> q = k = v = torch.randn(1, 64, 1, 16)
    >>> out, lse = block_sparse_attn(q, k, v, idx, torch.tensor([0], dtype=torch.int32))
    >>> compiled = torch.compile(lambda q: block_sparse_attn(q, k, v, idx, torch.tensor([0], dtype=torch.int32))[0],
    ...                          fullgraph=True)                      # no graph break: the op has a fake

CUDA tensors run the Triton kernel; anything else runs :func:`accel.attention.reference.ref_blockwise`
(the CPU fallback; on CPU the kernel itself only runs under ``TRITON_INTERPRET=1``, in tests).
"""

from __future__ import annotations

import math

import torch

from . import kernel
from .masks import BlockIndices
from .reference import ref_blockwise


def _indices(block: int, tokens: int, full_idx, full_cnt, part_idx, part_cnt, col_idx, col_cnt, diag_r, text_on,
             has_cols: bool):
    return BlockIndices(full_idx, full_cnt, part_idx, part_cnt, col_idx, col_cnt, diag_r, block, tokens,
                        text_on.bool(), has_cols)


@torch.library.custom_op("sparse_vdit::block_sparse_attn", mutates_args=())
def _block_sparse_attn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: torch.Tensor,
    full_idx: torch.Tensor, full_cnt: torch.Tensor, part_idx: torch.Tensor, part_cnt: torch.Tensor,
    col_idx: torch.Tensor, col_cnt: torch.Tensor, diag_r: torch.Tensor, text_on: torch.Tensor,
    kt: torch.Tensor | None, vt: torch.Tensor | None, len_t: torch.Tensor | None, block: int, scale: float,
    has_cols: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    # has_cols travels as a flag: reading it from col_cnt here would sync the device on every call
    idx = _indices(block, q.shape[1], full_idx, full_cnt, part_idx, part_cnt, col_idx, col_cnt, diag_r, text_on,
                   has_cols)
    if q.is_cuda and kernel.available():
        return kernel.block_sparse_attn_triton(q, k, v, idx, heads, kt, vt, len_t, scale)
    return ref_blockwise(q, k, v, idx, heads, kt, vt, len_t, scale)


@_block_sparse_attn.register_fake
def _(q, k, v, heads, full_idx, full_cnt, part_idx, part_cnt, col_idx, col_cnt, diag_r, text_on, kt, vt, len_t,
      block, scale, has_cols):
    return torch.empty_like(q), q.new_empty((q.shape[0], heads.shape[0], q.shape[1]), dtype=torch.float32)


def block_sparse_attn(q, k, v, indices: BlockIndices, heads: torch.Tensor, kt=None, vt=None, len_t=None,
                      scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-sparse attention of one head group; see :mod:`accel.attention.reference` for layouts."""
    if q.shape[1] != indices.tokens:
        raise ValueError(f"the plan's indices are for {indices.tokens} video tokens, the input has {q.shape[1]}")
    scale = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
    i = indices
    return _block_sparse_attn(q, k, v, heads, i.full_idx, i.full_cnt, i.part_idx, i.part_cnt, i.col_idx,
                              i.col_cnt, i.diag_r, i.text.to(torch.int32), kt, vt, len_t, i.block, float(scale),
                              bool(i.has_cols))
