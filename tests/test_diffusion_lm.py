import json

import pytest
import torch

import accel
from pipelines.diffusion_lm import DiffusionLMPipeline, _quotas
from pipelines.zoo import is_shipped
from pipelines.zoo.dlm import (
    DLMRecipe,
    batch_of,
    build_model,
    build_tokenizer,
    exact_match,
    load_pipeline,
    per_task,
    sample_tasks,
    train,
)

TINY = DLMRecipe(hidden=32, layers=2, heads=2, intermediate=64, batch=8, steps=6, warmup=2, checkpoint_every=3,
                 eval_every=1000, train_tasks=64, train_lengths=(16, 32), few_shot_steps=4, few_shot_rate=1.0,
                 max_shots=3, refine_steps=3)


@pytest.fixture(scope="module")
def pipe():
    tok = build_tokenizer()
    return DiffusionLMPipeline(build_model(TINY, len(tok)).eval(), tok)


def test_tasks_splits_tokenizer_and_scoring():
    held = sample_tasks("heldout", 40)
    train_inputs = {t.text for t in sample_tasks("train", 400)}
    assert not train_inputs & {t.text for t in held}
    assert sample_tasks("heldout", 40) == held  # seeded
    assert {t.kind for t in held} == {"copy", "reverse", "sort", "add"}
    assert all(8 <= len(t.answer) <= 15 for t in held)
    add = next(t for t in held if t.kind == "add")
    a, b = add.text.split("+")
    assert len(a) == len(b) == 3 and add.answer == f"{add.text}={int(a) + int(b):04d}"
    tok = build_tokenizer()
    ids = tok(held[1].prompt, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(held[1].prompt) and tok.decode(ids) == held[1].prompt
    assert tok.mask_token_id is not None and tok.eos_token_id is not None
    assert exact_match([t.answer for t in held[:4]] + ["x"] * 4, held[:8]) == 0.5
    assert per_task([t.answer for t in held[:4]], held[:4]) == {"copy": 1.0, "reverse": 1.0, "sort": 1.0, "add": 1.0}
    ids, answer, attn = batch_of(held[:3], tok, 32)
    assert ids.shape[1] == attn.shape[1] and answer.sum(1).tolist() == [32, 32, 32]
    assert (ids[answer] == tok.mask_token_id).sum() == 0


def test_quotas_spread_the_masked_count_remainder_first():
    q = _quotas(torch.tensor([10, 3]), 4)
    assert q.tolist() == [[3, 3, 2, 2], [1, 1, 1, 0]]


def test_bad_inputs_fail_clearly(pipe):
    from transformers import LlamaConfig, LlamaForCausalLM

    causal = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=2))
    with pytest.raises(accel.ConfigError, match="causal"):
        DiffusionLMPipeline(causal, pipe.tokenizer)
    tok = build_tokenizer()
    tok.mask_token = None
    with pytest.raises(accel.ConfigError, match="mask"):
        DiffusionLMPipeline(pipe.model, tok)
    with pytest.raises(accel.ConfigError, match="multiple of block_length"):
        pipe(["copy:abc|"], gen_length=40, block_length=32)
    with pytest.raises(accel.ConfigError, match="non-empty"):
        pipe([""], gen_length=32, block_length=32)


def test_generation_commits_every_position_and_counts_steps(pipe):
    pipe.set_progress_bar_config(disable=True)
    ids = pipe(["copy:abcdefgh|"], gen_length=64, block_length=32, steps=64, return_ids=True, stop_at_eos=False)
    assert ids.shape == (1, 64) and not (ids == pipe.tokenizer.mask_token_id).any() and pipe.nfe == 64
    seen = []
    pipe(["copy:abcdefgh|"], gen_length=64, block_length=32, steps=16, stop_at_eos=False,
         stream=lambda step, row, pos, tok: seen.append((step, pos)))
    assert pipe.nfe == 16 and len(seen) == 64 and len({p for _, p in seen}) == 64
    assert all(sum(1 for s, _ in seen if s == k) == 4 for k in range(16))  # 32 masked / 8 steps per block
    pipe(["copy:abcdefgh|"], gen_length=64, block_length=32, threshold=1.1, stop_at_eos=False)
    assert pipe.nfe == 64  # tau > 1: one token per step
    pipe(["copy:abcdefgh|"], gen_length=64, block_length=32, threshold=0.0, stop_at_eos=False)
    assert pipe.nfe == 2  # tau = 0: a whole block per step


def test_batched_generation_equals_per_prompt_generation(pipe):
    prompts = ["copy:abcdefgh|", "reverse:abcdefghijkl|", "add:123+4567|"]
    kw = dict(gen_length=32, block_length=16, steps=16, return_ids=True, stop_at_eos=False)
    batched = pipe(prompts, **kw)
    singles = torch.cat([pipe([p], **kw) for p in prompts])
    assert torch.equal(batched, singles)


def test_training_resumes_and_the_saved_pipeline_loads(tmp_path):
    straight = train(tmp_path / "a", TINY, progress=False)
    assert train(tmp_path / "b", TINY, progress=False, stop_at=3) is None
    assert train(tmp_path / "b", TINY, progress=False, stop_at=12) is None   # inside stage 3 (from step 10)
    moments = torch.load(tmp_path / "b" / "optim.pt", weights_only=True)["state"]
    assert {float(s["step"]) for s in moments.values()} == {2.0}  # stage 3's fresh optimizer took 2 steps
    resumed = train(tmp_path / "b", TINY, progress=False)
    a, b = load_pipeline(straight), load_pipeline(resumed)
    for (name, x), (_, y) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name
    losses = [json.loads(line)["loss"] for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 5 and all(loss > 0 for loss in losses)  # checkpoints 3, 6 | 9 (stage 2) | 12, 13
    assert a.model.config.is_causal is False and a.tokenizer.mask_token == "<mask>"
    assert isinstance(a(["copy:abcdefgh|"], gen_length=32, block_length=32, steps=8)[0], str)


def test_stage_two_puts_solved_tasks_in_front_of_the_prompt():
    from pipelines.zoo.dlm import _lr, _with_shots, sample_tasks

    pool, tasks = sample_tasks("train", 16), sample_tasks("train", 4, start=100)
    long = _with_shots(tasks, pool, TINY, torch.Generator().manual_seed(0))
    for t, lt in zip(tasks, long):
        shots = lt.prompt.split("\n")
        assert shots[-1] == t.prompt and lt.answer == t.answer and 1 <= len(shots) - 1 <= TINY.max_shots
        assert all(any(s == q.prompt + q.answer for q in pool) for s in shots[:-1])
    assert _lr(TINY.steps, TINY) == pytest.approx(TINY.few_shot_lr)        # stage 2 restarts its own schedule
    assert _lr(TINY.refine_start, TINY) == pytest.approx(TINY.refine_lr)   # and so does stage 3


def test_dllm_bench_harness_on_a_tiny_model(tmp_path):
    from app import bench_dllm

    path = train(tmp_path / "m", TINY, progress=False)
    result = bench_dllm.run(n=2, batches=(1, 2), long_prompt=True, progress=False, path=path,
                            call={"gen_length": 32, "block_length": 16, "steps": 16})
    rows = result["rows"]
    assert len(rows) == 2 * 2 * len(bench_dllm.METHODS)
    base = [r for r in rows if r["method"] == "uncached"]
    assert all(r["speedup"] == 1.0 and r["computed"] == 1.0 for r in base)
    cached = [r for r in rows if r["method"] == "decode R=8"]
    assert all(0 < r["computed"] < 1 for r in cached)
    # Greedy's exact match is compared with the uncached run of its own (random, seeded) commit order
    assert {r["reference"] for r in rows if r["method"].startswith("greedy")} == {"uncached, random order"}
    assert {r["reference"] for r in rows if r["method"] == "decode R=8"} == {"uncached"}
    assert min(r["prompt_tokens"] for r in rows if r["prompts"] == "long") >= 256
    out = bench_dllm.write(result, tmp_path)
    assert "| 1 | decode R=8 |" in out.with_suffix(".md").read_text()


@pytest.mark.skipif(not is_shipped("dlm-tasks"), reason="dlm-tasks weights are not shipped")
def test_shipped_dlm_tasks_loads_and_answers_held_out_tasks():
    from pipelines.zoo import load_reference
    from pipelines.zoo.dlm import evaluate

    pipe = load_reference("dlm-tasks")
    tok = pipe.tokenizer
    assert tok.mask_token == "<mask>" and tok.eos_token == "<eos>" and tok.chat_template
    assert pipe.model.config.is_causal is False
    report = evaluate(pipe, n=16)          # greedy, one token per step: deterministic
    # measured on 200 held-out tasks when shipped: 97.0% (copy, reverse and add 100%, sort 88%)
    assert report["exact_match"] >= 0.8, report["per_task"]
    chat = pipe(["copy:abcdefgh|"], chat=True, gen_length=32, block_length=32, steps=32)[0]
    assert chat == "abcdefgh"
