"""Sparse attention for video DiTs (Sparse-vDiT): patterns, reference, Triton kernel, processors.

    >>> import accel
    >>> from accel.attention import SparseAttentionConfig
    >>> from pipelines.tiny import build_tiny
    >>> pipe = build_tiny("wan")
    >>> plan = SparseAttentionConfig.uniform("WanTransformer3DModel", grid=(2, 1, 1), layers=2, heads=2,
    ...                                      mode="diag", r=0, block=16)
    >>> with accel.applying(pipe, plan):
    ...     video = pipe("a red circle", **pipe.tiny_call_kwargs).frames
"""

from . import processors as _processors  # noqa: F401  (registers the plug-in)
from .layer import SparseLayer
from .masks import Grid, HeadPattern, build_indices, expand_mask, permutation, token_mask
from .op import block_sparse_attn
from .plan import SparseAttentionConfig

__all__ = [
    "SparseAttentionConfig", "SparseLayer", "Grid", "HeadPattern", "build_indices", "expand_mask",
    "permutation", "token_mask", "block_sparse_attn",
]
