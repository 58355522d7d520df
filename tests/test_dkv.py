import pytest
import torch

import accel
from caching import DKVCacheConfig, StaticCacheConfig
from caching.dkv import DKVCache, StepPlan, _cache_keyword, _pack
from pipelines.diffusion_lm import DiffusionLMPipeline
from pipelines.zoo.dlm import DLMRecipe, build_model, build_tokenizer

RECIPE = DLMRecipe(hidden=32, layers=2, heads=2, intermediate=64)
KW = dict(gen_length=64, block_length=32, steps=64, return_ids=True, stop_at_eos=False)
PROMPT_24 = "copy:abcdefghijklmnopqr|"  # 24 tokens


def _pipe(attn="sdpa"):
    tok = build_tokenizer()
    model = build_model(RECIPE, len(tok)).eval()
    model.config._attn_implementation = attn
    pipe = DiffusionLMPipeline(model, tok)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_cached_logits_equal_the_full_forward(attn):
    pipe = _pipe(attn)
    model = pipe.model
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(5, 40, (2, 20), generator=gen)
    attention = torch.ones_like(x)
    attention[1, :3] = 0  # a left-padded row
    positions = (attention.cumsum(-1) - 1).clamp_min(0)
    full = model(input_ids=x, attention_mask=attention, position_ids=positions).logits
    cache = DKVCache(model.config.num_hidden_layers)
    valid = attention.bool()
    idx, ok = _pack(valid)
    cache.set_plan(StepPlan(idx, ok, 20, True))
    mask = ok[:, None, None, :].expand(-1, 1, idx.shape[1], -1)
    if attn == "eager":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    model(input_ids=x.gather(1, idx), position_ids=positions.gather(1, idx), attention_mask=mask,
          use_cache=True, **{_cache_keyword(model): cache})
    # feed unequal subsets per row, serve the rest from the cache
    fed = torch.zeros_like(valid)
    fed[0, [2, 5, 9]] = True
    fed[1, [4, 19]] = True
    f_idx, f_ok = _pack(fed)
    cache.set_plan(StepPlan(f_idx, f_ok, 20, False))
    mask = valid[:, None, None, :].expand(-1, 1, f_idx.shape[1], -1)  # keys: the whole storage
    if attn == "eager":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    out = model(input_ids=x.gather(1, f_idx), position_ids=positions.gather(1, f_idx), attention_mask=mask,
                use_cache=True, **{_cache_keyword(model): cache}).logits
    for row, cols in ((0, [2, 5, 9]), (1, [4, 19])):
        assert torch.allclose(out[row, :len(cols)], full[row, cols], atol=1e-5)


def test_refresh_every_step_is_identical_and_decode_follows_the_golden_schedule():
    pipe = _pipe()
    plain = pipe([PROMPT_24], **KW)
    accel.apply(pipe, DKVCacheConfig(variant="decode", refresh_interval=1))
    assert accel.applied(pipe) == [DKVCacheConfig(variant="decode", refresh_interval=1)]
    assert torch.equal(pipe([PROMPT_24], **KW), plain)
    accel.remove(pipe)
    assert pipe.cache_controller is None and torch.equal(pipe([PROMPT_24], **KW), plain)
    accel.apply(pipe, DKVCacheConfig(variant="decode", refresh_interval=4))
    pipe([PROMPT_24], **KW)
    fed = [int(c[0]) for c in pipe.cache_controller.fed_counts]
    assert fed[:9] == [88, 88, 63, 62, 88, 60, 59, 58, 88]
    assert fed[32:37] == [88, 88, 31, 30, 88]
    # closed form: full at i in {0, 1} or i % R == 0, else (masked at block start) - sum_{j <= i-2} n_j
    for block, masked in ((0, 64), (1, 32)):
        for i in range(32):
            expected = 88 if i < 2 or i % 4 == 0 else masked - (i - 1)
            assert fed[32 * block + i] == expected
    assert 0 < accel.stats(pipe)["tokens_computed"] < accel.stats(pipe)["tokens_total"]


@pytest.mark.parametrize("variant", ["decode", "prefill", "pd", "prefix", "dual"])
def test_batched_cached_generation_equals_per_prompt(variant):
    pipe = _pipe()
    accel.apply(pipe, DKVCacheConfig(variant=variant, refresh_interval=4))
    prompts = [PROMPT_24, "sort:qwert|", "add:12+345|"]
    batched = pipe(prompts, **KW)
    singles = torch.cat([pipe([p], **KW) for p in prompts])
    assert torch.equal(batched, singles)
    assert not (batched == pipe.tokenizer.mask_token_id).any()


def test_parallel_decoding_with_a_cache_and_bad_combinations():
    pipe = _pipe()
    accel.apply(pipe, DKVCacheConfig(variant="dual"))
    out = pipe([PROMPT_24], gen_length=64, block_length=32, threshold=0.5, return_ids=True, stop_at_eos=False)
    assert not (out == pipe.tokenizer.mask_token_id).any() and 2 <= pipe.nfe <= 64
    with pytest.raises(accel.ConfigError, match="at most one cache"):
        accel.apply(pipe, DKVCacheConfig(variant="decode"))
    with pytest.raises(accel.ConfigError, match="does not apply"):
        accel.apply(pipe, StaticCacheConfig())
    with pytest.raises(accel.ConfigError, match="variant"):
        DKVCacheConfig(variant="nope")
    accel.remove(pipe)
    assert accel.applied(pipe) == []


def test_no_item_calls_inside_the_step_loop(monkeypatch):
    pipe = _pipe()
    accel.apply(pipe, DKVCacheConfig(variant="decode", refresh_interval=4))

    def refuse(self):
        raise AssertionError("Tensor.item() called in the decoding loop")

    monkeypatch.setattr(torch.Tensor, "item", refuse)
    out = pipe([PROMPT_24, "sort:qwert|"], gen_length=32, block_length=32, steps=16, return_ids=True)
    assert out.shape == (2, 32)


def test_the_cache_goes_by_the_keyword_the_model_takes():
    import inspect
    import warnings

    pipe = _pipe()
    key = _cache_keyword(pipe.model)
    assert key in inspect.signature(type(pipe.model).forward).parameters
    accel.apply(pipe, DKVCacheConfig(variant="decode", refresh_interval=4))
    with warnings.catch_warnings():  # transformers >= 5.23 warns when given `past_key_values`
        warnings.filterwarnings("error", message=".*past_key_values.*")
        out = pipe([PROMPT_24], **KW)
    assert out.shape == (1, 64) and accel.stats(pipe)["tokens_computed"] < accel.stats(pipe)["tokens_total"]


def test_llada2_pipeline_under_a_decode_cache():
    from diffusers import BlockRefinementScheduler, LLaDA2Pipeline

    plain_pipe = _pipe()
    pipe = LLaDA2Pipeline(model=plain_pipe.model, scheduler=BlockRefinementScheduler(), tokenizer=plain_pipe.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    tok = plain_pipe.tokenizer
    kw = dict(prompt="copy:abcdefgh|", gen_length=64, block_length=32, num_inference_steps=8, use_chat_template=False,
              mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id, output_type="seq", eos_early_stop=False)
    plain = pipe(**kw).sequences
    accel.apply(pipe, DKVCacheConfig(variant="decode", refresh_interval=1))
    assert torch.equal(pipe(**kw).sequences, plain)
    accel.remove(pipe)
    accel.apply(pipe, DKVCacheConfig(variant="decode", refresh_interval=4))
    pipe(**kw)
    stats = accel.stats(pipe)
    assert 0 < stats["tokens_computed"] < stats["tokens_total"]
    with pytest.raises(accel.ConfigError, match="at most one cache"):
        accel.apply(pipe, DKVCacheConfig(variant="decode"))
    accel.remove(pipe)
    assert not hasattr(pipe.model, "_diffusers_hook") and torch.equal(pipe(**kw).sequences, plain)
    with pytest.raises(accel.ConfigError, match="decode"):
        accel.apply(pipe, DKVCacheConfig(variant="dual"))


def test_greedy_feeds_the_delay_the_next_commits_and_a_window():
    pipe = _pipe()
    kw = dict(KW, remasking="random")
    plain = pipe([PROMPT_24], generator=torch.Generator().manual_seed(0), **kw)
    accel.apply(pipe, DKVCacheConfig(variant="greedy", refresh_interval=1))
    assert torch.equal(pipe([PROMPT_24], generator=torch.Generator().manual_seed(0), **kw), plain)
    accel.remove(pipe)
    accel.apply(pipe, DKVCacheConfig(variant="greedy", refresh_interval=2, window=2))
    out = pipe([PROMPT_24], generator=torch.Generator().manual_seed(0), **kw)
    fed = [int(c[0]) for c in pipe.cache_controller.fed_counts]
    # full forwards at even steps; otherwise |D_{i-1}| + |D_i| + window = 1 + 1 + 2
    assert fed[:6] == [88, 4, 88, 4, 88, 4] and not (out == pipe.tokenizer.mask_token_id).any()
    with pytest.raises(accel.ConfigError, match="remasking='random'"):
        pipe([PROMPT_24], **KW)


@pytest.mark.parametrize("rule", ["un", "right", "un_right"])
def test_dream_shifted_logits_under_a_cache(rule):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok = build_tokenizer()
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256)
    cfg.is_causal = False
    torch.manual_seed(0)
    pipe = DiffusionLMPipeline(Qwen2ForCausalLM(cfg).eval(), tok, shift_logits=True)
    pipe.set_progress_bar_config(disable=True)
    prompts = [PROMPT_24, "sort:qwe|"]
    plain = pipe(prompts, **KW)
    accel.apply(pipe, DKVCacheConfig(variant="decode", refresh_interval=1, dream_shift=rule))
    assert torch.equal(pipe(prompts, **KW), plain)
    accel.remove(pipe)
    accel.apply(pipe, DKVCacheConfig(variant="decode", refresh_interval=4, dream_shift=rule))
    out = pipe(prompts, **KW)
    assert not (out == tok.mask_token_id).any() and pipe.cache_controller.computed_fraction < 0.8
    # every row that predicts a still-masked token is fed: the batch equals rows run alone
    singles = torch.cat([pipe([p], **KW) for p in prompts])
    assert torch.equal(out, singles)
