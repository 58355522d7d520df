"""``accel bench dllm``: diffusion-LM decoding speed and exact match on ``dlm-tasks``.

    $ accel bench dllm --prompts 64 --threads 1

Methods, all on the same held-out tasks in one process: uncached (one token per step), each
dKV-Cache variant (Greedy beside an uncached run with random commit order, which it needs; both draw
the order from the same seed per batch), threshold parallel decoding, and parallel decoding with a cache; at batch 1 and
batch 8; short prompts, plus a long-prompt setting (few-shot examples in front, at least 256 prompt
tokens) reported separately. Fixed settings: generation length 128, block length 32, 128 steps for
the fixed-quota methods, refresh interval 8 for Decode, tau = 0.9.

Every method runs the whole generation length (no stop at EOS), as the fixed 128-step baseline does;
tokens/s = answer tokens up to and including EOS, divided by wall time; "computed" = fraction of
(step, position) pairs the model ran; speedup = a method's tokens/s over the uncached one's at the
same batch size and prompt setting.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

import accel
from accel.bench import hardware
from caching import DKVCacheConfig

METHODS = [
    ("uncached", None, {}),
    ("decode R=8", DKVCacheConfig("decode", 8), {}),
    ("uncached, random order", None, {"remasking": "random"}),
    ("greedy R=2 w=4", DKVCacheConfig("greedy", 2, 4), {"remasking": "random"}),
    # the paper's R = 2 computes at least half the tokens (|D_i| + |D_i+1| + window, refreshed every other
    # step), which caps it near 2x; R = 4 refreshes every fourth step
    ("greedy R=4 w=4", DKVCacheConfig("greedy", 4, 4), {"remasking": "random"}),
    # R = 8 with a narrower window: a refresh every eighth step is most of what a step costs here
    ("greedy R=8 w=2", DKVCacheConfig("greedy", 8, 2), {"remasking": "random"}),
    ("prefill", DKVCacheConfig("prefill"), {}),
    ("pd R=8", DKVCacheConfig("pd", 8), {}),
    ("prefix", DKVCacheConfig("prefix"), {}),
    ("dual", DKVCacheConfig("dual"), {}),
    ("parallel tau=0.9", None, {"threshold": 0.9}),
    ("parallel + prefix", DKVCacheConfig("prefix"), {"threshold": 0.9}),
    ("parallel + dual", DKVCacheConfig("dual"), {"threshold": 0.9}),
]
# all 128 steps run (stopping at the first EOS would end after the first block, 32 steps)
CALL = {"gen_length": 128, "block_length": 32, "steps": 128, "stop_at_eos": False}


def _run(pipe, tasks, prompts, batch: int, config, extra: dict, call: dict) -> dict:
    from pipelines.zoo.dlm import exact_match

    answers, seconds, tokens, computed, nfe = [], 0.0, 0, [], []
    with accel.applying(pipe, *([config] if config is not None else [])):
        pipe([prompts[0]], **call, **extra)  # warm-up
        for i in range(0, len(prompts), batch):
            # random-order methods draw their commit order from a generator seeded per batch, so Greedy and
            # its uncached reference commit in the same order and differ only by what the cache serves
            gen = torch.Generator().manual_seed(i) if extra.get("remasking") == "random" else None
            t0 = time.perf_counter()
            ids = pipe(prompts[i:i + batch], **call, **extra, generator=gen, return_ids=True)
            if ids.is_cuda:
                torch.cuda.synchronize(ids.device)
            seconds += time.perf_counter() - t0
            nfe.append(pipe.nfe)
            eos = pipe.tokenizer.eos_token_id
            for row in ids.tolist():
                tokens += (row.index(eos) + 1) if eos in row else len(row)
                answers.append(pipe.decode(torch.tensor(row)))
            stats = accel.stats(pipe)
            if stats.get("tokens_total"):
                computed.append(stats["tokens_computed"] / stats["tokens_total"])
    return {"exact_match": exact_match(answers, tasks), "tokens_per_s": tokens / seconds, "seconds": seconds,
            "computed": statistics.fmean(computed) if computed else 1.0, "nfe": statistics.fmean(nfe)}


def run(n: int = 64, batches=(1, 8), long_prompt: bool = True, progress: bool = True, path=None,
        call: dict | None = None, device=None) -> dict:
    from tqdm.auto import tqdm

    from pipelines.zoo import load_reference
    from pipelines.zoo.dlm import few_shot, sample_tasks

    call = dict(CALL if call is None else call)
    pipe = load_reference("dlm-tasks", path=path, device=device)
    tasks = sample_tasks("heldout", n)
    settings = [("short", [t.prompt for t in tasks])]
    if long_prompt:
        shots = sample_tasks("calibration", 10)
        settings.append(("long", [few_shot(t.prompt, shots) for t in tasks]))
    rows = []
    bar = tqdm(total=len(settings) * len(batches) * len(METHODS), desc="bench dllm", disable=not progress)
    for label, prompts in settings:
        width = max(len(pipe.tokenizer(p)["input_ids"]) for p in prompts)
        for batch in batches:
            reference = {}  # commit order -> the first (uncached) run in that order
            for name, config, extra in METHODS:
                row = {"prompts": label, "prompt_tokens": width, "batch": batch, "method": name,
                       **_run(pipe, tasks, prompts, batch, config, extra, call)}
                # exact match is compared with the uncached run of the same commit order (random order
                # for Greedy), speed with the plain uncached run (the first method)
                ref = reference.setdefault(extra.get("remasking", "low_confidence"), row)
                row["speedup"] = row["tokens_per_s"] / reference["low_confidence"]["tokens_per_s"]
                row["exact_match_change"] = row["exact_match"] - ref["exact_match"]
                row["reference"] = ref["method"]
                rows.append(row)
                bar.update()
    bar.close()
    return {"suite": "dllm", "n": n, "call": call, "hardware": hardware(), "rows": rows,
            "dtype": str(next(pipe.model.parameters()).dtype)}


def markdown(result: dict) -> str:
    hw = result["hardware"]
    lines = ["# Benchmark `dllm` (dlm-tasks)", "", f"Command: `{result.get('command', '')}`", "",
             f"{result['n']} held-out tasks; {result['call']} (steps: fixed-quota methods), tau 0.9; "
             f"{result['dtype']} on {hw.get('gpu') or hw['cpu_model']} ({hw['cpu_cores']} cores), "
             f"torch {hw['torch']}, transformers {hw.get('transformers')}.", "",
             "speedup: tokens/s over the uncached run's; change: exact match minus that of the uncached run "
             "with the same commit order (\"uncached, random order\" for Greedy, seeded alike).", ""]
    for label in dict.fromkeys(r["prompts"] for r in result["rows"]):
        sub = [r for r in result["rows"] if r["prompts"] == label]
        lines += [f"## {label} prompts ({sub[0]['prompt_tokens']} tokens at most)", "",
                  "| batch | method | tokens/s | speedup | exact match | change | computed | steps |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in sub:
            lines.append(f"| {r['batch']} | {r['method']} | {r['tokens_per_s']:.1f} | {r['speedup']:.2f}× | "
                         f"{r['exact_match']:.1%} | {100 * r['exact_match_change']:+.1f} pt | {r['computed']:.2f} | "
                         f"{r['nfe']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def write(result: dict, out_dir="benchmarks/results") -> Path:
    from accel.bench import write_report

    return write_report(result, markdown(result), out_dir, "dllm")
