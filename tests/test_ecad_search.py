import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app.cli import main
from caching import ECADConfig

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["ecad", "search", "--model", "tiny", "--cost", "macs", "--pop-size", "8", "--generations", "4",
        "--prompts", "3", "--threads", "1", "--quiet"]


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


def _frontier(work: Path) -> list:
    out = []
    for path in sorted((work / "frontier").glob("*.json")):
        cfg = ECADConfig.load(path)
        out.append((cfg.schedule, round(cfg.provenance["psnr"], 9), cfg.provenance["macs"]))
    return out


def _evaluated(work: Path) -> int:
    return sum(len(p.read_text().splitlines()) for p in work.glob("evals.rank*.jsonl"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    work = tmp_path_factory.mktemp("ecad") / "straight"
    assert main([*ARGS, "--work-dir", str(work)]) == 0
    return work


def test_search_writes_frontier_table_plot_and_schedules(uninterrupted, capsys):
    work = uninterrupted
    files = sorted((work / "frontier").glob("*.json"))
    assert files and (work / "frontier" / "frontier.png").stat().st_size > 1000
    assert "| schedule |" in (work / "frontier" / "frontier.md").read_text()
    configs = [ECADConfig.load(f) for f in files]
    macs = [c.provenance["macs"] for c in configs]
    psnr = [c.provenance["psnr"] for c in configs]
    assert macs == sorted(macs) and psnr == sorted(psnr)  # a frontier: cheaper is worse
    assert all(c.provenance["rejected"] is False and c.resolution == [16, 16] for c in configs)
    gen = json.loads((work / "generation.json").read_text())
    assert gen["generation"] == 4 and len(gen["population"]) == 8
    assert main(["ecad", "show", str(files[0]), "--png", str(work / "h.png")]) == 0
    assert "recompute" in capsys.readouterr().out and (work / "h.png").stat().st_size > 500
    # same seed, same search: rerunning into a new folder reproduces the frontier
    again = work.parent / "again"
    assert main([*ARGS, "--work-dir", str(again)]) == 0
    assert _frontier(again) == _frontier(work)


def test_existing_search_needs_resume_and_matching_settings(uninterrupted):
    import accel

    with pytest.raises(accel.ConfigError, match="resume"):
        main([*ARGS, "--work-dir", str(uninterrupted)])
    with pytest.raises(accel.ConfigError, match="cannot resume, settings"):
        main([*ARGS, "--seed", "1", "--work-dir", str(uninterrupted), "--resume"])


def test_a_finished_search_extends_with_more_generations(uninterrupted, tmp_path):
    import shutil

    work = tmp_path / "extended"
    shutil.copytree(uninterrupted, work)
    # a search stored before a setting existed resumes with that setting at its default
    stored = json.loads((work / "search.json").read_text())
    del stored["settings"]["latency_threads"], stored["settings"]["speedup_range"]
    (work / "search.json").write_text(json.dumps(stored))
    before = _evaluated(work)
    longer = [a if a != "4" else "6" for a in ARGS]  # --generations 6
    assert main([*longer, "--work-dir", str(work), "--resume"]) == 0
    assert json.loads((work / "generation.json").read_text())["generation"] == 6
    assert _evaluated(work) > before


def test_confirmation_rescores_the_near_frontier_on_more_prompts(uninterrupted, tmp_path):
    import shutil

    import accel
    from caching.ecad_search import _read_evals, near_frontier

    work = tmp_path / "confirmed"
    shutil.copytree(uninterrupted, work)
    before = _evaluated(work)
    args = [*ARGS, "--work-dir", str(work), "--resume", "--confirm", "2", "--confirm-within", "1.5"]
    assert main(args) == 0
    assert _evaluated(work) == before                  # the generations were replayed, not re-run
    full = [r for r in _read_evals(work).values() if not r.get("rejected")]
    chosen = near_frontier(full, lambda r: r["macs"], "psnr", 1.5)
    extra = {}
    for line in (work / "confirm.rank0.jsonl").read_text().splitlines():
        record = json.loads(line)
        extra[record["key"]] = record
    assert set(extra) == {r["key"] for r in chosen} and len(chosen) < len(full)
    files = sorted((work / "frontier").glob("*.json"))
    assert files and "re-scored on 2 more" in (work / "frontier" / "frontier.md").read_text()
    by_bits = {}
    for r in chosen:
        by_bits[r["key"]] = r
    for f in files:
        prov = ECADConfig.load(f).provenance
        assert prov["confirmed"] and prov["calibration_prompts"] == 5
        match = [k for k, r in by_bits.items() if r["psnr"] == prov["psnr_search"] and r["macs"] == prov["macs"]]
        assert match, "a frontier schedule that was not re-scored"
        assert prov["psnr"] == pytest.approx((3 * prov["psnr_search"] + 2 * extra[match[0]]["psnr"]) / 5)
    assert main(args) == 0                             # resuming a confirmed search re-runs nothing
    assert len((work / "confirm.rank0.jsonl").read_text().splitlines()) == len(chosen)
    with pytest.raises(accel.ConfigError, match="confirmed on other prompts"):
        main([*ARGS, "--work-dir", str(work), "--resume", "--confirm", "3"])


def test_killed_search_resumes_exactly(uninterrupted, tmp_path):
    work = tmp_path / "killed"
    cmd = [sys.executable, "-m", "app.cli", *ARGS, "--work-dir", str(work)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # kill it in the middle of the second generation (8 evaluations make the first)
    while time.time() < deadline and proc.poll() is None and (not work.exists() or _evaluated(work) < 11):
        time.sleep(0.05)
    assert proc.poll() is None, "the search finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _evaluated(work)
    assert 11 <= done < 32 and not (work / "frontier").exists()
    assert main([*ARGS, "--work-dir", str(work), "--resume"]) == 0
    assert _frontier(work) == _frontier(uninterrupted)


def test_two_processes_give_the_one_process_result(uninterrupted, tmp_path):
    work = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "app.cli", *ARGS, "--work-dir", str(work)]
    run = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list(work.glob("evals.rank*.jsonl"))) == 2  # both processes evaluated candidates
    assert all(p.read_text() for p in work.glob("evals.rank*.jsonl"))
    assert _frontier(work) == _frontier(uninterrupted)


def test_transfer_to_another_resolution_reports_speedup_kept(uninterrupted, tmp_path):
    schedule = sorted((uninterrupted / "frontier").glob("*.json"))[0]
    out = tmp_path / "transfer.json"
    assert main(["ecad", "transfer", str(schedule), "--model", "tiny", "--size", "32", "--prompts", "1",
                 "--runs", "1", "--quiet", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"default", "32px"} and report["speedup_kept"] > 0
    assert "Speedup kept" in out.with_suffix(".md").read_text()


def test_residual_profile_seeds_enter_the_first_generation(tmp_path):
    import numpy as np

    from caching.ecad_search import _unkey

    work = tmp_path / "seeded"
    args = [*ARGS, "--steps", "10", "--profile-seeds", "--work-dir", str(work)]
    args[args.index("--generations") + 1] = "1"
    args[args.index("--pop-size") + 1] = "12"
    assert main(args) == 0
    masks = json.loads((work / "profile_seeds.json").read_text())
    assert masks and all(m[:2] == "CC" and m[-1] == "C" and "R" in m for m in masks)
    first = [json.loads(line) for line in (work / "evals.rank0.jsonl").read_text().splitlines()]
    rows = {"".join("C" if r.all() else "R" if not r.any() else "?" for r in _unkey(rec["key"]).reshape(9, -1))
            for rec in first}
    assert {m[1:] for m in masks} <= rows
    assert np.isfinite([rec["psnr"] for rec in first]).all()


def test_speedup_band_runs_only_schedules_inside_it(tmp_path):
    from caching.ecad_search import SearchSettings

    work = tmp_path / "band"
    args = [*ARGS, "--speedup-range", "1.5", "2.5", "--work-dir", str(work), "--generations", "3"]
    assert main(args) == 0
    run = [json.loads(line) for line in (work / "evals.rank0.jsonl").read_text().splitlines()]
    assert run and all(1.5 <= r["macs_speedup"] <= 2.5 for r in run)      # nothing outside was generated
    files = sorted((work / "frontier").glob("*.json"))
    assert files and all(1.5 <= ECADConfig.load(f).provenance["macs_speedup"] <= 2.5 for f in files)
    assert main([*args, "--resume"]) == 0                                   # the stored band matches
    with pytest.raises(Exception, match="speedup_range"):
        SearchSettings(speedup_range=(2.5, 1.5))


def test_latency_costs_are_timed_at_the_requested_thread_count(tmp_path, monkeypatch):
    import torch

    from caching import ecad_search

    seen = []
    real = ecad_search.measure_latency

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(ecad_search, "measure_latency", spy)
    work = tmp_path / "threads"
    args = [*ARGS, "--latency-threads", "2", "--work-dir", str(work)]
    args[args.index("--generations") + 1] = "1"
    assert main(args) == 0
    assert seen == [2] and torch.get_num_threads() == 1                # timed at 2, the search ran at 1
    assert json.loads((work / "costs.json").read_text())["latency"]["threads"] == 2
    with pytest.raises(Exception, match="latency_threads"):
        ecad_search.SearchSettings(latency_threads=0)


def test_a_reused_cost_table_reproduces_a_latency_search(tmp_path):
    import accel

    latency = [a if a != "macs" else "latency" for a in ARGS]
    first, second = tmp_path / "first", tmp_path / "second"
    assert main([*latency, "--work-dir", str(first)]) == 0
    table = first / "costs.json"
    assert main([*latency, "--work-dir", str(second), "--costs", str(table)]) == 0
    assert json.loads((second / "costs.json").read_text()) == json.loads(table.read_text())
    assert _frontier(second) == _frontier(first)   # timings re-measured would move the estimates
    bad = json.loads(table.read_text())
    bad["latency"]["slots"].popitem()
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    with pytest.raises(accel.ConfigError, match="latency table's slots"):
        main([*latency, "--work-dir", str(tmp_path / "third"), "--costs", str(tmp_path / "bad.json")])
    assert not (tmp_path / "third").exists()        # refused before anything was written
