import torch

import accel
from caching import StaticCacheConfig
from tests.dummies import generate, make


def _record(pipe):
    """Log (generation, step, branch, context name) after every denoiser call."""
    log = []
    tracker = accel.steps.tracker_of(pipe.transformer)
    pipe.transformer.register_forward_hook(
        lambda *_: log.append((tracker.generation, tracker.step, tracker.branch, tracker.context_name))
    )
    return tracker, log


def test_pixart_without_cache_context_counts_steps():
    pipe = accel.apply(make("pixart"), StaticCacheConfig(interval=1))
    tracker, log = _record(pipe)
    generate(pipe, num_inference_steps=5)
    assert [(s, b) for _, s, b, _ in log] == [(i, 0) for i in range(5)]
    assert {name for *_, name in log} == {"branch0"}
    assert tracker.num_inference_steps == 5 and tracker.calls_per_step == 1 and tracker.is_split_cfg is False


def test_wan_split_cfg_branches_use_pipeline_context_names():
    pipe = accel.apply(make("wan"), StaticCacheConfig(interval=1))
    tracker, log = _record(pipe)
    generate(pipe, num_inference_steps=3)
    assert [(s, b, n) for _, s, b, n in log] == [
        (0, 0, "cond"), (0, 1, "uncond"), (1, 0, "cond"), (1, 1, "uncond"), (2, 0, "cond"), (2, 1, "uncond")
    ]
    assert tracker.is_split_cfg is True


def test_flux_true_cfg_split_calls():
    pipe = accel.apply(make("flux"), StaticCacheConfig(interval=1))
    tracker, log = _record(pipe)
    generate(pipe, num_inference_steps=3, true_cfg_scale=2.0, negative_prompt="a blue square")
    assert [(s, n) for _, s, _, n in log] == [(i, n) for i in range(3) for n in ("cond", "uncond")]
    assert tracker.calls_per_step == 2


def test_flux_plain_steps():
    pipe = accel.apply(make("flux"), StaticCacheConfig(interval=1))
    _, log = _record(pipe)
    generate(pipe, num_inference_steps=4)
    assert [(s, b) for _, s, b, _ in log] == [(i, 0) for i in range(4)]


def test_consecutive_generations_and_changed_step_count():
    pipe = accel.apply(make("pixart"), StaticCacheConfig(interval=1))
    tracker, log = _record(pipe)
    generate(pipe, num_inference_steps=4)
    generate(pipe, num_inference_steps=4)
    generate(pipe, num_inference_steps=6)
    assert [(g, s) for g, s, _, _ in log] == (
        [(1, i) for i in range(4)] + [(2, i) for i in range(4)] + [(3, i) for i in range(6)]
    )
    assert tracker.num_inference_steps == 6


def test_batch_size_two_counts_like_one_and_is_exact():
    pipe = make("pixart")
    plain = generate(pipe, prompt=["a red circle", "a blue square"])
    accel.apply(pipe, StaticCacheConfig(interval=1))
    tracker, log = _record(pipe)
    out = generate(pipe, prompt=["a red circle", "a blue square"])
    assert out.shape[0] == 2 and torch.equal(out, plain)
    assert [(s, b) for _, s, b, _ in log] == [(i, 0) for i in range(4)]


def test_bare_model_detects_new_generation_by_timestep_and_reset():
    pipe = make("pixart")
    model = pipe.transformer
    accel.apply(model, StaticCacheConfig(interval=2))
    tracker = accel.steps.tracker_of(model)
    x = torch.randn(1, 4, 8, 8)
    enc = torch.randn(1, 16, 16)
    kw = dict(encoder_hidden_states=enc, added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    seen = []
    for _ in range(2):  # second loop: timestep goes back up -> new generation
        for t in (900, 600, 300):
            model(x, timestep=torch.tensor([t]), **kw)
            seen.append((tracker.generation, tracker.step))
    accel.reset(model)
    model(x, timestep=torch.tensor([300]), **kw)  # same timestep, but reset was requested
    seen.append((tracker.generation, tracker.step))
    assert seen == [(1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (3, 0)]


def test_scheduler_wrapper_keeps_signature_and_is_removed():
    import inspect

    pipe = make("pixart")
    before = inspect.signature(pipe.scheduler.set_timesteps)
    accel.apply(pipe, StaticCacheConfig(interval=1))
    assert "set_timesteps" in vars(pipe.scheduler)
    assert inspect.signature(pipe.scheduler.set_timesteps) == before
    accel.remove(pipe)
    assert "set_timesteps" not in vars(pipe.scheduler)
