"""Triton block-sparse attention forward over per-(head, query-block) key-block lists.

    >>> # TRITON_INTERPRET=1 runs this on CPU (fp32/fp16); on a GPU it is the real kernel
    >>> import torch
    >>> from accel.attention.masks import Grid, HeadPattern, build_indices
    >>> from accel.attention.kernel import block_sparse_attn_triton
    >>> idx = build_indices([HeadPattern("diag", r=1)], Grid(2, 4, 8), block=16)
    >>> q = k = v = torch.randn(1, 64, 1, 16)
    >>> out, lse = block_sparse_attn_triton(q, k, v, idx, torch.tensor([0], dtype=torch.int32))

One program per (query block, batch x group head). It makes one pass over the head's full blocks
(no masking), its partial blocks (keys >= N masked), its gathered stripe columns (those inside the
head's own band are skipped so no key counts twice) and the valid text keys, keeping the running
max, sum and accumulator in fp32 (exp2 with log2(e) folded into the scale). ``out`` has the layout
and dtype of ``q``; ``lse`` is the natural-log LSE, fp32 ``[Z, H_g, N]``; rows with no key get zeros
and ``-inf``. Heads not in the group are left zero.
"""

from __future__ import annotations

import math

import torch

from .masks import BlockIndices

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

LOG2E = 1.4426950408889634


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _tile(acc, m_i, l_i, q, kp, vp, key_ok, sm_scale):
        k = tl.load(kp, mask=key_ok[:, None], other=0.0)
        v = tl.load(vp, mask=key_ok[:, None], other=0.0)
        s = tl.dot(q, tl.trans(k)) * sm_scale
        s = tl.where(key_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)     # an all-masked row stays NaN-free
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return acc, m_new, l_i

    @triton.jit
    def _block_sparse_fwd(
        Q, K, V, KT, VT, LEN_T, HEADS,
        FULL_IDX, FULL_CNT, PART_IDX, PART_CNT, COL_IDX, COL_CNT, DIAG_R, TEXT_ON,
        OUT, LSE,
        s_qz, s_qs, s_qh, s_kz, s_ks, s_kh, s_vz, s_vs, s_vh,
        s_tz, s_ts, s_th, s_uz, s_us, s_uh, s_oz, s_os, s_oh,
        n_v, n_groups, n_qb, k_full, k_part, c_max, sm_scale,
        B: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, HAS_TEXT: tl.constexpr, HAS_COLS: tl.constexpr,
    ):
        qb = tl.program_id(0)
        zg = tl.program_id(1)
        z = zg // n_groups
        g = zg % n_groups
        h = tl.load(HEADS + g)
        offs_m = qb * B + tl.arange(0, B)
        offs_d = tl.arange(0, D)
        offs_n = tl.arange(0, BLOCK_N)
        row_ok = offs_m < n_v
        q = tl.load(Q + z * s_qz + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        k_base = K + z * s_kz + h * s_kh
        v_base = V + z * s_vz + h * s_vh
        m_i = tl.full([B], float("-inf"), tl.float32)
        l_i = tl.zeros([B], tl.float32)
        acc = tl.zeros([B, D], tl.float32)
        every = offs_n >= 0

        row = g * n_qb + qb
        cnt = tl.load(FULL_CNT + row)
        for j in range(0, cnt):
            kb = tl.load(FULL_IDX + row * k_full + j)
            for t in tl.static_range(B // BLOCK_N):
                keys = kb * B + t * BLOCK_N + offs_n
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base + keys[:, None] * s_ks + offs_d[None, :],
                                      v_base + keys[:, None] * s_vs + offs_d[None, :], every, sm_scale)
        cnt = tl.load(PART_CNT + row)
        for j in range(0, cnt):
            kb = tl.load(PART_IDX + row * k_part + j)
            for t in tl.static_range(B // BLOCK_N):
                keys = kb * B + t * BLOCK_N + offs_n
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base + keys[:, None] * s_ks + offs_d[None, :],
                                      v_base + keys[:, None] * s_vs + offs_d[None, :], keys < n_v, sm_scale)
        if HAS_COLS:
            c_cnt = tl.load(COL_CNT + g)
            band = tl.load(DIAG_R + g)
            for start in range(0, c_cnt, BLOCK_N):
                slot = start + offs_n
                cols = tl.load(COL_IDX + g * c_max + slot, mask=slot < c_cnt, other=0)
                dist = tl.abs(cols // B - qb)
                ok = (slot < c_cnt) & (dist > band)
                acc, m_i, l_i = _tile(acc, m_i, l_i, q, k_base + cols[:, None] * s_ks + offs_d[None, :],
                                      v_base + cols[:, None] * s_vs + offs_d[None, :], ok, sm_scale)
        if HAS_TEXT:
            if tl.load(TEXT_ON + g) != 0:
                n_t = tl.load(LEN_T + z)
                for start in range(0, n_t, BLOCK_N):
                    keys = start + offs_n
                    acc, m_i, l_i = _tile(acc, m_i, l_i, q,
                                          KT + z * s_tz + h * s_th + keys[:, None] * s_ts + offs_d[None, :],
                                          VT + z * s_uz + h * s_uh + keys[:, None] * s_us + offs_d[None, :],
                                          keys < n_t, sm_scale)

        empty = l_i == 0.0
        o = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        tl.store(OUT + z * s_oz + h * s_oh + offs_m[:, None] * s_os + offs_d[None, :],
                 o.to(OUT.dtype.element_ty), mask=row_ok[:, None])
        tl.store(LSE + (z * n_groups + g) * n_v + offs_m, lse, mask=row_ok)


    # on a GPU, warps and pipeline stages are tuned per (head dim, block) like flash-attention's
    # kernels; the CPU interpreter ignores them, so it runs the plain kernel
    _AUTOTUNED = triton.autotune(
        configs=[triton.Config({}, num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3)],
        key=["D", "B", "BLOCK_N"],
    )(_block_sparse_fwd)


def _kernel(device: torch.device):
    import os

    if device.type == "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        return _AUTOTUNED
    return _block_sparse_fwd


def _check(q, k, v, indices: BlockIndices, heads, kt, vt) -> None:
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a [Z, S, H, D] shape, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[1] != indices.tokens:
        raise ValueError(f"the plan's indices are for {indices.tokens} video tokens, the input has {q.shape[1]}")
    if len(heads) != indices.heads:
        raise ValueError(f"{len(heads)} head ids for a group of {indices.heads} index rows")
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        raise ValueError(f"head dim {d} must be a power of two >= 16 for the Triton kernel")
    for name, t in (("q", q), ("k", k), ("v", v), ("kt", kt), ("vt", vt)):
        if t is not None and t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last (head-dim) axis")


def block_sparse_attn_triton(q, k, v, indices: BlockIndices, heads: torch.Tensor, kt=None, vt=None, len_t=None,
                             scale: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the kernel for one head group; all group heads in a single launch."""
    if triton is None:
        raise RuntimeError("the Triton block-sparse kernel needs `pip install triton`")
    _check(q, k, v, indices, heads, kt, vt)
    z, n, _, d = q.shape
    b = indices.block
    n_qb = math.ceil(n / b)
    scale = scale if scale is not None else 1.0 / math.sqrt(d)
    out = torch.zeros_like(q)
    h_g = len(heads)
    lse = torch.empty(z, h_g, n, dtype=torch.float32, device=q.device)
    has_text = kt is not None and kt.shape[1] > 0
    if has_text and len_t is None:
        len_t = torch.full((z,), kt.shape[1], dtype=torch.int32, device=q.device)
    idx = indices.to(q.device)
    kt_ = kt if has_text else q
    vt_ = vt if has_text else q
    len_ = len_t.to(device=q.device, dtype=torch.int32) if has_text else idx.col_cnt
    grid = (n_qb, z * h_g)
    _kernel(q.device)[grid](
        q, k, v, kt_, vt_, len_, heads.to(device=q.device, dtype=torch.int32),
        idx.full_idx, idx.full_cnt, idx.part_idx, idx.part_cnt, idx.col_idx, idx.col_cnt, idx.diag_r,
        idx.text.to(torch.int32),
        out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        kt_.stride(0), kt_.stride(1), kt_.stride(2), vt_.stride(0), vt_.stride(1), vt_.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        n, h_g, n_qb, idx.full_idx.shape[-1], idx.part_idx.shape[-1], idx.col_idx.shape[-1], scale * LOG2E,
        B=b, BLOCK_N=min(b, 64), D=d, HAS_TEXT=has_text, HAS_COLS=idx.has_cols,
    )
    return out, lse
