"""The accelerate distillation trainer: phases, resume, rank sync, export, config errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill.trainer import DistillConfig, build_run, train
from pipelines.tiny import build_tiny

CAPTIONS = ["a red circle", "a blue square", "two green triangles", "a small yellow star"]
ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), steps=2, batch=2, ttur=1, checkpoint_every=2, max_sequence_length=16,
                guidance=2.0, lr_generator=1e-3, lr_fake=1e-3, log_every=1)
    return DistillConfig(**{**base, **kw})


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("method", ["dmd", "sid"])
def test_one_step_per_phase_updates_only_its_roles(tmp_path, method):
    pipe = build_tiny("pixart")
    teacher_before = _state(pipe.transformer)
    out = train(_config(tmp_path, method=method, steps=1), pipe, CAPTIONS, progress=False)
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {"fake/loss", "generator/loss"} <= set(logs[-1])
    assert all(torch.isfinite(torch.tensor(v)) for k, v in logs[-1].items() if k.endswith("loss"))
    gen = load_file(str(out / "transformer" / "diffusion_pytorch_model.safetensors"))
    changed = [k for k, v in gen.items() if not torch.equal(v, teacher_before[k])]
    assert changed                                             # the generator (EMA) moved off the teacher
    assert all(torch.equal(v, teacher_before[k]) for k, v in _state(pipe.transformer).items())   # teacher frozen


def test_export_reloads_and_samples_the_generator_in_one_step(tmp_path):
    from pipelines.one_step import OneStepPixArtPipeline

    pipe = build_tiny("pixart")
    out = train(_config(tmp_path, ema_decay=0.0), pipe, CAPTIONS, progress=False)
    loaded = OneStepPixArtPipeline.from_pretrained(out)
    loaded.set_progress_bar_config(disable=True)
    call = dict(height=16, width=16, use_resolution_binning=False, max_sequence_length=16, clean_caption=False)
    latents = loaded("a red circle", generator=torch.Generator().manual_seed(0), output_type="latent", **call).images
    # directly: G(z, c) = x0-prediction of the generator at t = 999 from the same noise
    run, _ = build_run(_config(tmp_path / "x"), build_tiny("pixart"), ["a red circle"], torch.device("cpu"))
    z = torch.randn(latents.shape, generator=torch.Generator().manual_seed(0))
    emb, mask, _, _ = loaded.encode_prompt("a red circle", do_classifier_free_guidance=False, max_sequence_length=16,
                                           clean_caption=False)
    with torch.no_grad():
        direct = run.teacher.raw_x0(loaded.transformer, z, torch.tensor([999]), emb, mask)
    # equal up to float rounding (DDIM's step and to_x0 order the same arithmetic differently)
    assert torch.allclose(latents, direct, rtol=1e-6, atol=1e-4) and direct.abs().max() > 1


def _run_script(args, nproc=None, env=None):
    cmd = [sys.executable, "-m", "distill.run", *args]
    if nproc:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "-m", "distill.run",
               *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    res = subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


ARGS = ["--teacher", "tiny", "--batch", "2", "--ttur", "2", "--checkpoint-every", "2", "--max-sequence-length", "16",
        "--lr-generator", "1e-3", "--lr-fake", "1e-3", "--quiet"]


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    _run_script(["dmd", "--output-dir", str(straight), "--steps", "4", "--export", "false", *ARGS])
    _run_script(["dmd", "--output-dir", str(split), "--steps", "2", "--export", "false", *ARGS])
    _run_script(["dmd", "--output-dir", str(split), "--steps", "4", "--resume", "latest", "--export", "false", *ARGS])
    a, b = straight / "checkpoint-4", split / "checkpoint-4"
    models = sorted(p.name for p in a.glob("model*.safetensors"))
    assert models == sorted(p.name for p in b.glob("model*.safetensors")) and len(models) == 2
    for name in models:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert all(torch.equal(x[k], y[k]) for k in x)
    # global RNG states differ (model construction draws from it) and are unused: batches are seeded per step
    states = sorted(p.name for p in a.glob("*.bin")) + sorted(p.name for p in a.glob("custom_checkpoint_*.pkl"))
    assert len(states) >= 3
    for name in states:
        x = torch.load(a / name, weights_only=False)
        y = torch.load(b / name, weights_only=False)
        assert repr(x) == repr(y), name                      # optimizer, scheduler and EMA state
    assert not list(split.glob("*.tmp")) and len(list(split.glob("checkpoint-*"))) == 2   # total limit 2
    # validation samples in one step at every checkpoint (grid image + record)
    assert [json.loads(x)["step"] for x in (straight / "validation.jsonl").read_text().splitlines()] == [2, 4]
    assert (straight / "validation-000004.png").stat().st_size > 0


def test_two_processes_stay_in_sync(tmp_path):
    _run_script(["dmd", "--output-dir", str(tmp_path), "--steps", "3", "--export", "false", *ARGS], nproc=2)
    sums = json.loads((tmp_path / "rank_checksums.json").read_text())
    assert len(sums) == 2 and sums[0] == sums[1]


def test_bad_configs_fail_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown distillation method 'gan'"):
        DistillConfig(method="gan")
    with pytest.raises(ValueError, match="fp16 training without gradient clipping"):
        DistillConfig(mixed_precision="fp16", max_grad_norm=None)
    with pytest.raises(ValueError, match="t_c"):
        DistillConfig(t_c=1000)
    flux = build_tiny("flux")
    with pytest.raises(ValueError, match="alphas_cumprod"):
        train(_config(tmp_path), flux, CAPTIONS, progress=False)
    assert not (tmp_path / "log.jsonl").exists()
    (tmp_path / "c.json").write_text(json.dumps({"steps": 3, "learning_rate": 1}))
    with pytest.raises(ValueError, match="unknown field.*learning_rate"):
        DistillConfig.load(tmp_path / "c.json")


def test_nct_adapter_starts_at_the_frozen_generator_and_trains(tmp_path):
    from distill.export import load_adapter

    pipe = build_tiny("pixart")              # stands in for an exported one-step generator
    frozen = _state(pipe.transformer)
    out = train(_config(tmp_path, method="nct", control="latent-sign", nct_lambda=0.5, steps=2, ema_decay=0.0,
                        lr_adapter=1e-2), pipe, CAPTIONS, progress=False)
    logs = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert logs[0]["adapter/nct_bound"] == 0.0            # zero-initialised projection: f_phi == f at step 1
    assert logs[0]["adapter/lambda"] == 0.5 and logs[1]["adapter/lambda"] == pytest.approx(0.5 - 1e-2 * 1e-3)
    assert logs[1]["adapter/nct_bound"] > 0               # the adapter moved
    assert all(torch.equal(v, frozen[k]) for k, v in _state(pipe.transformer).items())
    adapter, control = load_adapter(out)
    assert control == "latent-sign" and adapter.proj.weight.abs().sum() > 0
    depth = len(pipe.transformer.transformer_blocks)
    assert adapter.config["blocks"] == depth // 2 >= 1                   # ControlNet-style: the first half
    assert all(lin.weight.abs().sum() > 0 for lin in adapter.block_proj)   # block residuals trained too
    assert not list(dict(pipe.transformer.pos_embed._forward_hooks).values())   # hooks gone after training
    assert not any(b._forward_hooks for b in pipe.transformer.transformer_blocks)
    lam = torch.load(tmp_path / "checkpoint-2" / "custom_checkpoint_0.pkl", weights_only=False)
    assert lam["value"] == pytest.approx(logs[1]["adapter/lambda"] + 1e-2 * (logs[1]["adapter/nct_bound"] - 1e-3))


def test_control_adapter_injects_at_the_embedding_and_the_first_blocks(tmp_path):
    from distill.adapter import ControlAdapter
    from distill.export import export_adapter, load_adapter

    model = build_tiny("pixart").transformer.eval()
    depth = len(model.transformer_blocks)
    x = torch.randn(2, model.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 4, model.config.caption_channels, generator=torch.Generator().manual_seed(1))
    control = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)) > 0.5).float()

    def run(adapter=None):
        kw = dict(encoder_hidden_states=text, timestep=torch.tensor([999, 999]), return_dict=False)
        if adapter is None:
            return model(x, **kw)[0]
        with adapter.attached(model, control):
            return model(x, **kw)[0]

    base = run()
    adapter = ControlAdapter.for_model(model, control_channels=1, blocks=depth)
    assert torch.equal(run(adapter), base)                       # zero-initialised: the frozen model exactly
    with torch.no_grad():
        adapter.block_proj[-1].bias.fill_(0.1)                   # only the last block's residual is non-zero
    moved = run(adapter)
    assert not torch.equal(moved, base)
    assert torch.equal(run(), base)                              # hooks removed on exit
    export_adapter(adapter, tmp_path / "a", control="layout")
    loaded, _ = load_adapter(tmp_path / "a")
    assert loaded.config["blocks"] == depth and torch.equal(run(loaded), moved)
    with pytest.raises(ValueError, match="transformer blocks"):
        ControlAdapter.for_model(model, blocks=depth + 1)
    with pytest.raises(ValueError, match="nct_blocks"):
        DistillConfig(nct_blocks=-1)
    # adapters written before block injection (no "blocks" key) load as embedding-only
    old = tmp_path / "a" / "adapter_config.json"
    old.write_text(json.dumps({k: v for k, v in json.loads(old.read_text()).items() if k != "blocks"}))
    state = {k: v for k, v in load_file(str(tmp_path / "a" / "adapter.safetensors")).items() if "block_proj" not in k}
    from safetensors.torch import save_file
    save_file(state, str(tmp_path / "a" / "adapter.safetensors"))
    assert load_adapter(tmp_path / "a")[0].config["blocks"] == 0


def test_msd_students_own_their_captions_and_the_pipeline_routes(tmp_path):
    from distill.msd import train_students
    from pipelines.one_step import MultiStudentPipeline, OneStepPixArtPipeline
    from pipelines.routing import Router

    captions = ["a red circle", "a blue square", "a small green triangle", "a large red star",
                "two circles", "a square and a star"]
    out = train_students(_config(tmp_path, steps=1, ema_decay=0.0), build_tiny("pixart"), captions, 2,
                         ["circle", "square", "triangle", "star"], progress=False)
    router = Router.load(out / "router.json")
    routes = [router.route(c) for c in captions]
    assert sorted(routes) == [0, 0, 0, 1, 1, 1] and routes == [router.route(c) for c in captions]
    multi = MultiStudentPipeline.from_pretrained(out)
    multi.set_progress_bar_config(disable=True)
    call = dict(height=16, width=16, use_resolution_binning=False, max_sequence_length=16, clean_caption=False,
                output_type="pt")
    prompts = ["a blue square", "a red circle", "a small green triangle"]
    images = multi(prompts, generator=[torch.Generator().manual_seed(i) for i in range(3)], **call).images
    for i, p in enumerate(prompts):
        single = OneStepPixArtPipeline.from_pretrained(tmp_path / f"student-{router.route(p)}" / "pipeline")
        single.set_progress_bar_config(disable=True)
        want = single(p, generator=torch.Generator().manual_seed(i), **call).images[0]
        assert torch.allclose(images[i], want, atol=1e-6)
    a = OneStepPixArtPipeline.from_pretrained(tmp_path / "student-0" / "pipeline").transformer
    b = OneStepPixArtPipeline.from_pretrained(tmp_path / "student-1" / "pipeline").transformer
    assert any(not torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_dmd_with_gan_head_trains_head_and_logs_both_terms(tmp_path):
    pipe = build_tiny("pixart")
    real = torch.randn(len(CAPTIONS), 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="GAN head needs real samples"):
        train(_config(tmp_path / "a", gan_weight_g=0.1, gan_weight_d=0.1), pipe, CAPTIONS, progress=False)
    train(_config(tmp_path / "b", gan_weight_g=0.1, gan_weight_d=0.1, steps=2, export=False), pipe, CAPTIONS,
          progress=False, real_latents=real)
    logs = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert {"fake/gan_d", "fake/p_real", "generator/gan_g", "fake/grad_norm_head"} <= set(logs[-1])
    head = [p for p in (tmp_path / "b" / "checkpoint-2").glob("model_2.safetensors")]
    assert head and any(k.startswith("net.") for k in load_file(str(head[0])))


def test_regression_pairs_and_the_auxiliary_term(tmp_path):
    from distill.data import ConditionBank, teacher_pairs

    pipe = build_tiny("pixart")
    bank = ConditionBank.encode(pipe, CAPTIONS, max_sequence_length=16)
    call = {"max_sequence_length": 16, "clean_caption": False}
    z, y, idx = teacher_pairs(pipe, bank, 2, steps=3, guidance=2.0, progress=False, call=call)
    again = teacher_pairs(pipe, bank, 2, steps=3, guidance=2.0, progress=False, call=call)
    assert torch.equal(y, again[1]) and y.shape == z.shape          # deterministic (DDIM, eta 0)
    # the pair is the teacher's own sample from z: rerun the pipeline by hand
    direct = pipe(CAPTIONS[int(idx[0])], latents=z[:1], num_inference_steps=3, guidance_scale=2.0, output_type="latent",
                  height=16, width=16, use_resolution_binning=False, **call).images
    assert torch.allclose(direct, y[:1])
    with pytest.raises(ValueError, match="needs teacher pairs"):
        train(_config(tmp_path / "a", method="regression"), pipe, CAPTIONS, progress=False)
    train(_config(tmp_path / "b", method="regression", steps=12, export=False, pair_steps=2, checkpoint_every=12,
                  ema_decay=0.0), pipe, CAPTIONS, progress=False, pairs=2)
    train(_config(tmp_path / "c", steps=1, export=False, pair_steps=2, regression_weight=0.5), pipe, CAPTIONS,
          progress=False, pairs=4)
    logs_b = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    logs_c = [json.loads(line) for line in (tmp_path / "c" / "log.jsonl").read_text().splitlines()]
    assert logs_b[-1]["generator/regression"] < 0.9 * logs_b[0]["generator/regression"]   # fits the pairs
    assert "generator/regression" in logs_c[0] and "generator/dm_grad_norm" in logs_c[0]


def test_tsm_smaller_student_then_dmd_from_it_and_mismatch_refused(tmp_path):
    from diffusers import PixArtTransformer2DModel

    pipe = build_tiny("pixart")
    small = train(_config(tmp_path / "tsm", method="tsm", student_layers=1, steps=2, pair_steps=2, ema_decay=0.0),
                  pipe, CAPTIONS, progress=False, pairs=2)
    student = PixArtTransformer2DModel.from_pretrained(small / "transformer")
    assert student.config.num_layers == 1 and pipe.transformer.config.num_layers == 2
    logs = [json.loads(line) for line in (tmp_path / "tsm" / "log.jsonl").read_text().splitlines()]
    assert "generator/tsm_loss" in logs[-1]
    out = train(_config(tmp_path / "dmd", steps=1, init_generator=str(small), ema_decay=0.0), pipe, CAPTIONS,
                progress=False)
    assert PixArtTransformer2DModel.from_pretrained(out / "transformer").config.num_layers == 1
    other = build_tiny("pixart", sample_size=4).transformer
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="teacher/student mismatch: sample_size is 8 in the teacher and 4"):
        train(_config(tmp_path / "bad", init_generator=str(tmp_path / "other")), pipe, CAPTIONS, progress=False)
    assert not (tmp_path / "bad" / "log.jsonl").exists()
    with pytest.raises(ValueError, match="student_layers must be in"):
        train(_config(tmp_path / "bad2", method="tsm", student_layers=5, pair_steps=2), pipe, CAPTIONS,
              progress=False, pairs=1)


def test_one_step_bench_scores_and_times_a_student_against_its_teacher(tmp_path):
    from app.bench_distill import markdown, run
    from distill.export import export_one_step
    from pipelines.zoo import load_reference

    teacher = load_reference("shapes-t2i")
    export_one_step(teacher, teacher.transformer, tmp_path / "student")    # the teacher's net, sampled in one step
    result = run(f"one={tmp_path / 'student'}", n=2, runs=1, timing_prompts=1, progress=False)
    base, student = result["results"]
    assert (base["denoiser_calls"], student["denoiser_calls"]) == (20, 1)
    assert student["denoiser_speedup"] > 5 and student["speedup"] > 1
    assert 0 <= student["adherence"] <= 1 and base["adherence_vs_teacher"] == 1.0
    assert "| one | 1 |" in markdown(result)
    with pytest.raises(SystemExit, match="not found"):
        run(f"x={tmp_path / 'missing'}", n=1, runs=1, timing_prompts=1, progress=False)


def test_layout_scores_read_the_generated_layout_against_the_control():
    import dataclasses

    from app.bench_distill import layout_scores
    from pipelines.zoo.shapes import render_image, sample_scenes

    scenes = [s for s in sample_scenes("heldout", 40) if len(s.objects) == 2][:4]
    real = [render_image(s) for s in scenes]
    assert layout_scores(real, scenes) == {"exact": 1.0, "recall": 1.0, "precision": 1.0}
    # colours and shapes do not matter, only where the objects are
    recoloured = [dataclasses.replace(s, objects=tuple(dataclasses.replace(o, colour="cyan", shape="square")
                                                       for o in s.objects)) for s in scenes]
    assert layout_scores([render_image(s) for s in recoloured], scenes)["exact"] == 1.0
    # one object dropped from each image: half the control objects missing, no extra cells
    single = [dataclasses.replace(s, objects=s.objects[:1]) for s in scenes]
    assert layout_scores([render_image(s) for s in single], scenes) == {"exact": 0.0, "recall": 0.5,
                                                                          "precision": 1.0}
    blank = [render_image(dataclasses.replace(s, objects=())) for s in scenes]
    assert layout_scores(blank, scenes)["recall"] == 0.0


def test_control_bench_compares_the_adapted_student_with_the_plain_one(tmp_path):
    from app.bench_distill import control_markdown, run_control
    from distill.adapter import ControlAdapter
    from distill.export import export_adapter, export_one_step
    from pipelines.zoo import load_reference

    teacher = load_reference("shapes-t2i")
    export_one_step(teacher, teacher.transformer, tmp_path / "student")
    adapter = ControlAdapter.for_model(teacher.transformer, control_channels=1)     # zero-initialised
    export_adapter(adapter, tmp_path / "adapter", control="layout")
    result = run_control(str(tmp_path / "student"), str(tmp_path / "adapter"), n=2, batch=2, progress=False)
    plain, controlled = result["rows"]
    # a zero adapter changes nothing: both rows score the same images
    assert plain["attributes"] == controlled["attributes"] and result["caption_change_points"] == 0
    assert plain["caption_attributes"] == controlled["caption_attributes"]
    assert {"colour", "shape"} <= set(plain["caption_attributes"]) <= {"colour", "shape", "size"}  # no position
    assert 0 <= controlled["layout_agreement"] <= 1
    assert plain["layout"] == controlled["layout"]
    assert "| controlled student |" in control_markdown(result)
    export_adapter(adapter, tmp_path / "sign", control="latent-sign")
    with pytest.raises(SystemExit, match="layout adapters"):
        run_control(str(tmp_path / "student"), str(tmp_path / "sign"), n=1, progress=False)


def test_students_of_the_shapes_teacher_get_shapes_captions_and_free_text_is_refused():
    from caching.ecad_search import default_prompts
    from distill.run import _check_vocabulary, default_captions, speaks_shapes
    from pipelines.tiny import build_tiny
    from pipelines.zoo import load_reference

    teacher = load_reference("shapes-t2i")
    assert speaks_shapes(teacher) and not speaks_shapes(build_tiny("pixart"))
    # a folder teacher (an exported student) is recognised by its tokenizer
    placed = default_captions("runs/dmd/pipeline", 50, teacher)
    unplaced = default_captions("runs/dmd/pipeline", 50, teacher, unplaced=True)
    assert sum(" at the " in c for c in placed) > 30 and not any(" at the " in c for c in unplaced)
    assert all(" at the " in c for c in placed)                  # full captions unless asked otherwise
    partial = default_captions("shapes-t2i", 200, partial=0.5)
    assert 60 < sum(" at the " not in c for c in partial) < 140
    _check_vocabulary(teacher, placed)
    with pytest.raises(SystemExit, match="unknown to the teacher's tokenizer"):
        _check_vocabulary(teacher, default_prompts())
