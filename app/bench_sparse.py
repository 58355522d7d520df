"""``accel bench sparse-kernel``: the block-sparse kernel against dense SDPA and compiled FlexAttention.

    $ accel bench sparse-kernel            # on a CUDA GPU: timings; elsewhere: what is unmeasured
    $ accel bench sparse-kernel --shape wan-1.3b-480p --dtype bf16

On a GPU (spec § 10), at the Wan2.1-1.3B 480p shape (32,760 video tokens, 12 heads x 128, block
128, bf16, batch 1): a row-sampled correctness check of the kernel against an fp64 reference; the
kernel's time at density rho in {1, .5, .4, .3, .2, .1, .05} (diag bands) beside torch SDPA
(flash, cuDNN where present) and compiled FlexAttention with the same block lists; TFLOP/s on
computed blocks; the ideal ratio rho * T_dense / T_sparse; per-head times of every search
candidate (the cost table ``accel sparse search --cost-table`` reads); and one Wan transformer of
the 1.3B configuration (random weights) timed for a denoising step dense vs a plan of density
~0.3. Without a GPU the results file says so and lists each unmeasured item.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

SHAPES = {   # name: (heads, head dim, grid F x H' x W')
    "wan-1.3b-480p": (12, 128, (21, 30, 52)),
    "cogvideox1.5": (48, 64, (11, 48, 85)),
    "hunyuan-720p": (24, 128, (33, 45, 80)),
}
DENSITIES = (1.0, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05)
UNMEASURED = [
    "bf16 kernel correctness on GPU (row-sampled against fp64)",
    "kernel time vs density rho in {1, .5, .4, .3, .2, .1, .05}; target <= 1.25 x rho x own dense time",
    "speed vs torch SDPA flash at rho = 0.25 (target >= 2.5x)",
    "TFLOP/s on computed blocks beside compiled FlexAttention with the same mask",
    "per-head cost table of the search candidates",
    "Wan 1.3B-configuration transformer step at 480p, plan density 0.3 vs dense (target >= 1.5x)",
]


def _hardware() -> dict:
    from accel.bench import hardware

    info = hardware()       # CPU model and cores, GPU name, torch/diffusers versions
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    return info


def _band_for(density: float, n_b: int) -> int:
    """Smallest diag radius whose block density reaches ``density``."""
    for r in range(n_b):
        pairs = sum(min(n_b, q + r + 1) - max(0, q - r) for q in range(n_b))
        if pairs / n_b**2 >= density - 1e-9:
            return r
    return n_b


def _rows_check(q, k, v, idx, heads, out, rows: int = 256) -> float:
    """Max abs error of ``out`` on sampled rows against an fp64 gather of each row's allowed keys."""
    from accel.attention.reference import allowed_keys

    n, b = q.shape[1], idx.block
    err = 0.0
    for g, h in enumerate(heads.tolist()):
        for r in torch.linspace(0, n - 1, rows // len(heads) + 1).long().tolist():
            keys = allowed_keys(idx.to("cpu"), g, r // b).to(q.device)
            s = (q[0, r, h].double() @ k[0, keys, h].double().T) / math.sqrt(q.shape[-1])
            want = torch.softmax(s, -1) @ v[0, keys, h].double()
            err = max(err, float((out[0, r, h].double() - want).abs().max()))
    return err


def flex_block_mask(idx, n: int):
    """FlexAttention's ``BlockMask`` for the same full/partial block lists as ``idx`` (``n`` video tokens).

    FlexAttention's lists are as wide as the number of KV blocks (it scatters them into a dense
    [Q blocks, KV blocks] table); ours are only as wide as the longest list, so they are padded with
    zeros past each row's count. Unpadded, the scatter indexes out of bounds (a device-side assert on
    CUDA).
    """
    from torch.nn.attention.flex_attention import BlockMask

    n_b = math.ceil(n / idx.block)

    def wide(t):
        return torch.nn.functional.pad(t, (0, n_b - t.shape[-1]))[None]

    def keep(b, h, q_idx, kv_idx):
        return kv_idx < n

    return BlockMask.from_kv_blocks(idx.part_cnt[None], wide(idx.part_idx), idx.full_cnt[None], wide(idx.full_idx),
                                    BLOCK_SIZE=idx.block, mask_mod=keep, seq_lengths=(n, n))


def _flex(q, k, v, idx):
    """Compiled FlexAttention over the same full/partial block lists ([Z, S, H, D] in and out)."""
    from torch.nn.attention.flex_attention import flex_attention

    mask = flex_block_mask(idx, q.shape[1])
    fn = torch.compile(flex_attention)
    return lambda: fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)


def _kernel_sweep(shape: str, dtype) -> dict:
    import triton.testing

    from accel.attention.kernel import block_sparse_attn_triton
    from accel.attention.masks import Grid, HeadPattern, build_indices

    heads, d, dims = SHAPES[shape]
    grid = Grid(*dims)
    n, block = grid.tokens, 128
    n_b = math.ceil(n / block)
    q, k, v = (torch.randn(1, n, heads, d, device="cuda", dtype=dtype) for _ in range(3))
    ids = torch.arange(heads, dtype=torch.int32, device="cuda")
    out = {"shape": shape, "tokens": n, "heads": heads, "head_dim": d, "block": block, "rows": []}

    def bench(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=100)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    dense = {}
    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                dense[name] = bench(lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt))
        except RuntimeError as exc:
            dense[name] = f"unavailable: {exc}".splitlines()[0]
    out["dense_ms"] = dense
    best_dense = min(t for t in dense.values() if isinstance(t, float))
    t_own_dense = None
    for rho in DENSITIES:
        r = _band_for(rho, n_b)
        idx = build_indices([HeadPattern("diag", r=r)] * heads, grid, block).to("cuda")
        got, _ = block_sparse_attn_triton(q, k, v, idx, ids)
        err = _rows_check(q, k, v, idx, ids, got)
        t = bench(lambda idx=idx: block_sparse_attn_triton(q, k, v, idx, ids))
        t_own_dense = t if rho == 1.0 else t_own_dense
        pairs = 0
        for qb in range(n_b):
            q_len = min(block, n - qb * block)
            for kb in range(max(0, qb - r), min(n_b, qb + r + 1)):
                pairs += q_len * min(block, n - kb * block)
        flops = 4 * d * pairs * heads
        real_rho = idx.density()
        out["rows"].append({
            "target_density": rho, "diag_r": r, "density": real_rho, "kernel_ms": t, "max_abs_err": err,
            "tflops_computed": flops / t / 1e9, "flex_ms": "not run",
            "ideal_ratio_vs_own_dense": real_rho * t_own_dense / t,
            "ideal_ratio_vs_best_dense": real_rho * best_dense / t,
            "within_1.25_rho": t <= 1.25 * real_rho * t_own_dense,
            "speedup_vs_best_dense": best_dense / t,
        })
    return out


def _flex_sweep(shape: str, dtype, rows: list[dict]) -> None:
    """Compiled FlexAttention with each row's block lists, timed into ``rows``. Run last: a failure
    inside a compiled kernel (a device-side assert) poisons the CUDA context for everything after it."""
    import triton.testing

    from accel.attention.masks import Grid, HeadPattern, build_indices

    heads, d, dims = SHAPES[shape]
    grid = Grid(*dims)
    q, k, v = (torch.randn(1, grid.tokens, heads, d, device="cuda", dtype=dtype) for _ in range(3))
    for row in rows:
        idx = build_indices([HeadPattern("diag", r=row["diag_r"])] * heads, grid, 128).to("cuda")
        try:
            row["flex_ms"] = triton.testing.do_bench(_flex(q, k, v, idx), warmup=25, rep=100)
        except Exception as exc:  # report, do not abort the run
            row["flex_ms"] = f"failed: {type(exc).__name__}: {exc}".splitlines()[0][:200]
            break


def _cost_table(shape: str, dtype) -> dict:
    """Per-head kernel time of every search candidate at ``shape`` (ms per head)."""
    import triton.testing

    from accel.attention.layer import SparseLayer
    from accel.attention.masks import Grid
    from accel.attention.search import SparseSearchSettings, candidate_names

    heads, d, dims = SHAPES[shape]
    grid = Grid(*dims)
    q, k, v = (torch.randn(1, grid.tokens, heads, d, device="cuda", dtype=dtype) for _ in range(3))
    table = {}
    rng = torch.Generator().manual_seed(0)
    for name, pattern, k_cols in candidate_names(grid, 128, SparseSearchSettings()):
        if name == "skip":
            table[name] = 0.0
            continue
        if pattern.mode == "stripe" and k_cols:
            cols = torch.randperm(grid.tokens - grid.per_frame, generator=rng)[:k_cols] + grid.per_frame
            pattern = type(pattern)("stripe", first_frame=True, diag_r=0, cols=tuple(cols.tolist()))
        layer = SparseLayer([pattern] * heads, grid, 128)

        def sdpa(a, b, c):
            return torch.nn.functional.scaled_dot_product_attention(
                a.transpose(1, 2), b.transpose(1, 2), c.transpose(1, 2)).transpose(1, 2)

        table[name] = triton.testing.do_bench(lambda layer=layer: layer.attend(q, k, v, sdpa), warmup=25,
                                              rep=100) / heads
    return table


def _wan_step(dtype, density: float = 0.3) -> dict:
    """One transformer call of a Wan2.1-1.3B-configuration model at 480p/81 frames, dense vs sparse."""
    import triton.testing
    from diffusers import WanTransformer3DModel

    import accel
    from accel.attention import SparseAttentionConfig

    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                                  in_channels=16, out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960,
                                  num_layers=30, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                  eps=1e-6).to("cuda", dtype).eval()
    x = torch.randn(1, 16, 21, 60, 104, device="cuda", dtype=dtype)
    text = torch.randn(1, 512, 4096, device="cuda", dtype=dtype)
    t = torch.tensor([500], device="cuda")
    n_b = math.ceil(21 * 30 * 52 / 128)
    r = _band_for(density, n_b)

    def step():
        with torch.no_grad():
            return model(hidden_states=x, encoder_hidden_states=text, timestep=t, return_dict=False)[0]

    dense_ms = triton.testing.do_bench(step, warmup=25, rep=200)
    plan = SparseAttentionConfig.uniform("WanTransformer3DModel", grid=(21, 30, 52), layers=30, heads=12,
                                         mode="diag", r=r, block=128, dense_warmup=0.0, dense_layers=())
    with accel.applying(model, plan):
        sparse_ms = triton.testing.do_bench(step, warmup=25, rep=200)
    return {"density_target": density, "diag_r": r, "dense_ms": dense_ms, "sparse_ms": sparse_ms,
            "speedup": dense_ms / sparse_ms}


def run(shape: str = "wan-1.3b-480p", dtype: str = "bf16") -> dict:
    result = {"suite": "sparse-kernel", "hardware": _hardware(), "dtype": dtype, "shape": shape}
    if not torch.cuda.is_available():
        result["measured"] = False
        result["unmeasured"] = UNMEASURED
        result["note"] = ("no CUDA GPU here: the kernel is only checked in Triton's CPU interpreter by the tests "
                          "(fp32/fp16 at small shapes); run this command on an H100 for the figures")
        return result
    torch_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    result["measured"] = True
    result["kernel"] = _kernel_sweep(shape, torch_dtype)
    result["per_head"] = _cost_table(shape, torch_dtype)
    if shape == "wan-1.3b-480p":
        result["wan_step"] = _wan_step(torch_dtype)
    _flex_sweep(shape, torch_dtype, result["kernel"]["rows"])
    return result


def markdown(result: dict) -> str:
    lines = [f"# sparse-kernel ({result['shape']}, {result['dtype']})", "",
             f"Hardware: {json.dumps(result['hardware'])}", ""]
    if not result.get("measured"):
        lines += [result["note"], "", "Unmeasured:"] + [f"- {u}" for u in result["unmeasured"]]
        return "\n".join(lines) + "\n"
    k = result["kernel"]
    lines += [f"Dense: {json.dumps(k['dense_ms'])} ms", "",
              "| target rho | rho | kernel ms | flex ms | TFLOP/s | rho*T_dense/T | <= 1.25 rho | x vs best dense "
              "| err |",
              "|---|---|---|---|---|---|---|---|---|"]
    for row in k["rows"]:
        flex = f"{row['flex_ms']:.3f}" if isinstance(row["flex_ms"], float) else row["flex_ms"]
        lines.append(f"| {row['target_density']} | {row['density']:.3f} | {row['kernel_ms']:.3f} | {flex} | "
                     f"{row['tflops_computed']:.1f} | {row['ideal_ratio_vs_own_dense']:.2f} | "
                     f"{row['within_1.25_rho']} | "
                     f"{row['speedup_vs_best_dense']:.2f} | {row['max_abs_err']:.2e} |")
    if "wan_step" in result:
        w = result["wan_step"]
        lines += ["", f"Wan 1.3B-config step at 480p: dense {w['dense_ms']:.1f} ms, sparse (density "
                  f"{w['density_target']}) {w['sparse_ms']:.1f} ms, {w['speedup']:.2f}x"]
    return "\n".join(lines) + "\n"


def write(result: dict, out_dir: str = "benchmarks/results") -> Path:
    from accel.bench import write_report

    return write_report(result, markdown(result), out_dir, "sparse-kernel")
