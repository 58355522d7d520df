"""Sparse-vDiT: masks, references, the Triton kernel (interpreter), processors and plans (spec § 9)."""

import math

import pytest
import torch

import accel
from accel.attention import SparseAttentionConfig, SparseLayer
from accel.attention import kernel as triton_kernel
from accel.attention.masks import Grid, HeadPattern, build_indices, expand_mask, permutation, token_mask
from accel.attention.op import block_sparse_attn
from accel.attention.reference import ref_blockwise, ref_dense
from pipelines.tiny import build_tiny

GRID = Grid(3, 4, 6)     # 72 tokens: not a multiple of any block size

PATTERNS = [
    HeadPattern("full"), HeadPattern("skip"),
    HeadPattern("diag", r=0), HeadPattern("diag", r=1), HeadPattern("diag", r=99),
    HeadPattern("mdiag", r=0), HeadPattern("mdiag", r=2),
    HeadPattern("stripe", first_frame=True, diag_r=0, cols=(3, 30, 50, 71)),
    HeadPattern("stripe", first_frame=False, diag_r=-1, cols=(0, 40)),
    HeadPattern("stripe", first_frame=True, diag_r=1),
]


def _permuted_back(mask: torch.Tensor, grid: Grid) -> torch.Tensor:
    pi, _ = permutation(grid)
    return mask[pi][:, pi]


@pytest.mark.parametrize("block", [16, 32])
@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: f"{p.mode}-{p.r}-{p.diag_r}-{len(p.cols)}")
def test_block_lists_expand_to_the_token_definition(pattern, block):
    idx = build_indices([pattern], GRID, block)
    got = expand_mask(idx, 0)
    if pattern.mode == "mdiag":       # lists are a band in spatial-major order; map it back
        got = _permuted_back(got, GRID)
    assert torch.equal(got, token_mask(pattern, GRID, block))


def test_mask_definitions_by_hand():
    grid = Grid(2, 2, 2)                  # P = 4, N = 8; frames [0..3], [4..7]
    # mdiag r=0 with B=16 covers everything; build the spatial-major relation by hand at token level
    pi, inverse = permutation(grid)
    assert pi.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    assert inverse[pi].tolist() == list(range(8))
    band = token_mask(HeadPattern("diag", r=0), GRID, 16)
    assert band[0, 15] and not band[0, 16] and band[71, 64] and not band[63, 64]
    stripe = token_mask(HeadPattern("stripe", first_frame=True, diag_r=-1, cols=(50,)), GRID, 16)
    assert stripe[70, :32].all() and not stripe[70, 32:50].any() and stripe[:, 50].all()   # P=24 -> 2 blocks


def test_flex_block_mask_of_the_kernel_bench_matches_our_block_lists():
    # the H100 bench compares the kernel with FlexAttention over the same block lists; unpadded lists
    # (narrower than the number of KV blocks) made FlexAttention index out of bounds on CUDA
    from app.bench_sparse import flex_block_mask

    grid, block = Grid(3, 5, 9), 16                     # 135 tokens: a partial tail block
    idx = build_indices([HeadPattern("diag", r=0), HeadPattern("diag", r=2)], grid, block)
    assert idx.full_idx.shape[-1] < math.ceil(grid.tokens / block)
    dense = flex_block_mask(idx, grid.tokens).to_dense()[0].bool()
    for h in range(2):
        want = expand_mask(idx, h)[::block, ::block]
        assert torch.equal(dense[h], want)


def test_permutation_round_trips():
    pi, inverse = permutation(GRID)
    x = torch.randn(2, GRID.tokens, 3)
    assert torch.equal(x[:, inverse][:, pi], x) and torch.equal(x[:, pi][:, inverse], x)
    assert torch.equal(pi[inverse], torch.arange(GRID.tokens))


def _qkv(z, n, h, d, dtype, text=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(z, n, h, d, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    kt = torch.randn(z, text, h, d, generator=g, dtype=torch.float64).to(dtype) if text else None
    vt = torch.randn(z, text, h, d, generator=g, dtype=torch.float64).to(dtype) if text else None
    return q, k, v, kt, vt


@pytest.mark.parametrize("text", [0, 5])
def test_references_equal_masked_sdpa(text):
    idx = build_indices(PATTERNS, GRID, 16)
    heads = torch.arange(len(PATTERNS), dtype=torch.int32)
    q, k, v, kt, vt = _qkv(2, GRID.tokens, len(PATTERNS), 16, torch.float64, text)
    len_t = torch.tensor([5, 2]) if text else None
    dense_out, dense_lse = ref_dense(q, k, v, idx, heads, kt, vt, len_t)
    block_out, block_lse = ref_blockwise(q, k, v, idx, heads, kt, vt, len_t)
    assert (dense_out - block_out).abs().max() <= 1e-12
    assert torch.equal(torch.isinf(dense_lse), torch.isinf(block_lse))
    finite = torch.isfinite(dense_lse)
    assert (dense_lse[finite] - block_lse[finite]).abs().max() <= 1e-6
    # written out by hand for one non-skip head: softmax over the allowed video keys and valid text
    h = 3
    mask = token_mask(PATTERNS[h], GRID, 16)
    for z in range(2):
        keys, values = k[z, :, h], v[z, :, h]
        allowed = mask
        if text:
            keys, values = torch.cat([keys, kt[z, :, h]]), torch.cat([values, vt[z, :, h]])
            allowed = torch.cat([mask, (torch.arange(text) < len_t[z]).expand(GRID.tokens, text)], 1)
        s = (q[z, :, h] @ keys.T / 4.0).masked_fill(~allowed, -math.inf)
        assert (torch.softmax(s, -1) @ values - dense_out[z, :, h]).abs().max() <= 1e-12
    assert dense_out[:, :, 1].abs().max() == 0                         # skip head


def test_rows_without_keys_are_zero_not_nan():
    empty = HeadPattern("stripe", first_frame=False, diag_r=-1)
    idx = build_indices([empty], GRID, 16)
    q, k, v, _, _ = _qkv(1, GRID.tokens, 1, 16, torch.float64)
    for fn in (ref_dense, ref_blockwise):
        out, lse = fn(q, k, v, idx, torch.tensor([0], dtype=torch.int32))
        assert torch.equal(out, torch.zeros_like(out)) and torch.isneginf(lse).all()


needs_triton = pytest.mark.skipif(not triton_kernel.available(), reason="triton is not installed")


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d,block,text", [(64, 64, 0), (128, 32, 7), (32, 16, 3)])
def test_kernel_matches_reference_under_tolerance_rule(dtype, d, block, text):
    grid = Grid(5, 8, 25)            # 1000 tokens: ragged tail for every block size
    pats = [HeadPattern("diag", r=1), HeadPattern("stripe", first_frame=True, diag_r=0,
                                                  cols=(210, 400, 401, 777, 999)),
            HeadPattern("skip"), HeadPattern("stripe", first_frame=False, diag_r=-1)]   # last: rows with no keys
    idx = build_indices(pats, grid, block)
    heads = torch.tensor([1, 0, 3, 2], dtype=torch.int32)     # group order != model order
    q, k, v, kt, vt = _qkv(2, grid.tokens, 4, d, torch.float64, text)
    len_t = torch.tensor([text, max(text - 2, 0)], dtype=torch.int32) if text else None
    exact, exact_lse = ref_dense(q, k, v, idx, heads, kt, vt, len_t)
    cast = [t.to(dtype) if t is not None else None for t in (q, k, v, kt, vt)]
    ref, _ = ref_dense(*cast[:3], idx, heads, cast[3], cast[4], len_t)
    out, lse = triton_kernel.block_sparse_attn_triton(*cast[:3], idx, heads, cast[3], cast[4], len_t)
    atol = 1e-5 if dtype == torch.float32 else 2e-3
    err = (out.double() - exact).abs().max()
    assert err <= 2 * (ref.double() - exact).abs().max() + atol, err
    assert out.dtype == dtype and not torch.isnan(out).any()
    assert torch.equal(out[:, :, 3], torch.zeros_like(out[:, :, 3]))       # group head 2: skip
    if not text:                                                             # group head 3: no keys at all
        assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))
        assert torch.isneginf(lse[:, 3]).all() and torch.isneginf(exact_lse[:, 3]).all()
    finite = torch.isfinite(exact_lse)
    assert (lse[finite] - exact_lse[finite]).abs().max() <= (1e-4 if dtype == torch.float32 else 1e-2)


@needs_triton
def test_kernel_reads_strided_head_major_views():
    idx = build_indices([HeadPattern("diag", r=1), HeadPattern("mdiag", r=0)], GRID, 16)
    heads = torch.tensor([0, 1], dtype=torch.int32)
    q, k, v = (torch.randn(1, 2, GRID.tokens, 16).transpose(1, 2) for _ in range(3))   # [Z,H,S,D] storage
    out, _ = triton_kernel.block_sparse_attn_triton(q, k, v, idx, heads)
    ref, _ = ref_dense(q, k, v, idx, heads)
    assert out.stride() == q.stride()
    assert (out - ref).abs().max() <= 1e-5


def test_op_compiles_without_graph_breaks():
    idx = build_indices([HeadPattern("diag", r=1), HeadPattern("stripe", cols=(40,))], GRID, 16)
    heads = torch.tensor([0, 1], dtype=torch.int32)
    q, k, v, kt, vt = _qkv(1, GRID.tokens, 2, 16, torch.float32, text=3)

    def f(q, k, v):
        return block_sparse_attn(q * 1.0, k, v, idx, heads, kt, vt)[0] + 1.0

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(q, k, v), f(q, k, v))


def _layer_inputs(layer: SparseLayer, z=2, h=4, d=16, text=0):
    q, k, v, _, _ = _qkv(z, layer.grid.tokens + text, h, d, torch.float64)
    return q, k, v


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def test_layer_groups_equal_per_head_reference():
    pats = [HeadPattern("mdiag", r=1), HeadPattern("full"), HeadPattern("skip"), HeadPattern("diag", r=1)]
    layer = SparseLayer(pats, GRID, 16)
    q, k, v = _layer_inputs(layer)
    out = layer.attend(q, k, v, _sdpa)
    for h, p in enumerate(pats):
        mask = token_mask(p, GRID, 16)
        want = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, h], k[:, :, h], v[:, :, h], attn_mask=mask) if p.mode != "skip" else torch.zeros_like(q[:, :, h])
        assert (out[:, :, h] - want).abs().max() <= 1e-12, p


@pytest.mark.parametrize("position", ["prefix", "suffix"])
def test_layer_with_text_segment(position):
    pats = [HeadPattern("diag", r=0), HeadPattern("full"), HeadPattern("skip")]
    layer = SparseLayer(pats, GRID, 16)
    n_t = 5
    q, k, v = _layer_inputs(layer, h=3, text=n_t)
    video = slice(n_t, None) if position == "prefix" else slice(0, GRID.tokens)
    text = slice(0, n_t) if position == "prefix" else slice(GRID.tokens, None)
    out = layer.attend(q, k, v, _sdpa, video, text)
    vid_idx = torch.arange(GRID.tokens) + (n_t if position == "prefix" else 0)
    txt_idx = torch.arange(n_t) + (0 if position == "prefix" else GRID.tokens)
    full_mask = torch.zeros(GRID.tokens + n_t, GRID.tokens + n_t, dtype=torch.bool)
    full_mask[vid_idx[:, None], vid_idx[None, :]] = token_mask(pats[0], GRID, 16)
    full_mask[:, txt_idx] = True
    full_mask[txt_idx] = True                      # text rows are dense
    want = torch.nn.functional.scaled_dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0], attn_mask=full_mask)
    assert (out[:, :, 0] - want).abs().max() <= 1e-12
    assert (out[:, :, 1] - _sdpa(q, k, v)[:, :, 1]).abs().max() <= 1e-12
    assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2]))


# -- processors on the three architectures ------------------------------------------------------

def _video_model(arch):
    """(transformer, kwargs) with a larger latent than the tiny pipeline: >= 4 blocks of 16 tokens."""
    torch.manual_seed(0)
    model = build_tiny(arch).transformer
    g = torch.Generator().manual_seed(1)
    if arch == "wan":       # patch (1,2,2): 3 x 4 x 6 grid
        kw = dict(hidden_states=torch.randn(2, 4, 3, 8, 12, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 16, generator=g), timestep=torch.tensor([500, 500]))
        grid = (3, 4, 6)
    elif arch == "hunyuan":  # patch 1
        kw = dict(hidden_states=torch.randn(2, 4, 3, 4, 6, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 16, generator=g),
                  encoder_attention_mask=torch.tensor([[1] * 6, [1] * 4 + [0] * 2]),
                  pooled_projections=torch.randn(2, 16, generator=g), timestep=torch.tensor([500, 500]),
                  guidance=torch.tensor([1000.0, 1000.0]))
        grid = (3, 4, 6)
    else:                    # cogvideox: [B, T, C, H, W], patch 2
        kw = dict(hidden_states=torch.randn(2, 3, 4, 8, 12, generator=g),
                  encoder_hidden_states=torch.randn(2, 16, 16, generator=g), timestep=torch.tensor([500, 500]))
        grid = (3, 4, 6)
    return model, kw, grid


CLASSES = {"wan": "WanTransformer3DModel", "hunyuan": "HunyuanVideoTransformer3DModel",
           "cogvideox": "CogVideoXTransformer3DModel"}
TEXT = {"wan": "none", "hunyuan": "suffix", "cogvideox": "prefix"}


def _plan(arch, model, grid, **kw):
    from accel.adapters import get_adapter

    n = len(get_adapter(model).self_attention_modules(model))
    return SparseAttentionConfig.uniform(CLASSES[arch], grid=grid, layers=n, heads=2, block=16,
                                         dense_warmup=0.0, dense_layers=(), text={"position": TEXT[arch], "length": 0},
                                         **kw)


def _run(model, kw):
    with torch.no_grad():
        out = model(**kw, return_dict=False)[0]
    return out


@pytest.mark.parametrize("arch", ["wan", "hunyuan", "cogvideox"])
def test_all_full_plan_reproduces_stock_transformer(arch):
    model, kw, grid = _video_model(arch)
    base = _run(model, kw)
    with accel.applying(model, _plan(arch, model, grid, mode="full")):
        out = _run(model, kw)
        assert accel.stats(model)["attention_sparse_calls"] > 0
    assert (out - base).abs().max() <= 1e-6
    assert torch.equal(_run(model, kw), base)


@pytest.mark.parametrize("arch", ["wan", "hunyuan", "cogvideox"])
def test_sparse_plan_changes_output_and_remove_restores(arch):
    model, kw, grid = _video_model(arch)
    procs = {n: type(p) for n, p in model.attn_processors.items()}
    base = _run(model, kw)
    accel.apply(model, _plan(arch, model, grid, mode="diag", r=0))
    out = _run(model, kw)
    accel.remove(model)
    assert not torch.allclose(out, base) and torch.isfinite(out).all()
    assert {n: type(p) for n, p in model.attn_processors.items()} == procs
    assert torch.equal(_run(model, kw), base)


@pytest.mark.parametrize("arch", ["wan", "cogvideox", "hunyuan"])
def test_skip_plan_zeroes_exactly_the_chosen_heads(arch):
    model, kw, grid = _video_model(arch)
    from accel.adapters import get_adapter

    name, attn = get_adapter(model).self_attention_modules(model)[0]
    captured = {}
    attn.to_out[0].register_forward_pre_hook(lambda m, a: captured.__setitem__("x", a[0].detach().clone()))
    _run(model, kw)
    stock = captured["x"]
    plan = SparseAttentionConfig(model_class=CLASSES[arch], grid=grid, block=16, dense_warmup=0.0, dense_layers=(),
                                 text={"position": TEXT[arch], "length": 0},
                                 layers=[{"index": 0, "module": name, "heads": [{"mode": "skip"}, {"mode": "full"}]}])
    with accel.applying(model, plan):
        _run(model, kw)
    got = captured["x"].unflatten(-1, (2, -1))
    stock = stock.unflatten(-1, (2, -1))
    assert torch.equal(got[..., 0, :], torch.zeros_like(got[..., 0, :]))
    assert (got[..., 1, :] - stock[..., 1, :]).abs().max() <= 1e-6


def test_wan_pipeline_all_full_identical_and_warmup_dense():
    pipe = build_tiny("wan")
    kw = pipe.tiny_call_kwargs
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).frames
    plan = SparseAttentionConfig.uniform("WanTransformer3DModel", grid=(2, 1, 1), layers=2, heads=2, mode="full",
                                         block=16, dense_warmup=0.5, dense_layers=(1,))
    with accel.applying(pipe, plan):
        out = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kw).frames
        stats = accel.stats(pipe)
    assert torch.equal(out, base)
    # 4 steps x CFG 2 calls x 1 sparse layer (layer 1 is dense): 2 warm-up steps dense
    assert stats["attention_dense_calls"] == 4 and stats["attention_sparse_calls"] == 4


def test_plan_round_trip_and_bad_plans(tmp_path):
    model, kw, grid = _video_model("wan")
    plan = _plan("wan", model, grid, mode="stripe", cols=(5, 9))
    plan.save(tmp_path / "p.json")
    assert SparseAttentionConfig.load(tmp_path / "p.json") == plan
    base = _run(model, kw)
    bad = {
        "layer": dict(layers=[{"index": 7, "heads": [{"mode": "full"}] * 2}]),
        "heads": dict(layers=[{"index": 0, "heads": [{"mode": "full"}] * 3}]),
        "module": dict(layers=[{"index": 0, "module": "blocks.1.attn1", "heads": [{"mode": "full"}] * 2}]),
        "class": dict(model_class="CogVideoXTransformer3DModel", text={"position": "prefix", "length": 0}),
        "text": dict(text={"position": "suffix", "length": 4}),
    }
    for what, change in bad.items():
        cfg = SparseAttentionConfig(**{**dict(model_class="WanTransformer3DModel", grid=grid, block=16,
                                              layers=plan.layers), **change})
        with pytest.raises(accel.ConfigError):
            accel.apply(model, cfg)
        assert torch.equal(_run(model, kw), base), what
    for fields, word in [({"layers": [{"index": 0, "heads": [{"mode": "wide"}]}]}, "wide"),
                         ({"block": 48}, "block"), ({"grid": [3, 4]}, "grid"),
                         ({"layers": [{"index": 0, "heads": [{"mode": "diag", "r": -1}]}]}, "'r'")]:
        with pytest.raises(accel.ConfigError, match=word):
            SparseAttentionConfig(**{**dict(model_class="WanTransformer3DModel", grid=grid), **fields})
    with pytest.raises(accel.UnsupportedModelError):
        accel.apply(build_tiny("pixart").transformer, SparseAttentionConfig(model_class="PixArtTransformer2DModel",
                                                                            grid=(1, 2, 2)))


def test_wrong_grid_is_refused_or_runs_dense():
    model, kw, grid = _video_model("wan")
    base = _run(model, kw)
    plan = _plan("wan", model, (3, 4, 4), mode="diag", r=0)
    with accel.applying(model, plan):
        with pytest.raises(accel.ConfigError, match=r"3x4x4 token grid \(48 video tokens\).*72"):
            _run(model, kw)
    plan.on_grid_mismatch = "dense"
    with accel.applying(model, plan):
        assert torch.equal(_run(model, kw), base)


def test_context_parallel_is_refused():
    model, kw, grid = _video_model("wan")
    proc = model.blocks[0].attn1.processor
    proc._parallel_config = object()
    try:
        with pytest.raises(accel.ConfigError, match="context parallelism"):
            accel.apply(model, _plan("wan", model, grid, mode="full"))
    finally:
        proc._parallel_config = None
    assert type(model.blocks[0].attn1.processor).__name__ == "WanAttnProcessor"
