"""Training the reference recipes (tiny versions), resuming, loading, evaluating and benchmarking."""

import functools
import json

import pytest
import torch
from safetensors.torch import load_file

from pipelines.zoo import is_shipped
from pipelines.zoo.recipes import tiny_recipe
from pipelines.zoo.train import train


def _weights(pipe_dir, component="transformer"):
    return load_file(next((pipe_dir / component).glob("*.safetensors")))


@pytest.fixture(scope="module")
def tiny_t2i(tmp_path_factory):
    work = tmp_path_factory.mktemp("t2i")
    return train(tiny_recipe("shapes-t2i").replace(steps=4), work, progress=False)


def test_tiny_t2i_trains_and_loads_with_default_call(tiny_t2i):
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(tiny_t2i)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.sample_size == 32
    assert pipe.vae.config.scaling_factor != 0.18215          # measured on the training latents
    assert pipe.scheduler.config.clip_sample is False
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (256, 256)                          # the default resolution: 32 x 8


def test_cli_zoo_export_saves_the_latest_checkpoint(tiny_t2i, tmp_path, capsys):
    # the run's own recipe (a tiny one, not the shipped shapes-t2i) rebuilds its components; at the
    # last step the EMA export holds exactly the weights the finished run saved, the raw one others
    from app.cli import main

    work = tiny_t2i.parent
    assert main(["zoo", "export", "shapes-t2i", "--work-dir", str(work), "--out", str(tmp_path / "ema")]) == 0
    assert "step 4 of 4 (ema weights)" in capsys.readouterr().out
    final, ema = _weights(tiny_t2i), _weights(tmp_path / "ema")
    assert final.keys() == ema.keys() and all(torch.equal(final[k], ema[k]) for k in final)
    assert main(["zoo", "export", "shapes-t2i", "--work-dir", str(work), "--no-ema"]) == 0
    raw = _weights(work / "exports" / "step4-raw")
    assert any(not torch.equal(final[k], raw[k]) for k in final)
    # not a run, a run of another model, an unknown model: exit 2 with a message, nothing written
    assert main(["zoo", "export", "shapes-t2i", "--work-dir", str(tmp_path / "none")]) == 2
    assert "recipe.json" in capsys.readouterr().err
    assert main(["zoo", "export", "shapes-t2v", "--work-dir", str(work), "--out", str(tmp_path / "x")]) == 2
    assert "shapes-t2i run, not shapes-t2v" in capsys.readouterr().err
    assert main(["zoo", "export", "dlm-tasks", "--work-dir", str(work), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def test_recipe_round_trips_through_its_json():
    from pipelines.zoo.recipes import RECIPES, Recipe

    for r in RECIPES.values():
        assert Recipe.from_dict(json.loads(json.dumps(vars(r), default=list))) == r
    with pytest.raises(ValueError, match="unknown fields \\['vae_size'\\]"):
        Recipe.from_dict({**vars(RECIPES["shapes-t2i"]), "vae_size": 3})


def test_resumed_training_matches_an_uninterrupted_run(tmp_path):
    recipe = tiny_recipe("shapes-t2i").replace(steps=4, checkpoint_every=2)
    straight = train(recipe, tmp_path / "a", progress=False)
    # interrupted at its first checkpoint, then resumed
    assert train(recipe, tmp_path / "b", progress=False, stop_at=2) is None
    meta = json.loads((tmp_path / "b" / "denoiser" / "meta.json").read_text())
    assert meta["step"] == 2
    resumed = train(recipe, tmp_path / "b", progress=False)
    for component in ("transformer", "text_encoder", "vae"):
        a, b = _weights(straight, component), _weights(resumed, component)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    other = _weights(train(recipe.replace(seed=1), tmp_path / "c", progress=False))
    assert any(not torch.equal(other[k], _weights(straight)[k]) for k in other)


def test_a_vae_that_loses_colours_stops_training_before_the_denoiser(tmp_path):
    # two VAE steps learn nothing: the colour check must stop the run with a clear error, before any
    # latents are encoded or denoiser steps taken, and keep its scores; a rerun says the same again
    recipe = tiny_recipe("shapes-t2i").replace(steps=2, vae_min_colour=0.95)
    for _ in range(2):
        with pytest.raises(RuntimeError, match=r"reads the colour of only \d+% .*asks 95%"):
            train(recipe, tmp_path, progress=False)
    assert not (tmp_path / "denoiser").exists()
    report = json.loads((tmp_path / "vae" / "readback.json").read_text())
    assert report["attributes"]["colour"] < 0.95 and report["n"] == 64


def test_cli_zoo_train_reports_a_failed_vae_check(tmp_path, capsys):
    # a finished VAE stage whose recorded read-back lost colours: the command exits 1 with the message
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from app.cli import main
    from pipelines.zoo import WEIGHTS

    vae = AutoencoderKL.from_pretrained(WEIGHTS / "shapes-t2i", subfolder="vae")
    (tmp_path / "vae").mkdir()
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, tmp_path / "vae" / "vae.safetensors")
    (tmp_path / "vae" / "done").write_text("")
    (tmp_path / "vae" / "readback.json").write_text(json.dumps({"n": 64, "attributes": {"colour": 0.33}}))
    assert main(["zoo", "train", "shapes-t2i", "--work-dir", str(tmp_path), "--device", "cpu", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "colour of only 33%" in err and "asks 95%" in err
    assert not (tmp_path / "denoiser").exists() and not (tmp_path / "pipeline").exists()


def test_shipped_shapes_t2i_vae_reads_back():
    # the shipped VAE keeps every attribute the evaluator reads (the check above passes on it)
    from diffusers import AutoencoderKL

    from pipelines.zoo import WEIGHTS
    from pipelines.zoo.recipes import RECIPES
    from pipelines.zoo.train import vae_readback

    assert is_shipped("shapes-t2i")
    vae = AutoencoderKL.from_pretrained(WEIGHTS / "shapes-t2i", subfolder="vae").eval()
    report = vae_readback(RECIPES["shapes-t2i"], vae, n=16)
    assert report["attributes"]["colour"] >= RECIPES["shapes-t2i"].vae_min_colour, report["attributes"]
    assert report["overall"] >= 0.95, report["attributes"]


def test_high_noise_share_draws_timesteps_from_the_upper_half():
    from pipelines.zoo.recipes import build_components
    from pipelines.zoo.train import denoiser_loss

    r = tiny_recipe("shapes-t2i")
    parts = build_components(r)
    seen = []
    add_noise = parts["scheduler"].add_noise
    parts["scheduler"].add_noise = lambda x, n, t: seen.append(t) or add_noise(x, n, t)
    x0 = torch.randn(64, r.latent_channels, 4, 4)
    for share in (0.0, 1.0):
        denoiser_loss(r.replace(high_noise=share), parts, parts["transformer"], parts["text_encoder"], x0,
                      ["a red circle"] * 64, torch.Generator().manual_seed(0))
    uniform, high = seen
    assert uniform.min() < 500 and high.min() >= 500


def test_caption_labels_follow_each_phrase():
    from pipelines.zoo.recipes import build_tokenizer
    from pipelines.zoo.train import caption_labels

    texts = ["a small blue square at the top left and a red circle", ""]
    labels = caption_labels(build_tokenizer()(texts, padding="max_length", max_length=14, return_tensors="pt"), texts)
    first = labels[0]
    # words 0-7 describe the blue square (colour 2, shape 1, size 0, cell (0, 0) = 0); "and" is unlabelled
    assert first[:8].tolist() == [[2, 1, 0, 0]] * 8
    assert first[8].tolist() == [-100] * 4
    # "a red circle": colour 0, shape 0, size and position unstated; then the end token and padding
    assert first[9:12].tolist() == [[0, 0, -100, -100]] * 3
    assert (first[12:] == -100).all() and (labels[1] == -100).all()


def test_text_aux_loss_teaches_the_encoder_and_is_dropped_from_the_pipeline(tmp_path):
    from pipelines.zoo.recipes import build_components
    from pipelines.zoo.train import caption_labels, pipeline_from_checkpoint, text_aux_head, text_aux_loss

    r = tiny_recipe("shapes-t2i").replace(text_aux_weight=1.0)
    parts = build_components(r)
    head, enc = text_aux_head(r), parts["text_encoder"]
    texts = ["a large green triangle at the bottom and a small cyan circle at the top right"] * 4
    ids = parts["tokenizer"](texts, padding="max_length", max_length=20, return_tensors="pt")
    labels = caption_labels(ids, texts)
    opt = torch.optim.Adam([*head.parameters(), *enc.parameters()], lr=1e-2)
    losses = []
    for _ in range(30):
        loss = text_aux_loss(head, enc(ids.input_ids, attention_mask=ids.attention_mask).last_hidden_state, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]
    # the head trains, checkpoints and resumes with the denoiser, and the exported pipeline has no trace of it
    recipe = r.replace(steps=4, checkpoint_every=2)
    straight = train(recipe, tmp_path / "a", progress=False)
    assert any(k.startswith("text_aux.") for k in load_file(tmp_path / "a" / "denoiser" / "model.safetensors"))
    assert train(recipe, tmp_path / "b", progress=False, stop_at=2) is None
    resumed = train(recipe, tmp_path / "b", progress=False)
    for component in ("transformer", "text_encoder"):
        a, b = _weights(straight, component), _weights(resumed, component)
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    plain = train(recipe.replace(text_aux_weight=0.0), tmp_path / "c", progress=False)
    assert any(not torch.equal(v, _weights(plain, "text_encoder")[k])
               for k, v in _weights(straight, "text_encoder").items())
    pipe = pipeline_from_checkpoint(recipe, tmp_path / "a")
    assert set(pipe.components) == {"tokenizer", "text_encoder", "vae", "transformer", "scheduler"}


def test_tiny_t2v_trains_and_generates(tmp_path):
    from diffusers import WanPipeline

    recipe = tiny_recipe("shapes-t2v").replace(frames=5, image_size=64, steps=2)
    out = train(recipe, tmp_path, progress=False)
    pipe = WanPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    video = pipe("a red circle moving left", num_inference_steps=2, height=64, width=64, num_frames=5,
                 generator=torch.Generator().manual_seed(0), output_type="np").frames
    assert video.shape == (1, 5, 64, 64, 3)
    assert len(pipe.vae.config.latents_std) == recipe.latent_channels


def test_eval_and_bench_report_evaluator_scores(tiny_t2i):
    from accel.bench import run_bench
    from pipelines.zoo import load_reference
    from pipelines.zoo.scoring import bench_scorers, evaluate_pipeline, heldout_prompts

    pipe = load_reference("shapes-t2i", path=tiny_t2i)
    report, outputs = evaluate_pipeline(pipe, "shapes-t2i", n=2, progress=False, num_inference_steps=2)
    assert report["n"] == 2 and len(outputs) == 2 and outputs[0].shape == (256, 256, 3)
    assert set(report["attributes"]) == {"colour", "shape", "size", "position"}
    assert report["frechet"] >= 0
    result = run_bench(pipe, [], heldout_prompts("shapes-t2i", 2), {"num_inference_steps": 2}, runs=1,
                       warmup=0, progress=False, scorers=bench_scorers("shapes-t2i"))
    row = result["rows"][0] if isinstance(result["rows"], list) else result["rows"]["baseline"]
    for key in ("evaluator_accuracy", "adherence", "frechet", "psnr"):
        assert key in row


def test_cli_zoo_eval_writes_report(tiny_t2i, tmp_path, capsys):
    from app.cli import main

    out = tmp_path / "zoo.json"
    assert main(["zoo", "eval", "shapes-t2i", "--path", str(tiny_t2i), "--n", "2", "--steps", "2",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert report["n"] == 2 and len(report["correct"]) == 2 and "hardware" in report
    assert "fully correct images" in out.with_suffix(".md").read_text()


def test_guidance_scan_reads_calibration_prompts_with_the_same_seeds_per_scale(tiny_t2i):
    from pipelines.zoo import load_reference
    from pipelines.zoo.scoring import calibration_prompts, heldout_prompts, scan_guidance

    pipe = load_reference("shapes-t2i", path=tiny_t2i)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    call = type(pipe).__call__

    @functools.wraps(call)          # keeps the signature: the scan reads the pipeline's default guidance from it
    def spy(self, prompt=None, **kw):
        seen.append((tuple(prompt), kw["guidance_scale"], tuple(g.initial_seed() for g in kw["generator"])))
        return call(self, prompt, **kw)

    type(pipe).__call__ = spy
    try:
        scan = scan_guidance(pipe, "shapes-t2i", [1.0, 3.0], n=3, batch=2, progress=False, num_inference_steps=2)
    finally:
        type(pipe).__call__ = call
    calib = calibration_prompts("shapes-t2i", 3)
    assert [p for chunk, _, _ in seen for p in chunk] == calib * 2
    assert calib != heldout_prompts("shapes-t2i", 3)
    assert [g for _, g, _ in seen] == [1.0, 1.0, 3.0, 3.0]
    assert [s for _, _, seeds in seen for s in seeds] == [1000, 1001, 1002] * 2     # same seeds per scale
    assert [r["guidance_scale"] for r in scan["rows"]] == [1.0, 3.0] and scan["default_guidance"] == 4.5
    for bad in ([], [0.5], [float("nan")]):
        with pytest.raises(ValueError, match="guidance scales"):
            scan_guidance(pipe, "shapes-t2i", bad, n=1)


def test_guidance_scan_choice(monkeypatch):
    """Highest adherence wins, then the fully-correct rate, then the scale nearest the pipeline's default."""
    from types import SimpleNamespace

    import numpy as np

    from pipelines.zoo import scoring

    class Fake:
        def __call__(self, prompt=None, guidance_scale: float = 4.5, generator=None, **kw):
            return SimpleNamespace(images=[np.full((8, 8, 3), int(guidance_scale), np.uint8)] * len(prompt))

    # (fully-correct rate, adherence) per scale
    for table, best in (({1: (0.9, 0.8), 2: (0.5, 0.95), 3: (0.6, 0.9)}, 2.0), ({1: (0.5, 0.9), 2: (0.6, 0.9)}, 2.0),
                        ({1: (0.5, 0.9), 2: (0.5, 0.9), 3: (0.5, 0.9)}, 3.0)):
        monkeypatch.setattr(scoring, "score_outputs", lambda name, outs, prompts, t=table: {
            "image_accuracy": t[int(outs[0][0, 0, 0])][0], "overall": t[int(outs[0][0, 0, 0])][1],
            "attributes": {}, "count": 1.0})
        assert scoring.scan_guidance(Fake(), "shapes-t2i", sorted(table), n=2, progress=False)["best"] == best


def test_cli_zoo_guidance_and_eval_guidance(tiny_t2i, tmp_path, capsys):
    from app.cli import main
    from pipelines.zoo.scoring import QUALITY_GUIDANCE

    out = tmp_path / "g.json"
    assert main(["zoo", "guidance", "shapes-t2i", "--path", str(tiny_t2i), "--n", "2", "--steps", "2",
                 "--scales", "1,2", "--out", str(out), "--quiet"]) == 0
    scan = json.loads(out.read_text())
    assert scan["split"] == "calibration" and scan["best"] in (1.0, 2.0) and len(scan["rows"]) == 2
    assert "(best)" in out.with_suffix(".md").read_text()
    assert main(["zoo", "guidance", "shapes-t2i", "--path", str(tiny_t2i), "--scales", "1,x"]) == 2
    assert main(["zoo", "guidance", "shapes-t2i", "--path", str(tiny_t2i), "--scales", "0.5"]) == 2
    assert main(["zoo", "guidance", "dlm-tasks"]) == 2
    assert main(["zoo", "eval", "dlm-tasks", "--guidance", "2"]) == 2
    assert main(["zoo", "eval", "shapes-t2i", "--path", str(tiny_t2i), "--guidance", "nan"]) == 2
    assert "guidance" in capsys.readouterr().err
    # eval reads quality at the model's chosen guidance unless told otherwise
    for extra, expected in (([], QUALITY_GUIDANCE["shapes-t2i"]), (["--guidance", "4.5"], 4.5)):
        rep = tmp_path / "e.json"
        assert main(["zoo", "eval", "shapes-t2i", "--path", str(tiny_t2i), "--n", "2", "--steps", "2",
                     "--out", str(rep), "--quiet", *extra]) == 0
        assert json.loads(rep.read_text())["call"]["guidance_scale"] == expected


def test_load_reference_errors():
    import pipelines
    from pipelines.zoo import load_reference

    for load in (load_reference, pipelines.load_reference):   # the package-level name is the same loader
        with pytest.raises(ValueError, match="unknown reference model"):
            load("shapes-xyz")


def test_shipped_weights_fit_the_budget():
    from pipelines.zoo import WEIGHTS

    total = sum(f.stat().st_size for f in WEIGHTS.rglob("*") if f.is_file())
    assert total <= 60 * 2**20, f"shipped reference weights take {total / 2**20:.1f} MB > 60 MB"


def test_shipped_shapes_t2i_default_call_and_adherence():
    from pipelines.zoo.scoring import QUALITY_GUIDANCE, evaluate_pipeline

    assert is_shipped("shapes-t2i"), "shapes-t2i weights are missing from pipelines/zoo/weights"
    import pipelines

    pipe = pipelines.load_reference("shapes-t2i")
    assert type(pipe).__name__ == "PixArtAlphaPipeline" and pipe.reference_name == "shapes-t2i"
    image = pipe("a red circle", generator=torch.Generator().manual_seed(0)).images[0]   # every default
    assert image.size == (256, 256)
    # the acceptance line on the fixed list of 20 held-out prompts (20 steps, the model's quality guidance,
    # chosen on calibration prompts): at least 16 fully correct. Shipped: 18 (12 at PixArt's default 4.5)
    report, _ = evaluate_pipeline(pipe, "shapes-t2i", n=20, progress=False,
                                  guidance_scale=QUALITY_GUIDANCE["shapes-t2i"])
    assert sum(report["correct"]) >= 16, (sum(report["correct"]), report["attributes"])
    assert report["overall"] >= 0.7, report["attributes"]      # chance is about 0.28; shipped: 0.974 on 200


@pytest.mark.skipif(not is_shipped("shapes-t2v"), reason="shapes-t2v is not trained and shipped yet")
def test_shipped_shapes_t2v_generates_and_adheres():
    from pipelines.zoo import load_reference
    from pipelines.zoo.scoring import evaluate_pipeline

    pipe = load_reference("shapes-t2v")
    assert type(pipe).__name__ == "WanPipeline"
    report, outputs = evaluate_pipeline(pipe, "shapes-t2v", n=8, progress=False)
    assert outputs[0].shape == (17, 128, 128, 3)
    # the 100-prompt figure is in benchmarks/results; this guards against a broken or swapped model
    assert report["overall"] >= 0.5, report["attributes"]      # chance is about 0.27; 0.525 as shipped
