"""Train a reference model from its recipe: VAE, then latents, then text encoder + denoiser.

    >>> from pipelines.zoo.train import train
    >>> pipe_dir = train("shapes-t2i", work_dir="runs/shapes-t2i")   # resumes if interrupted

Every stage checkpoints atomically into `work_dir` and is skipped or resumed on the next call, so a
killed run continues where it stopped (losing at most `checkpoint_every` steps). Data order and
noise are drawn from generators seeded by the step number, so a resumed run follows the same
trajectory as an uninterrupted one. Weights are written as safetensors; the optimizer state is a
`torch.save` file read back with `weights_only=True`.

The denoiser is trained in the parameterisation its shipped scheduler integrates: v-prediction on
DDIM's zero-terminal-SNR schedule (PixArt), or rectified flow (target `noise - x0` at
`x_t = (1 - s) x0 + s noise`, `s` logit-normal) for the flow-matching Euler scheduler (Wan).
Captions are dropped 10 % of the time so classifier-free guidance works.

Training runs on `device` (default: CUDA when available, else the CPU). Random draws stay on the
CPU generators either way, so a GPU run sees the same data, noise and timesteps as a CPU run;
checkpoints are written from CPU copies and resume on either device.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .evaluate import parse_prompt
from .recipes import RECIPES, Recipe, assemble, build_components
from .shapes import BACKGROUND, CELLS, COLOURS, SHAPES, SIZES, caption, render_clip, render_image, sample_scenes


def _atomic_dir_write(target: Path, write) -> None:
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    write(tmp)
    old = target.with_name(target.name + ".old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        target.rename(old)
    tmp.rename(target)
    if old.exists():
        shutil.rmtree(old)


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(total - warmup, 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def _to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    """uint8 images (N, H, W, 3) -> (N, 3, H, W), or clips (N, T, H, W, 3) -> (N, 3, T, H, W), in [-1, 1]."""
    x = torch.from_numpy(np.stack(images)).float()
    x = x.permute(0, 3, 1, 2) if x.ndim == 4 else x.permute(0, 4, 1, 2, 3)
    return x / 127.5 - 1.0


def _render(r: Recipe, scene, frames: int | None = None) -> np.ndarray:
    if r.kind == "t2v":
        return render_clip(scene, frames or r.frames, r.image_size)
    return render_image(scene, r.image_size)


def _video(r: Recipe) -> bool:
    return r.kind == "t2v"


# --------------------------------------------------------------------------- stage 1: VAE

_BACKGROUND = torch.tensor(BACKGROUND, dtype=torch.float32) / 127.5 - 1.0


def _foreground(x: torch.Tensor) -> torch.Tensor:
    """1 where a pixel of `x` (N, 3, ...) in [-1, 1] differs from the background colour, else 0."""
    bg = _BACKGROUND.to(x.device).view(1, 3, *([1] * (x.ndim - 2)))
    return ((x - bg).abs().amax(1, keepdim=True) > 0.05).to(x.dtype)


def _cpu_state(module: torch.nn.Module) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def train_vae(r: Recipe, vae, work: Path, progress: bool = True, device="cpu"):
    """Train the autoencoder on training scenes (reconstruction L1 + MSE, object pixels weighted by
    `1 + vae_fg_weight`, a tiny pull on latent size)."""
    ckpt = work / "vae"
    if (ckpt / "done").exists():
        vae.load_state_dict(load_file(ckpt / "vae.safetensors"))
        return vae
    start = 0
    vae.to(device)
    opt = torch.optim.AdamW(vae.parameters(), lr=r.vae_lr, weight_decay=0.0)
    if (ckpt / "meta.json").exists():
        vae.load_state_dict(load_file(ckpt / "vae.safetensors"))
        opt.load_state_dict(torch.load(ckpt / "optim.pt", weights_only=True, map_location=device))
        start = json.loads((ckpt / "meta.json").read_text())["step"]
    vae.train()
    bar = tqdm(range(start, r.vae_steps), initial=start, total=r.vae_steps, desc=f"{r.name} vae",
               disable=not progress)
    for step in bar:
        rng = np.random.default_rng([r.seed, 1, step])
        scenes = sample_scenes("train", r.vae_batch, start=int(rng.integers(0, 10**6)), video=_video(r),
                               max_objects=r.max_objects)
        crops = []
        for s in scenes:
            img = _render(r, s, r.vae_frames)
            o = s.objects[0]
            # centre crops on an object half of the time (background is easy)
            cy = (o.cell[0] + 0.5) * r.image_size / 3 if rng.random() < 0.5 else rng.uniform(0, r.image_size)
            cx = (o.cell[1] + 0.5) * r.image_size / 3 if rng.random() < 0.5 else rng.uniform(0, r.image_size)
            y0 = int(np.clip(cy - r.vae_crop / 2 + rng.integers(-16, 17), 0, r.image_size - r.vae_crop))
            x0 = int(np.clip(cx - r.vae_crop / 2 + rng.integers(-16, 17), 0, r.image_size - r.vae_crop))
            crops.append(img[..., y0:y0 + r.vae_crop, x0:x0 + r.vae_crop, :])
        x = _to_tensor(crops).to(device)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, r.vae_steps, r.vae_lr, 50)
        post = vae.encode(x).latent_dist
        # decode the posterior mean: sampling with the initial unit variance drowns the latents in
        # noise and the decoder learns to ignore colour; the diffusion model is trained on the mean too
        rec = vae.decode(post.mode()).sample
        err = (rec - x).abs() + (rec - x).pow(2)
        if r.vae_fg_weight:
            # one small object covers a few percent of a clip: without weighting, a decoder that
            # paints only background reaches a low loss first and stays there for hundreds of steps
            err = err * (1 + r.vae_fg_weight * _foreground(x))
        loss = err.mean() + 1e-6 * post.mean.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % r.checkpoint_every == 0 or done == r.vae_steps:
            def write(d, done=done):
                save_file(_cpu_state(vae), d / "vae.safetensors")
                torch.save(opt.state_dict(), d / "optim.pt")
                (d / "meta.json").write_text(json.dumps({"step": done}))
                if done == r.vae_steps:
                    (d / "done").write_text("")
            _atomic_dir_write(ckpt, write)
    vae.to("cpu").eval()
    return vae


class VAECheckError(RuntimeError):
    """The trained VAE fails its recipe's read-back check (`Recipe.vae_min_colour`)."""


def vae_readback(r: Recipe, vae, n: int = 64) -> dict:
    """The evaluator's scores on the autoencoder's reconstructions of `n` calibration scenes (images).

    A VAE whose latents lost an attribute bounds every denoiser trained on them; this says so in
    minutes, before the hours of denoiser training. The calibration split is never trained on.
    """
    from .evaluate import score_images

    if _video(r):
        raise ValueError(f"{r.name}: vae_readback reads images; clips are not supported")
    scenes = sample_scenes("calibration", n, max_objects=r.max_objects)
    x = _to_tensor([_render(r, s) for s in scenes])
    device = next(vae.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, n, 8):
            batch = x[i:i + 8].to(device)
            out.append(vae.decode(vae.encode(batch).latent_dist.mode()).sample.cpu())
    images = ((torch.cat(out).clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1)    # the evaluator takes [0, 1] HWC
    return score_images(list(images), [caption(s) for s in scenes])


def check_vae(r: Recipe, vae, work: Path) -> dict | None:
    """Score the trained VAE's reconstructions (`vae_readback`) when the recipe sets `vae_min_colour`;
    writes `work/vae/readback.json` and raises if colour is read below that share."""
    if not r.vae_min_colour or _video(r):
        return None
    path = work / "vae" / "readback.json"
    if path.exists():                        # scored when the stage finished: a resumed run reuses it
        report = json.loads(path.read_text())
    else:
        report = vae_readback(r, vae)
        path.write_text(json.dumps(report, indent=1, default=str))
    colour = report["attributes"]["colour"]
    if colour < r.vae_min_colour:
        raise VAECheckError(
            f"{r.name}: the evaluator reads the colour of only {colour:.0%} of the objects in the VAE's "
            f"reconstructions of {report['n']} calibration scenes (the recipe asks {r.vae_min_colour:.0%}; scores in "
            f"{path}). Its latents lost colours, so no denoiser trained on them "
            f"can reach the targets; the denoiser stage is not run. Delete {work / 'vae'} and retrain "
            f"the VAE with a recipe that keeps them (for example a larger vae_fg_weight).")
    return report


# --------------------------------------------------------------------------- stage 2: latents

@torch.no_grad()
def encode_dataset(r: Recipe, vae, work: Path, progress: bool = True, device="cpu"):
    """Encode the training scenes once; returns (latents, captions) and sets the VAE scaling factor."""
    path = work / "latents.safetensors"
    scenes = sample_scenes("train", r.train_scenes, partial=r.partial_captions, video=_video(r),
                           max_objects=r.max_objects, count_weights=r.train_count_weights)
    captions = [caption(s) for s in scenes]
    if path.exists():
        lat = load_file(path)["latents"].float()
    else:
        vae.to(device).eval()
        chunks = []
        step = 4 if _video(r) else 32
        for i in tqdm(range(0, len(scenes), step), desc=f"{r.name} encode", disable=not progress):
            x = _to_tensor([_render(r, s) for s in scenes[i:i + step]]).to(device)
            chunks.append(vae.encode(x).latent_dist.mean.to(torch.float16).cpu())
        vae.to("cpu")
        lat = torch.cat(chunks)
        save_file({"latents": lat.contiguous()}, path)
        lat = lat.float()
    if _video(r):
        # Wan's pipeline decodes `z * std + mean` per channel
        dims = [0, 2, 3, 4]
        mean, std = lat.mean(dims), lat.std(dims)
        vae.register_to_config(latents_mean=mean.tolist(), latents_std=std.tolist())
        return (lat - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1), captions
    std = lat.std().item()
    vae.register_to_config(scaling_factor=1.0 / std)   # PixArt's pipeline decodes `z / scaling_factor`
    return lat / std, captions


# --------------------------------------------------------------------------- stage 3: denoiser

def _tokenize(tokenizer, texts, length):
    return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt")


# the auxiliary text head's targets: (attribute, its classes), in the order of the head's logits
ATTRIBUTES = (("colour", tuple(COLOURS)), ("shape", SHAPES), ("size", SIZES), ("position", CELLS))


def caption_labels(encoding, texts) -> torch.Tensor:
    """(batch, length, 4) class indices of the object each token's phrase describes, -100 where none.

    ``encoding`` is the tokenizer's batch output for ``texts`` (a fast tokenizer: its ``word_ids``
    map each token to its word). A word belongs to the phrase between two "and"s; its labels are that
    object's colour, shape, size and cell by the shapes grammar. "and", the end token, padding and
    attributes the caption leaves out are -100.
    """
    out = torch.full((*encoding["input_ids"].shape, len(ATTRIBUTES)), -100, dtype=torch.long)
    for b, text in enumerate(texts):
        if not text:
            continue
        objects, phrases, phrase = parse_prompt(text), [], 0
        for word in text.split():
            phrase += word == "and"
            phrases.append(None if word == "and" else phrase)
        for pos, w in enumerate(encoding.word_ids(b)):
            if w is None or phrases[w] is None:
                continue
            for a, (name, classes) in enumerate(ATTRIBUTES):
                value = objects[phrases[w]][name]
                if value is not None:
                    out[b, pos, a] = classes.index(value)
    return out


def text_aux_head(r: Recipe) -> torch.nn.Linear:
    """The training-only linear head of ``Recipe.text_aux_weight`` (seeded: resumes rebuild it alike)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(r.seed)
        return torch.nn.Linear(r.text_dim, sum(len(c) for _, c in ATTRIBUTES))


def text_aux_loss(head: torch.nn.Linear, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the head's reading of every labelled token, over the four attributes."""
    logits, start, total = head(emb), 0, emb.new_zeros(())
    labels = labels.to(emb.device)
    for a, (_, classes) in enumerate(ATTRIBUTES):
        part = logits[..., start:start + len(classes)]
        start += len(classes)
        if (labels[..., a] >= 0).any():
            total = total + F.cross_entropy(part.reshape(-1, len(classes)), labels[..., a].reshape(-1),
                                            ignore_index=-100)
    return total / len(ATTRIBUTES)


def denoiser_loss(r: Recipe, parts: dict, transformer, text_encoder, x0, texts, gen: torch.Generator,
                  aux_head: torch.nn.Linear | None = None):
    """Training loss of the denoiser in the parameterisation its shipped scheduler integrates
    (plus ``r.text_aux_weight`` times the text head's loss when ``aux_head`` is given)."""
    dev = x0.device
    encoding = _tokenize(parts["tokenizer"], texts, r.text_max_length)
    ids, mask = encoding.input_ids.to(dev), encoding.attention_mask.to(dev)
    emb = text_encoder(ids, attention_mask=mask).last_hidden_state
    aux = None
    if aux_head is not None:
        aux = text_aux_loss(aux_head, emb, caption_labels(encoding, texts))
    if _video(r):
        # WanPipeline zeroes the embeddings past each prompt and pads them to its max_sequence_length
        emb = emb * mask.unsqueeze(-1).to(emb.dtype)
        # (a negative pad cuts: WanPipeline truncates its prompts at that length too)
        emb = F.pad(emb, (0, 0, 0, (r.text_pad_length or _wan_text_length()) - emb.shape[1]))
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=gen).to(dev)          # drawn on the CPU: same on every device
    sched = parts["scheduler"]
    if sched.config.get("prediction_type") == "v_prediction":       # DDIM, v-prediction
        steps = sched.config.num_train_timesteps
        t = torch.randint(0, steps, (b,), generator=gen)
        if r.high_noise:
            high = torch.rand(b, generator=gen) < r.high_noise
            t = torch.where(high, torch.randint(steps // 2, steps, (b,), generator=gen), t)
        t = t.to(dev)
        xt = sched.add_noise(x0, noise, t)
        target = sched.get_velocity(x0, noise, t)
        timestep = t
    else:                                                          # rectified flow
        s = torch.sigmoid(torch.randn(b, generator=gen))
        if r.flow_uniform:
            # logit-normal levels rarely exceed 0.9, where sampling starts and the layout is decided
            uniform = torch.rand(b, generator=gen) < r.flow_uniform
            s = torch.where(uniform, torch.rand(b, generator=gen), s)
        s = (r.flow_shift * s / (1 + (r.flow_shift - 1) * s)).to(dev)
        sv = s.view(-1, *([1] * (x0.ndim - 1)))
        xt = (1 - sv) * x0 + sv * noise
        target = noise - x0
        timestep = s * sched.config.num_train_timesteps
    if _video(r):
        pred = transformer(xt, timestep=timestep, encoder_hidden_states=emb, return_dict=False)[0]
    else:
        pred = transformer(
            xt, encoder_hidden_states=emb, encoder_attention_mask=mask, timestep=timestep,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
        )[0]
    loss = F.mse_loss(pred, target)
    return loss if aux is None else loss + r.text_aux_weight * aux


def _wan_text_length() -> int:
    import inspect

    from diffusers import WanPipeline

    return inspect.signature(WanPipeline.__call__).parameters["max_sequence_length"].default


def _load_nets(nets: dict, ckpt: Path) -> None:
    """Load the trained networks from a denoiser checkpoint (keys are prefixed by the network's name)."""
    state = load_file(ckpt / "model.safetensors")
    for name, m in nets.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")})


def _ema_shadow(ckpt: Path, count: int) -> list[torch.Tensor]:
    """The EMA copies of the `count` trained parameters, in parameter order."""
    state = load_file(ckpt / "ema.safetensors")
    return [state[str(i)] for i in range(count)]


def _recipe(name_or_recipe) -> Recipe:
    return RECIPES[name_or_recipe] if isinstance(name_or_recipe, str) else name_or_recipe


def _trainables(parts, r: Recipe):
    nets = {"transformer": parts["transformer"], "text_encoder": parts["text_encoder"]}
    if r.text_aux_weight:
        nets["text_aux"] = text_aux_head(r)
    return nets


def train_denoiser(r: Recipe, parts: dict, latents, captions, work: Path, progress: bool = True,
                   stop_at: int | None = None, device="cpu") -> bool:
    """Train (or resume) the text encoder and denoiser; False when stopped early at `stop_at`."""
    from diffusers.training_utils import EMAModel

    nets = _trainables(parts, r)
    for m in nets.values():
        m.to(device)
    latents = latents.to(device)
    params = [p for m in nets.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=r.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = EMAModel(params, decay=r.ema_decay)
    ckpt = work / "denoiser"
    start = 0
    if (ckpt / "meta.json").exists():
        _load_nets(nets, ckpt)
        ema.shadow_params = [t.to(device) for t in _ema_shadow(ckpt, len(params))]
        opt.load_state_dict(torch.load(ckpt / "optim.pt", weights_only=True, map_location=device))
        meta = json.loads((ckpt / "meta.json").read_text())
        start, ema.optimization_step = meta["step"], meta["ema_step"]
    for m in nets.values():
        m.train()
    n = len(captions)
    bar = tqdm(range(start, r.steps), initial=start, total=r.steps, desc=f"{r.name} denoiser", disable=not progress)
    t0, losses = time.time(), []

    def draw(size: int, gen: torch.Generator):
        """`size` training indices and their captions, each dropped to "" with the dropout rate."""
        idx = torch.randint(0, n, (size,), generator=gen)
        drop = torch.rand(size, generator=gen) < r.caption_dropout
        return idx.to(device), ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist(), strict=True)]

    for step in bar:
        gen = torch.Generator().manual_seed(r.seed * 1_000_003 + step)
        idx, texts = draw(r.batch, gen)
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, r.steps, r.lr, r.warmup)
        loss = denoiser_loss(r, parts, nets["transformer"], nets["text_encoder"], latents[idx], texts, gen,
                             nets.get("text_aux"))
        if r.image_batch and _video(r):
            idx, texts = draw(r.image_batch, gen)
            # a later latent frame of each clip: the causal VAE's first one carries the object weakly
            # (its spread across clips is a fifth of the later frames'); objects stay in their cell
            t = latents.shape[2]
            frame = torch.randint(min(1, t - 1), t, (r.image_batch,), generator=gen).to(device)
            loss = loss + denoiser_loss(r, parts, nets["transformer"], nets["text_encoder"],
                                        latents[idx, :, frame].unsqueeze(2), texts, gen, nets.get("text_aux"))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step}; resume from the last checkpoint with a lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.step(params)
        losses.append(loss.item())
        if len(losses) % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", s_per_step=f"{(time.time() - t0) / len(losses):.2f}")
        done = step + 1
        if done % r.checkpoint_every == 0 or done == r.steps:
            def write(d, done=done):
                flat = {f"{name}.{k}": v.detach().cpu().clone().contiguous()   # clone: T5 ties two names
                        for name, m in nets.items() for k, v in m.state_dict().items()}
                save_file(flat, d / "model.safetensors")
                save_file({str(i): p.detach().cpu().contiguous() for i, p in enumerate(ema.shadow_params)},
                          d / "ema.safetensors")
                torch.save(opt.state_dict(), d / "optim.pt")
                (d / "meta.json").write_text(json.dumps({"step": done, "ema_step": ema.optimization_step,
                                                         "loss": float(np.mean(losses[-100:]))}))
            _atomic_dir_write(ckpt, write)
            with open(work / "log.jsonl", "a") as f:
                f.write(json.dumps({"step": done, "loss": float(np.mean(losses[-r.checkpoint_every:]))}) + "\n")
            if stop_at is not None and done >= stop_at and done < r.steps:
                return False
    ema.copy_to(params)           # export the averaged weights
    for m in nets.values():
        m.to("cpu").eval()
    return True


# --------------------------------------------------------------------------- driver

def run_recipe(work_dir) -> Recipe:
    """The recipe a run in `work_dir` was started with (its `recipe.json`)."""
    path = Path(work_dir) / "recipe.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {work_dir} is not the work dir of `accel zoo train`")
    return Recipe.from_dict(json.loads(path.read_text()))


def pipeline_from_checkpoint(name_or_recipe, work_dir, ema: bool = True):
    """The pipeline at the latest denoiser checkpoint of a (possibly unfinished) run, EMA weights by default.

    A run trained with a modified recipe needs that recipe: `run_recipe(work_dir)` reads it back."""
    r = _recipe(name_or_recipe)
    work = Path(work_dir)
    if not (work / "denoiser" / "meta.json").exists():
        raise FileNotFoundError(f"no denoiser checkpoint in {work}")
    parts = build_components(r)
    parts["vae"].load_state_dict(load_file(work / "vae" / "vae.safetensors"))
    encode_dataset(r, parts["vae"], work, progress=False)          # cached latents: sets the scaling
    nets = _trainables(parts, r)
    _load_nets(nets, work / "denoiser")
    if ema:
        params = [p for m in nets.values() for p in m.parameters()]
        with torch.no_grad():
            for p, shadow in zip(params, _ema_shadow(work / "denoiser", len(params)), strict=True):
                p.copy_(shadow)
    pipe = assemble(r, parts)
    for m in pipe.components.values():
        if isinstance(m, torch.nn.Module):
            m.eval().requires_grad_(False)
    return pipe


def train(name_or_recipe, work_dir, out_dir=None, progress: bool = True, threads: int | None = None,
          stop_at: int | None = None, device=None) -> Path | None:
    """Run (or resume) every stage and save a diffusers pipeline to `out_dir` (default `work_dir/pipeline`).

    `stop_at` stops the denoiser stage at the first checkpoint at or after that step (returns None);
    calling again resumes it. `device` defaults to CUDA when available; the saved pipeline is on the CPU.
    """
    r = _recipe(name_or_recipe)
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    work = Path(work_dir)
    work.mkdir(parents=True, exist_ok=True)
    (work / "recipe.json").write_text(json.dumps({k: v for k, v in vars(r).items()}, indent=1, default=list))
    parts = build_components(r)
    train_vae(r, parts["vae"], work, progress, device)
    parts["vae"].requires_grad_(False)
    check_vae(r, parts["vae"], work)
    latents, captions = encode_dataset(r, parts["vae"], work, progress, device)
    if not train_denoiser(r, parts, latents, captions, work, progress, stop_at, device):
        return None
    pipe = assemble(r, parts)
    out = Path(out_dir) if out_dir else work / "pipeline"
    _atomic_dir_write(out, lambda d: pipe.save_pretrained(d, safe_serialization=True))
    return out


def main(argv=None):
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("name", choices=sorted(RECIPES))
    ap.add_argument("--work-dir", required=True)
    ap.add_argument("--out")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("ACCEL_THREADS", "0")) or None)
    ap.add_argument("--stop-at", type=int, help="stop at the first checkpoint at or after this step")
    ap.add_argument("--device", help="cuda, cuda:1, cpu, ... (default: cuda when available)")
    a = ap.parse_args(argv)
    print(train(a.name, a.work_dir, a.out, threads=a.threads, stop_at=a.stop_at, device=a.device))


if __name__ == "__main__":
    main()
