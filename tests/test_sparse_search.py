"""Sparse-vDiT offline search: candidates, error measure, selection, plan output, CLI."""

import json

import pytest
import torch

import accel
from accel.attention import SparseAttentionConfig
from accel.attention.masks import Grid, HeadPattern
from accel.attention.search import SparseSearchSettings, analytic_cost, candidate_names, search_plan
from pipelines.tiny import build_tiny

CALL = dict(height=64, width=96, num_frames=9)      # Wan tiny: 3 x 4 x 6 token grid


def _pipe():
    pipe = build_tiny("wan")
    return pipe, dict(pipe.tiny_call_kwargs, **CALL)


def _settings(**kw):
    return SparseSearchSettings(**{"block": 16, "rows": 48, "dense_layers": (), **kw})


def test_candidates_follow_the_frame_size():
    grid = Grid(21, 30, 52)
    names = [c[0] for c in candidate_names(grid, 128, SparseSearchSettings())]
    # P = 1560: ceil(P/2B) = 7, ceil(P/B) = 13, ceil(2P/B) = 25 (spec: Wan 480p r = 13 gives ~0.105)
    assert names == ["full", "skip", "diag7", "diag13", "diag25", "mdiag0", "mdiag1", "mdiag2", "mdiag4",
                     "stripe0", "stripe512", "stripe2048"]
    assert abs(analytic_cost(HeadPattern("diag", r=13), grid, 128) - 0.105) < 0.005
    assert analytic_cost(HeadPattern("skip"), grid, 128) == 0 and analytic_cost(HeadPattern("full"), grid, 128) == 1


def test_heads_without_output_weight_are_skipped_and_others_stay_full():
    pipe, call = _pipe()
    with torch.no_grad():                   # head 1's output projection columns are zero in every layer
        for block in pipe.transformer.blocks:
            block.attn1.to_out[0].weight[:, 8:] = 0
    plan = search_plan(pipe, ["a red circle"], call, _settings(tau=1e-6), progress=False)
    assert plan.grid == (3, 4, 6)
    for layer in plan.layers:
        assert [h["mode"] for h in layer["heads"]] == ["full", "skip"]
    assert plan.stats["skipped"] == 0.5 and plan.stats["density"] == 0.5


def test_budgets_choose_cheaper_patterns_and_plans_apply():
    pipe, call = _pipe()
    loose = search_plan(pipe, ["a red circle"], call, _settings(tau=1e9), progress=False)
    assert all(h["mode"] == "skip" for la in loose.layers for h in la["heads"])
    target = search_plan(pipe, ["a red circle", "a blue square"], call, _settings(target_cost=0.4), progress=False)
    assert target.stats["pred_attn_ratio"] <= 0.2 + 0.8 * 0.4 + 1e-6
    assert target.search["prompts"] == 2 and target.stats["density"] < 1
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **call).frames
    with accel.applying(pipe, target):
        out = pipe("a red circle", generator=torch.Generator().manual_seed(0), **call).frames
        assert accel.stats(pipe)["attention_sparse_calls"] > 0
    assert torch.isfinite(out).all() and not torch.equal(out, base)
    assert torch.equal(pipe("a red circle", generator=torch.Generator().manual_seed(0), **call).frames, base)


def test_cost_table_overrides_the_analytic_model():
    pipe, call = _pipe()
    table = {"full": 1.0, "skip": 5.0, "mdiag0": 0.01}      # everything else: analytic
    plan = search_plan(pipe, ["a red circle"], call, _settings(tau=1e9, cost_table=table), progress=False)
    assert all(h == {"mode": "mdiag", "r": 0} for la in plan.layers for h in la["heads"])
    assert plan.search["cost_model"] == "table"


def test_cli_search_and_show(tmp_path, capsys):
    from app.cli import main

    out = tmp_path / "plan.json"
    assert main(["sparse", "search", "--model", "tiny-wan", "--height", "64", "--width", "96", "--frames", "9",
                 "--block", "16", "--rows", "32", "--prompts", "1", "--target-cost", "0.5", "--dense-layers",
                 "--out", str(out), "--quiet"]) == 0
    plan = SparseAttentionConfig.load(out)
    assert plan.model_class == "WanTransformer3DModel" and len(plan.layers) == 2
    assert main(["sparse", "show", str(out)]) == 0
    assert out.with_suffix(".png").stat().st_size > 1000
    assert "layer   0 blocks.0.attn1" in capsys.readouterr().out


def test_bench_sparse_kernel_lists_unmeasured_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("on a GPU the command measures (minutes)")
    from app.cli import main

    assert main(["bench", "sparse-kernel", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "sparse-kernel.json").read_text())
    assert result["measured"] is False and len(result["unmeasured"]) == 6
