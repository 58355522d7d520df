import dataclasses

import pytest
import torch
from diffusers.hooks import HookRegistry, ModelHook

import accel
from accel.api import register_plugin
from caching import StaticCacheConfig
from tests.dummies import generate, hook_footprint, make


@pytest.fixture()
def pixart():
    pipe = make("pixart")
    return pipe, generate(pipe), hook_footprint(pipe)


def _unchanged(pipe, plain, footprint):
    assert hook_footprint(pipe) == footprint
    assert torch.equal(generate(pipe), plain)


def test_unsupported_model_class_names_it_and_lists_supported(pixart):
    pipe, plain, footprint = pixart
    with pytest.raises(accel.UnsupportedModelError, match="Linear is not supported.*PixArtTransformer2DModel"):
        accel.apply(torch.nn.Linear(2, 2), StaticCacheConfig())
    assert isinstance(accel.UnsupportedModelError("x"), ValueError)

    class NotAPipeline:
        pass

    with pytest.raises(accel.UnsupportedModelError, match="cannot find a denoiser in NotAPipeline"):
        accel.apply(NotAPipeline(), StaticCacheConfig())


def test_second_cache_is_refused_and_first_stays(pixart):
    from diffusers import FirstBlockCacheConfig

    pipe, plain, _ = pixart
    accel.apply(pipe, StaticCacheConfig(interval=1))
    footprint = hook_footprint(pipe)
    with pytest.raises(accel.ConfigError, match="at most one cache plug-in.*StaticCacheConfig, FirstBlockCacheConfig"):
        accel.apply(pipe, FirstBlockCacheConfig(threshold=0.1))
    assert accel.applied(pipe) == [StaticCacheConfig(interval=1)]
    _unchanged(pipe, plain, footprint)
    with pytest.raises(accel.ConfigError, match="at most one cache"):
        accel.apply(make("pixart"), StaticCacheConfig(), StaticCacheConfig(interval=3))


def test_invalid_fields_are_named():
    with pytest.raises(accel.ConfigError, match="interval must be an integer >= 1, got 0"):
        StaticCacheConfig(interval=0)
    with pytest.raises(accel.ConfigError, match="warmup_steps"):
        StaticCacheConfig(warmup_steps=-1)
    with pytest.raises(accel.ConfigError, match="interval"):
        StaticCacheConfig(interval=2.5)
    assert isinstance(accel.ConfigError("x"), ValueError)


def test_unknown_component_fails_at_apply_and_leaves_nothing(pixart):
    pipe, plain, footprint = pixart
    with pytest.raises(accel.ConfigError, match="ffn not in PixArtTransformer2DModel's components"):
        accel.apply(pipe, StaticCacheConfig(components=["ffn"]))
    _unchanged(pipe, plain, footprint)


def test_not_a_config_is_refused(pixart):
    pipe, plain, footprint = pixart
    with pytest.raises(accel.ConfigError, match="dict is not a plug-in config"):
        accel.apply(pipe, {"interval": 2})
    _unchanged(pipe, plain, footprint)


def test_diffusers_cache_already_enabled_is_refused():
    from diffusers import FirstBlockCacheConfig

    pipe = make("flux")
    plain = generate(pipe)
    pipe.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.0))
    enabled = generate(pipe)
    footprint = hook_footprint(pipe)
    with pytest.raises(accel.ConfigError, match="already has diffusers' own cache enabled"):
        accel.apply(pipe, StaticCacheConfig())
    assert hook_footprint(pipe) == footprint
    assert torch.equal(generate(pipe), enabled)
    pipe.transformer.disable_cache()
    assert torch.equal(generate(pipe), plain)


@dataclasses.dataclass
class _Exploding:
    kind = "attention"


@register_plugin(_Exploding)
def _install_then_fail(model, config, tracker, adapter):
    for slot in adapter.slots(model):  # a careless installer: hooks go on, then it fails
        HookRegistry.check_if_exists_or_initialize(slot.module).register_hook(ModelHook(), "careless")
    raise RuntimeError("boom")


def test_apply_is_atomic_when_an_installer_fails_midway(pixart):
    pipe, plain, footprint = pixart
    with pytest.raises(RuntimeError, match="boom"):
        accel.apply(pipe, StaticCacheConfig(interval=2), _Exploding())
    assert accel.applied(pipe) == []
    _unchanged(pipe, plain, footprint)


def test_failed_apply_keeps_earlier_plugins_working(pixart):
    pipe, plain, _ = pixart
    accel.apply(pipe, StaticCacheConfig(interval=2))
    cached, footprint = generate(pipe), hook_footprint(pipe)
    with pytest.raises(RuntimeError, match="boom"):
        accel.apply(pipe, _Exploding())
    assert hook_footprint(pipe) == footprint
    assert torch.equal(generate(pipe), cached)


def test_applying_context_manager(pixart):
    pipe, plain, footprint = pixart
    with accel.applying(pipe, StaticCacheConfig(interval=2)):
        cached = generate(pipe)
        assert accel.applied(pipe) == [StaticCacheConfig(interval=2)]
    assert not torch.equal(cached, plain)
    _unchanged(pipe, plain, footprint)


def test_reset_without_apply_is_a_clear_error(pixart):
    pipe, *_ = pixart
    with pytest.raises(accel.ConfigError, match="nothing is applied"):
        accel.reset(pipe)
