"""Pure-PyTorch block-sparse attention: the dense-mask oracle and the blockwise CPU fallback.

    >>> import torch
    >>> from accel.attention.masks import Grid, HeadPattern, build_indices
    >>> from accel.attention.reference import ref_blockwise, ref_dense
    >>> grid = Grid(2, 4, 4)
    >>> idx = build_indices([HeadPattern("diag", r=0)], grid, block=16)
    >>> q = k = v = torch.randn(1, 32, 1, 16, dtype=torch.float64)        # [Z, S, H, D]
    >>> heads = torch.tensor([0], dtype=torch.int32)
    >>> out, lse = ref_blockwise(q, k, v, idx, heads)
    >>> torch.allclose(out, ref_dense(q, k, v, idx, heads)[0])
    True

Layouts: video ``q, k, v`` are ``[Z, S, H, D]`` (a ``[Z, H, S, D]`` tensor is passed as a
``transpose(1, 2)`` view), optional text keys ``kt, vt`` are ``[Z, L, H, D]`` with valid lengths
``len_t[Z]``. Only the group's heads (``heads``, model head ids) are written; other heads of ``out``
are zero. A query row with no keys gets zeros and LSE ``-inf``.
"""

from __future__ import annotations

import math

import torch

from .masks import BlockIndices, expand_mask


def _text_valid(kt, len_t, z: int) -> torch.Tensor:
    n = kt.shape[1]
    lengths = len_t if len_t is not None else torch.full((z,), n)
    return torch.arange(n)[None, :] < lengths.to("cpu").long()[:, None]   # [Z, L]


def ref_dense(q, k, v, indices: BlockIndices, heads: torch.Tensor, kt=None, vt=None, len_t=None,
              scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense attention over the expanded boolean mask, computed in the inputs' dtype.

    This is the oracle: no block logic beyond :func:`expand_mask`.
    """
    z, n, _, d = q.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros_like(q)
    lse = torch.full((z, len(heads), n), -math.inf, dtype=torch.float32)
    text = kt is not None and kt.shape[1] > 0
    valid_t = _text_valid(kt, len_t, z).to(q.device) if text else None
    for g, h in enumerate(heads.tolist()):
        mask = expand_mask(indices, g).to(q.device)[None].expand(z, n, n)
        keys, values = k[:, :, h], v[:, :, h]
        if text:
            see = valid_t & bool(indices.text[g])
            mask = torch.cat([mask, see[:, None, :].expand(z, n, -1)], dim=2)
            keys, values = torch.cat([keys, kt[:, :, h]], 1), torch.cat([values, vt[:, :, h]], 1)
        o = torch.nn.functional.scaled_dot_product_attention(q[:, :, h], keys, values, attn_mask=mask, scale=scale)
        empty = ~mask.any(-1)
        out[:, :, h] = torch.where(empty[..., None], torch.zeros((), dtype=o.dtype), o)
        scores = (q[:, :, h].double() @ keys.double().transpose(1, 2)) * scale
        lse[:, g] = torch.logsumexp(scores.masked_fill(~mask, -math.inf), -1).float().cpu()
    return out, lse.to(q.device)


def allowed_keys(indices: BlockIndices, g: int, qb: int) -> torch.Tensor:
    """Video key indices that query block ``qb`` of group head ``g`` attends to (each once)."""
    b, n = indices.block, indices.tokens
    blocks = torch.cat([indices.full_idx[g, qb, :indices.full_cnt[g, qb]],
                        indices.part_idx[g, qb, :indices.part_cnt[g, qb]]]).long().cpu()
    keys = (blocks[:, None] * b + torch.arange(b)[None, :]).flatten()
    keys = keys[keys < n]
    cols = indices.col_idx[g, :indices.col_cnt[g]].long().cpu()
    cols = cols[(cols // b - qb).abs() > int(indices.diag_r[g])]
    return torch.cat([keys, cols])


def ref_blockwise(q, k, v, indices: BlockIndices, heads: torch.Tensor, kt=None, vt=None, len_t=None,
                  scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each query block's allowed keys and attend in fp32 (the op's CPU implementation)."""
    z, n, _, d = q.shape
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    b = indices.block
    out = torch.zeros_like(q)
    lse = torch.full((z, len(heads), n), -math.inf, dtype=torch.float32, device=q.device)
    text = kt is not None and kt.shape[1] > 0
    valid_t = _text_valid(kt, len_t, z).to(q.device) if text else None
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    for g, h in enumerate(heads.tolist()):
        if not bool(indices.text[g]) and int(indices.full_cnt[g].sum() + indices.part_cnt[g].sum()
                                             + indices.col_cnt[g]) == 0:
            continue                                          # skipped head: zeros
        for qb in range(math.ceil(n / b)):
            rows = slice(qb * b, min(n, (qb + 1) * b))
            keys_idx = allowed_keys(indices, g, qb).to(q.device)
            keys, values = k[:, keys_idx, h].to(acc), v[:, keys_idx, h].to(acc)
            see = torch.ones(z, len(keys_idx), dtype=torch.bool, device=q.device)
            if text and bool(indices.text[g]):
                keys = torch.cat([keys, kt[:, :, h].to(acc)], 1)
                values = torch.cat([values, vt[:, :, h].to(acc)], 1)
                see = torch.cat([see, valid_t], 1)
            scores = (q[:, rows, h].to(acc) @ keys.transpose(1, 2)) * scale
            scores = scores.masked_fill(~see[:, None, :], -math.inf)
            row_lse = torch.logsumexp(scores, -1)                          # [Z, rows]
            finite = torch.isfinite(row_lse)
            p = torch.exp(scores - torch.where(finite, row_lse, 0.0)[..., None])
            o = torch.where(finite[..., None], p @ values, 0.0)
            out[:, rows, h] = o.to(q.dtype)
            lse[:, g, rows] = row_lse.float()
    return out, lse
