import json

import numpy as np
import pytest
import torch

import accel
from caching import ECADConfig
from caching.ecad_search import CostModel, measure_costs, pareto_front, seed_schedules
from tests.dummies import ARCHITECTURES, CALLS_PER_STEP, SLOTS, ComponentCounter, generate, hook_footprint, make

STEPS = 4


def _random_bits(pipe, seed, p=0.5, steps=STEPS):
    rng = np.random.default_rng(seed)
    return rng.random((steps, SLOTS_OF(pipe))) < p


def SLOTS_OF(pipe):
    from caching.ecad import slot_names

    return len(slot_names(pipe))


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_all_recompute_is_bit_identical_and_remove_restores(arch):
    pipe = make(arch)
    plain = generate(pipe)
    footprint = hook_footprint(pipe)
    accel.apply(pipe, ECADConfig.all_recompute(pipe, STEPS))
    assert torch.equal(generate(pipe), plain)
    accel.remove(pipe)
    assert hook_footprint(pipe) == footprint
    assert torch.equal(generate(pipe), plain)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hand_built_schedule_gives_hand_counted_computations(arch):
    pipe = make(arch)
    bits = _random_bits(pipe, seed=ARCHITECTURES.index(arch))
    bits[0] = False  # row 0 computes anyway: nothing is cached yet
    config = ECADConfig.from_bits(pipe, bits)
    expected = int(np.maximum(bits, np.arange(STEPS)[:, None] == 0).sum()) * CALLS_PER_STEP[arch]
    counter = ComponentCounter(pipe.transformer)
    accel.apply(pipe, config)
    counter.count = 0
    out = generate(pipe)
    assert counter.count == expected == sum(config.computations().values()) * CALLS_PER_STEP[arch]
    assert accel.stats(pipe)["component_reused"] == SLOTS[arch] * STEPS * CALLS_PER_STEP[arch] - expected
    assert torch.isfinite(out).all()
    assert torch.equal(generate(pipe), out)  # the next generation starts from an empty cache
    counter.close()


def test_reused_outputs_get_the_current_steps_gates():
    """Oracle: after step k with everything reused, each PixArt block outputs
    x + gate_msa(t) * A1_k + A2_k + gate_mlp(t) * F_k with the raw outputs recorded at step k."""
    pipe = make("pixart")
    k = 1
    bits = np.ones((STEPS, SLOTS["pixart"]), bool)
    bits[k + 1:] = False
    accel.apply(pipe, ECADConfig.from_bits(pipe, bits))
    model = pipe.transformer
    raw, seen = {}, []
    step = [0]

    def record(name):
        def hook(module, args, out):
            if step[0] == k:
                raw[name] = out.clone()
        return hook

    handles = []
    for b, block in enumerate(model.transformer_blocks):
        for comp in ("attn1", "attn2", "ff"):
            handles.append(getattr(block, comp).register_forward_hook(record((b, comp))))

        def block_hook(module, args, kwargs, out, b=b):
            seen.append((step[0], b, args[0] if args else kwargs["hidden_states"], kwargs["timestep"], out))
        handles.append(block.register_forward_hook(block_hook, with_kwargs=True))
    handles.append(model.register_forward_hook(lambda *a: step.__setitem__(0, step[0] + 1)))
    generate(pipe)
    for h in handles:
        h.remove()
    checked = 0
    for s, b, x, timestep, out in seen:
        if s <= k:
            continue
        block = model.transformer_blocks[b]
        table = block.scale_shift_table[None] + timestep.reshape(x.shape[0], 6, -1)
        _, _, gate_msa, _, _, gate_mlp = table.chunk(6, dim=1)
        expected = ((gate_msa * raw[(b, "attn1")] + x) + raw[(b, "attn2")]) + gate_mlp * raw[(b, "ff")]
        assert torch.allclose(out, expected, atol=1e-6, rtol=0)
        checked += 1
    assert checked == 2 * (STEPS - k - 1)


def test_cost_model_reproduces_the_papers_pixart_total():
    # ECAD spec 2.3 constants (GMACs per image at 256 px with the CFG pair): 20 x 28 x 3 slots
    slots = [f"transformer_blocks.{b}.{c}" for b in range(28) for c in ("attn1", "attn2", "ff")]
    costs = {"base": 1.4984, "slots": {"attn1": 2.7179, "attn2": 1.9960, "ff": 5.4358}}
    config = ECADConfig(model_class="PixArtTransformer2DModel", num_steps=20, slots=slots,
                        schedule=["1" * len(slots)] * 20)
    assert config.macs(costs) / 1000 == pytest.approx(5.714, abs=5e-4)
    every2 = ECADConfig(model_class="PixArtTransformer2DModel", num_steps=20, slots=slots,
                        schedule=["1" * len(slots) if n % 2 == 0 else "0" * len(slots) for n in range(20)])
    assert every2.macs(costs) == pytest.approx(20 * 1.4984 + 10 * 28 * (2.7179 + 1.9960 + 5.4358))
    model = CostModel({"base": costs["base"], "slots": {s: costs["slots"][s.rsplit(".", 1)[1]] for s in slots}}, slots)
    assert model(every2.bits()) == pytest.approx(every2.macs(costs))


def test_measured_macs_match_the_layer_shapes():
    pipe = make("pixart")
    costs = measure_costs(pipe, "a red circle", pipe.tiny_call_kwargs)
    cfg = pipe.transformer.config
    d = cfg.num_attention_heads * cfg.attention_head_dim
    tokens = (cfg.sample_size // cfg.patch_size) ** 2
    batch = 2  # classifier-free guidance batches cond and uncond
    # self-attention: q, k, v, out projections plus QK^T and AV
    attn1 = batch * (4 * tokens * d * d + 2 * tokens * tokens * d)
    assert costs["slots"]["transformer_blocks.0.attn1"] == attn1
    assert costs["base"] > 0 and costs["calls_per_step"] == 1
    assert costs["slots"]["transformer_blocks.0.ff"] == costs["slots"]["transformer_blocks.1.ff"] > 0


def test_file_roundtrip_and_published_layout(tmp_path):
    pipe = make("pixart")
    config = ECADConfig.from_bits(pipe, _random_bits(pipe, 3), provenance={"psnr": 31.0})
    config.save(tmp_path / "s.json")
    assert ECADConfig.load(tmp_path / "s.json") == config
    assert json.loads((tmp_path / "s.json").read_text())["format"] == "ecad-schedule"
    # the authors' layout: step -> block -> component -> bool
    bits = config.bits()
    table = {f"{n:03d}": {str(b): {c: bool(bits[n, 3 * b + j]) for j, c in enumerate(("attn1", "attn2", "ff"))}
                          for b in range(2)} for n in range(STEPS)}
    (tmp_path / "pub.json").write_text(json.dumps({"cache_schedule": {"num_blocks": 2, "schedule": table}}))
    assert ECADConfig.from_published(tmp_path / "pub.json", pipe).schedule == config.schedule
    flux = make("flux")
    fbits = _random_bits(flux, 4)
    names = [("full_attn", "full_ff", "full_ff_context"), ("single_attn", "single_proj_mlp", "single_proj_out")]
    ftable = {f"{n:03d}": {} for n in range(STEPS)}
    for n in range(STEPS):
        for g, comps in enumerate(names):
            for b in range(2):
                key = str(b) if g == 0 else f"single_{b}"
                ftable[f"{n:03d}"][key] = {c: bool(fbits[n, 6 * g + 3 * b + j]) for j, c in enumerate(comps)}
    (tmp_path / "flux.json").write_text(json.dumps({"cache_schedule": {"schedule": ftable}}))
    assert ECADConfig.from_published(tmp_path / "flux.json", flux).bits().tolist() == fbits.tolist()
    with pytest.raises(accel.ConfigError, match="does not fit"):
        ECADConfig.from_published(tmp_path / "flux.json", pipe)


@pytest.mark.parametrize("text, message", [
    ("{oops", "not valid JSON"),
    ('{"model_class": "PixArtTransformer2DModel", "num_steps": 2, "slots": ["a"], "schedule": ["1"]}', "2 rows"),
    ('{"model_class": "PixArtTransformer2DModel", "num_steps": 1, "slots": ["a", "b"], "schedule": ["1x"]}', "'0'/'1'"),
    ('{"model_class": "", "num_steps": 1, "slots": ["a"], "schedule": ["1"]}', "model_class"),
    ('{"model_class": "X", "num_steps": 1, "slots": ["a"], "schedule": ["1"], "step_mismatch": "x"}', "step_mismatch"),
])
def test_malformed_files_fail_clearly(tmp_path, text, message):
    (tmp_path / "bad.json").write_text(text)
    with pytest.raises(accel.ConfigError, match=message):
        ECADConfig.load(tmp_path / "bad.json")


def test_mismatched_schedules_leave_the_pipeline_unchanged():
    pipe = make("pixart")
    plain = generate(pipe)
    footprint = hook_footprint(pipe)
    from pipelines.tiny import build_pixart

    bigger = build_pixart(num_layers=3)
    with pytest.raises(accel.ConfigError, match="model_class"):
        accel.apply(pipe, ECADConfig.all_recompute(make("flux"), STEPS))
    with pytest.raises(accel.ConfigError, match="6 slots over 2 blocks"):
        accel.apply(pipe, ECADConfig.all_recompute(bigger, STEPS))
    assert hook_footprint(pipe) == footprint and torch.equal(generate(pipe), plain)
    pipe.transformer.transformer_blocks[0].set_chunk_feed_forward(2, 1)
    with pytest.raises(accel.ConfigError, match="chunked feed-forward"):
        accel.apply(pipe, ECADConfig.all_recompute(pipe, STEPS))
    pipe.transformer.transformer_blocks[0].set_chunk_feed_forward(None, 0)
    assert hook_footprint(pipe) == footprint


def test_step_count_mismatch_is_refused_or_resampled():
    pipe = make("pixart")
    bits = _random_bits(pipe, 5)
    accel.apply(pipe, ECADConfig.from_bits(pipe, bits))
    with pytest.raises(accel.ConfigError, match="num_steps=4 but the pipeline runs 6"):
        generate(pipe, num_inference_steps=6)
    accel.remove(pipe)
    nearest = ECADConfig.from_bits(pipe, bits, step_mismatch="nearest")
    assert (nearest.rows_for(STEPS) == nearest.effective_bits()).all()  # N' = N is the identity
    rows = nearest.rows_for(7)  # row m takes row round(m * 3 / 6), halves up
    assert rows[0].all() and (rows[1:] == nearest.effective_bits()[[1, 1, 2, 2, 3, 3]]).all()
    counter = ComponentCounter(pipe.transformer)
    accel.apply(pipe, nearest)
    counter.count = 0
    with pytest.warns(UserWarning, match="resampled"):
        generate(pipe, num_inference_steps=7)
    assert counter.count == int(rows.sum())
    counter.close()


def test_schedule_applies_at_another_resolution_with_the_same_counts():
    pipe = make("pixart")
    bits = _random_bits(pipe, 6)
    accel.apply(pipe, ECADConfig.from_bits(pipe, bits))
    generate(pipe)
    at_default = dict(accel.stats(pipe))
    size = pipe.tiny_call_kwargs["height"] * 2
    out = generate(pipe, height=size, width=size)
    assert out.shape[-1] == size and torch.isfinite(out).all()
    assert accel.stats(pipe) == at_default


def test_seeds_pareto_front_and_pick(tmp_path):
    slots = [f"b.{i}.{c}" for i in range(2) for c in ("attn1", "attn2", "ff")]
    seeds = seed_schedules(slots, 10, ("attn2",))
    assert all(b[0].all() and not b.all() for _, b in seeds)
    assert len({b.tobytes() for _, b in seeds}) == len(seeds)
    points = [(1.0, 30.0), (2.0, 35.0), (1.5, 29.0), (3.0, 40.0), (3.0, 39.0), (0.5, 20.0)]
    assert pareto_front(points) == [5, 0, 1, 3]  # sorted by cost; (1.5, 29) and (3, 39) are beaten
    pipe = make("pixart")
    for k, (speedup, psnr) in enumerate([(1.5, 40.0), (2.1, 33.0), (2.6, 30.5), (3.2, 25.0)]):
        ECADConfig.every_n(pipe, STEPS, 2, provenance={"speedup": speedup, "psnr": psnr}).save(tmp_path / f"{k}.json")
    (tmp_path / "frontier.json").write_text("{}")  # other JSON in the folder is skipped
    assert ECADConfig.pick(tmp_path, target_speedup=2.0).provenance["psnr"] == 33.0
    assert ECADConfig.pick(tmp_path, min_psnr=30.0).provenance["speedup"] == 2.6
    with pytest.raises(accel.ConfigError, match="fastest has 3.2"):
        ECADConfig.pick(tmp_path, target_speedup=4.0)
    with pytest.raises(accel.ConfigError, match="exactly one"):
        ECADConfig.pick(tmp_path)
