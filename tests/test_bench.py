import json

import pytest
from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig

from accel.bench import BenchEntry, run_bench, write_results
from app.cli import main
from caching import StaticCacheConfig
from tests.dummies import hook_footprint, make


def test_bench_rows_quality_and_skipped_fraction(tmp_path):
    pipe = make("pixart")
    footprint = hook_footprint(pipe)
    entries = [
        BenchEntry("static-1", (StaticCacheConfig(interval=1),)),
        BenchEntry("static-2", (StaticCacheConfig(interval=2),)),
        BenchEntry("fbc", (FirstBlockCacheConfig(threshold=0.3),), peer=True),
        BenchEntry("pab", (PyramidAttentionBroadcastConfig(spatial_attention_block_skip_range=2,
                                                           spatial_attention_timestep_skip_range=(-1, 1001)),),
                   peer=True),
    ]
    calls = []

    def n_outputs(outs, prompts):
        calls.append(1)
        return len(outs)

    result = run_bench(pipe, entries, ["a red circle", "a blue square"], pipe.tiny_call_kwargs, runs=2,
                       progress=False, suite="t", scorers={"n_outputs": n_outputs})
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["baseline"]["psnr"] == float("inf") and rows["static-1"]["psnr"] == float("inf")
    assert rows["static-1"]["skipped_fraction"] == 0.0
    assert rows["static-2"]["skipped_fraction"] == 0.5  # 4 steps: compute 0 and 2
    assert rows["static-2"]["psnr"] < float("inf")
    assert 0 < rows["fbc"]["skipped_fraction"] < 1 and 0 < rows["pab"]["skipped_fraction"] < 1
    assert rows["static-2"]["n_outputs"] == 2 and len(calls) == 5
    assert all(len(r["latency_all_s"]) == 2 and r["speedup"] > 0 for r in rows.values())
    assert hook_footprint(pipe) == footprint  # the harness leaves the pipeline as it found it
    path = write_results(result, tmp_path, command="test")
    data = json.loads(path.read_text())  # strict JSON: inf PSNR is written as null
    assert data["hardware"]["cpu_cores"] >= 1 and data["rows"][0]["psnr"] is None
    assert "| static-2 |" in (tmp_path / "t.md").read_text()


def test_cli_bench_tiny_writes_json_and_table(tmp_path, capsys):
    assert main(["bench", "tiny", "--runs", "1", "--prompts", "1", "--out", str(tmp_path), "--quiet"]) == 0
    data = json.loads((tmp_path / "tiny.json").read_text())
    names = [r["name"] for r in data["rows"]]
    assert names[0] == "baseline" and sum(r["peer"] for r in data["rows"]) >= 2
    assert "StaticCache n=2" in capsys.readouterr().out
    assert main(["bench", "nope", "--out", str(tmp_path)]) == 2


def test_psnr_at_equal_speedup_interpolates_along_each_family():
    from accel.bench import compare_families, psnr_at

    points = [(1.5, 40.0), (2.0, 35.0), (3.0, 30.0), (2.2, 20.0)]  # (2.2, 20) is beaten by (3.0, 30)
    assert psnr_at(points, 2.5) == 32.5 and psnr_at(points, 1.0) == 40.0 and psnr_at(points, 3.5) is None
    rows = [{"name": "baseline", "speedup": 1.0, "psnr": float("inf")}]
    rows += [{"name": f"ours {s}", "family": "ours", "speedup": s, "psnr": q} for s, q in [(1.8, 38.0), (2.6, 33.0)]]
    rows += [{"name": f"peer {s}", "family": "peer", "speedup": s, "psnr": q} for s, q in [(1.5, 36.0), (2.2, 30.0)]]
    rows += [{"name": "other", "family": "other", "speedup": 3.0, "psnr": 50.0}]
    cmp = compare_families({"rows": rows}, "ours", (2.0, 2.5), peers=("peer",))
    assert cmp[2.0]["ours"] == pytest.approx(36.75) and cmp[2.0]["peers"]["peer"] == pytest.approx(36 - 6 * 0.5 / 0.7)
    assert cmp[2.0]["margin"] == pytest.approx(36.75 - (36 - 6 * 0.5 / 0.7)) and set(cmp[2.0]["peers"]) == {"peer"}
    assert cmp[2.5]["peers"]["peer"] is None and cmp[2.5]["margin"] == float("inf")  # the peer cannot reach 2.5x
    assert compare_families({"rows": rows}, "ours", (2.0,))[2.0]["margin"] < 0  # "other" beats us
    # along the denoiser speedup: ours reaches 2.5x there, the peer only 1.6x
    for r in rows:
        r["denoiser_speedup"] = 2 * r["speedup"] if r.get("family") == "ours" else r["speedup"] - 0.6
    den = compare_families({"rows": rows}, "ours", (2.5,), peers=("peer",), key="denoiser_speedup")
    assert den[2.5]["ours"] == pytest.approx(38.0) and den[2.5]["peers"]["peer"] is None
    with pytest.raises(ValueError, match="key must be one of"):
        compare_families({"rows": rows}, "ours", (2.0,), key="latency")


def test_cli_tears_down_a_process_group_before_returning(tmp_path):
    # under torchrun an initialised gloo group left at interpreter exit aborts a finished process
    import torch.distributed as dist

    from app.cli import main

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert main(["bench", "nope", "--out", str(tmp_path)]) == 2
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
