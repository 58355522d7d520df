import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import accel
from caching import ERTACacheConfig
from caching.ertacache import _SchedulerWrapper, scheduler_signature
from caching.ertacache_profile import (
    delta_for_reuse,
    fit_rectification,
    greedy_mask,
    make_profile,
    min_sum_mask,
    phi_from,
    relative_errors,
)
from tests.dummies import ARCHITECTURES, generate, hook_footprint, make

STEPS = 8
PROMPTS = ["a red circle", "a blue square"]
_PROFILES: dict = {}


def _kw(pipe, **extra):
    return dict(pipe.tiny_call_kwargs, num_inference_steps=STEPS, **extra)


def _profile(arch: str) -> ERTACacheConfig:
    if arch not in _PROFILES:
        pipe = make(arch)
        _PROFILES[arch] = make_profile(pipe, PROMPTS, _kw(pipe), target_speedup=2.0, progress=False,
                                       fit_phi=arch in ("pixart", "wan", "flux", "sd3", "hunyuan"))
    return _PROFILES[arch]


def _all_compute(config: ERTACacheConfig) -> ERTACacheConfig:
    return dataclasses.replace(config, mask="C" * config.num_steps)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_all_compute_mask_is_bit_identical_and_remove_restores(arch):
    pipe = make(arch)
    plain = generate(pipe, **_kw(pipe))
    footprint = hook_footprint(pipe)
    profile = _profile(arch)
    accel.apply(pipe, _all_compute(profile))
    assert torch.equal(generate(pipe, **_kw(pipe)), plain)
    accel.remove(pipe)
    accel.apply(pipe, profile)
    cached = generate(pipe, **_kw(pipe))
    assert not torch.equal(cached, plain) and torch.isfinite(cached).all()
    assert torch.equal(generate(pipe, **_kw(pipe)), cached)  # repeated calls are identical
    stats = accel.stats(pipe)
    assert stats["denoiser_calls_reused"] == profile.mask.count("R") * (2 if arch == "wan" else 1)
    accel.remove(pipe)
    assert hook_footprint(pipe) == footprint and "step" not in vars(pipe.scheduler)
    assert torch.equal(generate(pipe, **_kw(pipe)), plain)


def _static_reference(pipe, mask: str):
    """An independent static reuse: plain torch hooks replace the last block's output on R steps by
    u_i + r_k (the other blocks still run; their outputs are discarded)."""
    model = pipe.transformer
    blocks = model.transformer_blocks
    state = {"step": -1, "u": None, "r": None}
    hooks = [
        model.register_forward_pre_hook(lambda m, a: state.__setitem__("step", state["step"] + 1)),
        blocks[0].register_forward_pre_hook(
            lambda m, a, k: state.__setitem__("u", a[0] if a else k["hidden_states"]), with_kwargs=True),
    ]

    def last(module, args, out):
        if mask[state["step"]] == "R":
            return state["u"] + state["r"]
        state["r"] = out - state["u"]
        return out

    hooks.append(blocks[-1].register_forward_hook(last))
    try:
        return generate(pipe, **_kw(pipe))
    finally:
        for h in hooks:
            h.remove()


def test_plain_reuse_equals_an_independent_static_reference_and_zero_correction_equals_plain_reuse():
    pipe = make("pixart")
    profile = _profile("pixart")
    reference = _static_reference(pipe, profile.mask)
    accel.apply(pipe, profile.variant(rectify=False, adjust_timesteps=False))
    plain_reuse = generate(pipe, **_kw(pipe))
    assert "step" not in vars(pipe.scheduler)  # phi switched off: the scheduler is untouched
    accel.remove(pipe)
    assert torch.equal(plain_reuse, reference)
    dim = profile.latent_shape[1]
    zero = {c: [[0.0] * dim for _ in range(profile.num_steps)] for c in profile.K}
    accel.apply(pipe, profile.variant(K=zero, b=zero, adjust_timesteps=False))
    assert torch.equal(generate(pipe, **_kw(pipe)), plain_reuse)
    accel.remove(pipe)
    accel.apply(pipe, profile.variant(phi=[1.0] * profile.num_steps))
    assert "step" not in vars(pipe.scheduler)  # phi = 1 everywhere: no wrapper at all
    accel.remove(pipe)


def _fake_state(step: int, phi: float):
    return SimpleNamespace(tracker=SimpleNamespace(step=step), phi=[phi] * 10, on_adjust=None,
                           config=SimpleNamespace(adjust_timesteps=True), step_reused=lambda i: True)


def test_euler_interval_scaling_equals_output_scaling():
    from diffusers import FlowMatchEulerDiscreteScheduler

    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(0)
    sample, out = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    i, phi = 4, 1.3
    sched._step_index = i
    by_output = sched.step(out * phi, sched.timesteps[i], sample, return_dict=False)[0]
    wrapper = _SchedulerWrapper(sched, _fake_state(i, phi), approximate=False)
    sched._step_index = i
    by_interval = sched.step(out, sched.timesteps[i], sample, return_dict=False)[0]
    wrapper.remove()
    assert "step" not in vars(sched)
    # 2 ulp at the scale of the operands (the update rounds at the scale of the sample)
    ulp = torch.finfo(torch.float32).eps * torch.maximum(by_output.abs(), sample.abs())
    assert ((by_interval - by_output).abs() <= 2 * ulp).all()


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_ddim_interval_scaling_is_euler_in_scaled_coordinates(prediction):
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(clip_sample=False, prediction_type=prediction, timestep_spacing="trailing")
    sched.set_timesteps(10)
    gen = torch.Generator().manual_seed(1)
    sample, out = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    i, phi = 3, 0.8
    t = int(sched.timesteps[i])
    stock = sched.step(out, t, sample, return_dict=False)[0]
    wrapper = _SchedulerWrapper(sched, _fake_state(i, 1.0), approximate=False)
    assert torch.equal(sched.step(out, t, sample, return_dict=False)[0], stock)  # phi = 1: identity
    wrapper.state.phi = [phi] * 10
    adjusted = sched.step(out, t, sample, return_dict=False)[0]
    wrapper.remove()
    ac = sched.alphas_cumprod.double()
    a_t, a_p = ac[t], ac[t - 100]
    alpha_t, sigma_t, alpha_p, sigma_p = a_t.sqrt(), (1 - a_t).sqrt(), a_p.sqrt(), (1 - a_p).sqrt()
    x, v = sample.double(), out.double()
    eps = v if prediction == "epsilon" else alpha_t * v + sigma_t * x
    expected = alpha_p * (x / alpha_t + phi * (sigma_p / alpha_p - sigma_t / alpha_t) * eps)
    stock_expected = alpha_p * (x / alpha_t + (sigma_p / alpha_p - sigma_t / alpha_t) * eps)
    stock_error = float((stock.double() - stock_expected).abs().max())  # the scheduler's own fp32 rounding
    assert float((adjusted.double() - expected).abs().max()) <= 2 * stock_error + 1e-7
    assert not torch.allclose(adjusted, stock)


def test_profiler_mask_properties_and_determinism():
    profile = _profile("pixart")
    assert profile.mask[0] == "C" and profile.mask[-1] == "C"
    assert profile.mask.count("R") == round(STEPS * 0.5)
    for table in (profile.K, profile.b):
        for rows in table.values():
            assert len(rows) == STEPS and all(len(r) == profile.latent_shape[1] for r in rows)
            assert all(not any(rows[i]) for i, m in enumerate(profile.mask) if m == "C")
    assert all(p == 1.0 for p, m in zip(profile.phi, profile.mask) if m == "C")
    assert all(0.5 <= p <= 1.5 for p in profile.phi)
    pipe = make("pixart")
    again = make_profile(pipe, PROMPTS, _kw(pipe), target_speedup=2.0, progress=False)
    assert again == profile
    errors = np.random.default_rng(0).random((10, 10))
    counts = [greedy_mask(errors, d, warmup=2).count("R") for d in np.linspace(0, 1.01, 30)]
    assert counts == sorted(counts) and counts[0] == 0 and counts[-1] == 10 - 2 - 1
    assert greedy_mask(errors, 0.0)[:1] == "C" and greedy_mask(errors, 2.0) == "C" + "R" * 8 + "C"
    delta = delta_for_reuse(errors, 4)
    assert greedy_mask(errors, delta).count("R") >= 4
    assert greedy_mask(errors, np.nextafter(delta, 0)).count("R") < 4


def _summed_error(errors, mask):
    total, k = 0.0, 0
    for i, m in enumerate(mask):
        if m == "R":
            total += errors[k, i]
        else:
            k = i
    return total


def test_min_sum_mask_is_the_exact_optimum_and_beats_greedy():
    import itertools

    errors = np.triu(np.random.default_rng(3).random((9, 9)), 1)
    for reuse in (2, 4, 6):
        mask = min_sum_mask(errors, reuse, warmup=2)
        assert mask.count("R") == reuse and mask[:2] == "CC" and mask[-1] == "C"
        brute = min(_summed_error(errors, "CC" + "".join("R" if j in pick else "C" for j in range(2, 8)) + "C")
                    for pick in itertools.combinations(range(2, 8), reuse))
        assert _summed_error(errors, mask) == pytest.approx(brute)
    # errors that add up along the way (e(k, i) = sum of per-step changes k+1..i): at the reuse count the
    # greedy threshold reaches, the summed error is never lower than min-sum's, and often higher
    worse = 0
    for seed in range(10):
        change = np.random.default_rng(seed).random(12)
        e = np.array([[change[k + 1:i + 1].sum() if i > k else 0.0 for i in range(12)] for k in range(12)])
        greedy = greedy_mask(e, delta_for_reuse(e, 5))
        best = min_sum_mask(e, 5)
        assert greedy.count("R") == best.count("R") == 5
        assert _summed_error(e, best) <= _summed_error(e, greedy) + 1e-12
        worse += _summed_error(e, best) < _summed_error(e, greedy) - 1e-9
    assert worse >= 3
    e = np.ones((6, 6))
    assert min_sum_mask(e, 10) == "C" + "R" * 4 + "C"     # more than the free steps: all of them


def test_min_sum_profile_reuses_the_target_count():
    pipe = make("pixart")
    profile = make_profile(pipe, PROMPTS, _kw(pipe), target_speedup=2.0, mask_rule="min-sum", fit_phi=False,
                           progress=False)
    assert profile.mask.count("R") == STEPS // 2 and profile.calibration["mask_rule"] == "min-sum"
    with pytest.raises(accel.ConfigError, match="mask_rule must be one of"):
        make_profile(pipe, PROMPTS, _kw(pipe), mask_rule="dp", progress=False)
    with pytest.raises(accel.ConfigError, match="needs target_speedup"):
        make_profile(pipe, PROMPTS, _kw(pipe), target_speedup=None, delta=0.1, mask_rule="min-sum", progress=False)


def test_fits_recover_known_models():
    gen = torch.Generator().manual_seed(2)
    a, c = torch.rand(6, generator=gen) - 0.5, torch.randn(6, generator=gen)
    r0 = torch.randn(2, 50, 6, generator=gen)
    residuals = [{"branch0": r0}, {"branch0": r0 + a * r0 + c}, {"branch0": r0.clone()}]
    K, b = fit_rectification(residuals, "CRC")
    assert torch.allclose(K["branch0"][1].float(), a, atol=1e-5)
    assert torch.allclose(b["branch0"][1].float(), c, atol=1e-5)
    assert not K["branch0"][0].any() and not b["branch0"][2].any()
    e = relative_errors(residuals)
    assert e[0, 2] == 0.0 and e[0, 1] > 0
    prev, d = torch.randn(3, 4, 8, generator=gen), torch.randn(3, 4, 8, generator=gen)
    assert phi_from(prev + 0.3 * d, prev, d) == pytest.approx(1.3, abs=1e-6)
    assert phi_from(prev + 5.0 * d, prev, d) == 1.5  # clamped


def test_split_cfg_keeps_one_residual_per_context():
    pipe = make("wan")
    profile = _profile("wan")
    assert set(profile.K) == {"cond", "uncond"}
    accel.apply(pipe, profile)
    generate(pipe, **_kw(pipe))
    state = pipe.transformer._accel_state.installed[0][1].state
    assert set(state.residual) == {"cond", "uncond"}
    assert not torch.equal(state.residual["cond"], state.residual["uncond"])
    # swapping the contexts' tables changes the output: each context reads its own
    first = generate(pipe, **_kw(pipe))
    accel.remove(pipe)
    swapped = profile.variant(K={"cond": profile.K["uncond"], "uncond": profile.K["cond"]},
                              b={"cond": profile.b["uncond"], "uncond": profile.b["cond"]})
    accel.apply(pipe, swapped)
    assert not torch.equal(generate(pipe, **_kw(pipe)), first)


def test_batch_of_two_matches_single_prompts():
    pipe = make("pixart")
    accel.apply(pipe, _profile("pixart"))
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    both = pipe(PROMPTS, generator=gens, **_kw(pipe)).images
    singles = torch.cat([generate(pipe, p, seed=i, **_kw(pipe)) for i, p in enumerate(PROMPTS)])
    assert both.shape[0] == 2 and torch.allclose(both, singles, atol=1e-4)


def test_mismatched_profiles_are_refused_and_leave_the_pipeline_unchanged(tmp_path):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    pipe = make("pixart")
    profile = _profile("pixart")
    plain = generate(pipe, **_kw(pipe))
    footprint = hook_footprint(pipe)
    with pytest.raises(accel.ConfigError, match="model_class"):
        accel.apply(make("sd3"), profile)
    original = pipe.scheduler
    spacing = "trailing" if original.config.timestep_spacing != "trailing" else "leading"
    pipe.scheduler = DDIMScheduler.from_config(original.config, timestep_spacing=spacing)
    with pytest.raises(accel.ConfigError, match="timestep_spacing"):
        accel.apply(pipe, profile)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
    with pytest.raises(accel.ConfigError, match="scheduler_class"):
        accel.apply(pipe, profile)
    multistep = profile.variant(scheduler_class="DPMSolverMultistepScheduler",
                                scheduler_config=scheduler_signature(pipe.scheduler), timesteps=[])
    with pytest.raises(accel.ConfigError, match="multistep"):
        accel.apply(pipe, multistep)
    accel.apply(pipe, multistep.variant(approximate_multistep=True))
    assert torch.isfinite(generate(pipe, **_kw(pipe))).all()
    accel.remove(pipe)
    pipe.scheduler = original
    assert hook_footprint(pipe) == footprint and torch.equal(generate(pipe, **_kw(pipe)), plain)
    accel.apply(pipe, profile)
    with pytest.raises(accel.ConfigError, match="num_steps=8 but the pipeline runs 6"):
        generate(pipe, **dict(_kw(pipe), num_inference_steps=6))
    size = pipe.tiny_call_kwargs["height"] * 2
    with pytest.raises(accel.ConfigError, match="force_resolution"):
        generate(pipe, **_kw(pipe, height=size, width=size))
    accel.remove(pipe)
    profile.save(tmp_path / "p.json")
    assert ERTACacheConfig.load(tmp_path / "p.json") == profile
    bad = profile.to_dict()
    bad["mask"] = "R" + bad["mask"][1:]
    with pytest.raises(accel.ConfigError, match="step 0 must compute"):
        ERTACacheConfig.from_dict(bad)
    bad = dict(profile.to_dict(), phi=[1.0] * 3)
    with pytest.raises(accel.ConfigError, match="phi"):
        ERTACacheConfig.from_dict(bad)


def test_cli_profile_writes_a_loadable_profile(tmp_path, capsys):
    from app.cli import main

    out = tmp_path / "tiny.json"
    assert main(["erta", "profile", "--model", "tiny", "--prompts", "2", "--steps", "6", "--target-speedup", "3",
                 "--out", str(out), "--quiet"]) == 0
    profile = ERTACacheConfig.load(out)
    assert profile.num_steps == 6 and profile.mask.count("R") == 4  # 6 * (1 - 1/3); steps 0 and 5 are forced
    assert "mask" in capsys.readouterr().out
