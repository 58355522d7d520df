import dataclasses

import pytest
import torch
from diffusers import FirstBlockCacheConfig, MagCacheConfig, PyramidAttentionBroadcastConfig, TaylorSeerCacheConfig

import accel
from tests.dummies import ComponentCounter, generate, hook_footprint, make

STEPS = 6
CONFIGS = {
    "fbc": FirstBlockCacheConfig(threshold=0.3),
    "pab": PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001)
    ),
    "taylorseer": TaylorSeerCacheConfig(
        cache_interval=2, disable_cache_before_step=1, taylor_factors_dtype=None,
        cache_identifiers=[r"^transformer_blocks\.\d+\.attn\d$", r"^transformer_blocks\.\d+\.ff$"],
    ),
    "magcache": MagCacheConfig(num_inference_steps=STEPS, mag_ratios=[1.0] * STEPS, threshold=0.5),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_diffusers_cache_runs_on_pixart_and_reduces_computations(name):
    pipe = make("pixart")  # PixArt's pipeline enters no cache_context and passes no step index
    plain = generate(pipe, num_inference_steps=STEPS)
    footprint = hook_footprint(pipe)
    counter = ComponentCounter(pipe.transformer)
    generate(pipe, num_inference_steps=STEPS)
    full = counter.count
    counter.count = 0
    user_config = CONFIGS[name]
    snapshot = repr(vars(user_config))
    accel.apply(pipe, user_config)
    cached = generate(pipe, num_inference_steps=STEPS)
    assert counter.count < full
    assert torch.isfinite(cached).all() and not torch.equal(cached, plain)
    counter.count = 0
    assert torch.equal(generate(pipe, num_inference_steps=STEPS), cached)  # state reset between runs
    assert repr(vars(user_config)) == snapshot  # the user's config object is not mutated
    accel.remove(pipe)
    counter.close()
    assert hook_footprint(pipe) == footprint
    assert torch.equal(generate(pipe, num_inference_steps=STEPS), plain)
    assert not pipe.transformer.__dict__.get("_cache_config")  # we never set diffusers' own flag


@pytest.mark.parametrize("arch", ["sd3", "flux", "wan"])
def test_pab_runs_on_other_pipelines(arch):
    pipe = make(arch)
    plain = generate(pipe, num_inference_steps=STEPS)
    counter = ComponentCounter(pipe.transformer)
    generate(pipe, num_inference_steps=STEPS)
    full, counter.count = counter.count, 0
    accel.apply(pipe, CONFIGS["pab"])
    generate(pipe, num_inference_steps=STEPS)
    assert counter.count < full
    accel.remove(pipe)
    counter.close()
    assert torch.equal(generate(pipe, num_inference_steps=STEPS), plain)


def test_pab_timestep_window_uses_tracked_timestep():
    # a window that excludes every DDIM timestep must skip nothing: proves the callback is live
    pipe = make("pixart")
    counter = ComponentCounter(pipe.transformer)
    generate(pipe, num_inference_steps=STEPS)
    full, counter.count = counter.count, 0
    accel.apply(pipe, dataclasses.replace(CONFIGS["pab"], spatial_attention_timestep_skip_range=(2000, 3000)))
    generate(pipe, num_inference_steps=STEPS)
    assert counter.count == full


@pytest.mark.parametrize("arch", ["pixart", "wan"])
def test_seacache_gets_step_sigma_and_latents_from_the_tracker(arch):
    from diffusers import SeaCacheConfig

    pipe = make(arch)
    plain = generate(pipe, num_inference_steps=8)
    footprint = hook_footprint(pipe)
    counter = ComponentCounter(pipe.transformer)
    generate(pipe, num_inference_steps=8)
    full, counter.count = counter.count, 0
    accel.apply(pipe, SeaCacheConfig(threshold=0.5))
    generate(pipe, num_inference_steps=8)
    assert counter.count < full  # not diffusers' fail-open mode
    accel.remove(pipe)
    counter.close()
    assert hook_footprint(pipe) == footprint
    assert torch.equal(generate(pipe, num_inference_steps=8), plain)


def test_removing_an_inner_hook_keeps_the_outer_one_running():
    from diffusers.hooks import HookRegistry, ModelHook

    from accel import _compat

    calls = []

    class Tag(ModelHook):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag

        def new_forward(self, module, *args, **kwargs):
            calls.append(self.tag)
            return self.fn_ref.original_forward(*args, **kwargs)

    lin = torch.nn.Linear(2, 2)
    registry = HookRegistry.check_if_exists_or_initialize(lin)
    registry.register_hook(Tag("inner"), "inner")
    registry.register_hook(Tag("outer"), "outer")
    _compat.remove_hook(lin, "inner")
    lin(torch.ones(1, 2))
    assert calls == ["outer"]
    _compat.remove_hook(lin, "outer")
    _compat.drop_empty_registries(lin, {id(lin)})
    assert "forward" not in vars(lin) and not hasattr(lin, "_diffusers_hook")
