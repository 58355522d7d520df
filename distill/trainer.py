"""One accelerate trainer for every distillation method.

    >>> from distill.trainer import DistillConfig, train
    >>> from pipelines.tiny import build_tiny
    >>> cfg = DistillConfig(method="dmd", output_dir="/tmp/dmd-demo", steps=2, batch=2, checkpoint_every=1)
    >>> train(cfg, build_tiny("pixart"), captions=["a red circle", "a blue square"])   # doctest: +SKIP

The same function runs under ``accelerate launch`` / ``torchrun`` (DDP on GPUs, gloo on CPU).
Per step it runs each due phase of the method: only that phase's roles train (``requires_grad`` and
train mode are toggled), the forward runs under accelerate's autocast, a non-finite loss skips the
step (gradients zeroed, counted; the run aborts after ``max_nan_skips`` in a row), gradients are
clipped, and the generator's EMA (diffusers ``EMAModel``) steps after generator updates. Batches
are pure functions of (seed, step, rank), so a resumed run continues bit-identically.

Checkpoints: ``accelerator.save_state`` into ``output_dir/checkpoint-N`` (written as
``checkpoint-N.tmp`` then renamed, so a kill never leaves a half checkpoint), at most
``checkpoints_total_limit`` kept; ``resume="latest"`` or a folder continues from one. Logs:
``output_dir/log.jsonl`` (per-phase losses, gradient norms, NaN skips, images/s) and tensorboard
when it is installed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from . import methods
from .data import ConditionBank
from .methods.base import Run
from .roles import Teacher


@dataclass
class DistillConfig:
    """Args:
        method: ``dmd``, ``sid``, ``regression``, ``tsm`` or ``nct`` (the teacher of ``nct`` is an exported
            one-step pipeline).
        student_layers: ``tsm``'s smaller student depth; init_generator: a model folder the ``dmd``/
            ``sid`` generator starts from (checked against the teacher) instead of the teacher's weights.
        regression_weight / huber_c / pair_steps: DMD's auxiliary regression on teacher pairs
            (``pairs`` in :func:`train`), pseudo-Huber constant, teacher sampler steps.
        output_dir: checkpoints, logs and the exported pipeline go here.
        steps / batch: optimisation steps and per-process batch size.
        lr_generator / lr_fake: AdamW learning rates (constant after ``warmup`` steps).
        ttur: DMD2's generator update every ``ttur`` steps (the critic updates every step).
        guidance: classifier-free guidance scale of the real (teacher) score.
        t_c: the generator's fixed timestep (the teacher's last training timestep by default).
        fake: ``"copy"`` (a full trainable copy) or ``"lora"`` (a peft LoRA on the teacher).
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"`` (fp16 needs ``max_grad_norm``).
        max_grad_norm: gradient clipping (None: off).
        ema_decay: decay of the generator's EMA (0: no EMA).
        checkpoint_every / checkpoints_total_limit / resume: see the module docstring.
        max_nan_skips: consecutive non-finite steps tolerated before aborting.
        export: write the one-step pipeline to ``output_dir/pipeline`` (NCT: the adapter to
            ``output_dir/adapter``) at the end.
        gan_weight_g / gan_weight_d: DMD2's diffusion-GAN terms (0: no head); need ``real_latents``
            paired with ``captions`` in :func:`train`.
        lr_adapter / control / nct_*: NCT's adapter learning rate, control extractor (``layout`` or
            ``latent-sign``), level count N, constraint xi, dual step eta, initial lambda, distance, and
            how many transformer blocks get an adapter residual besides the patch embedding
            (None: half the depth; 0: the patch embedding only).
    """

    method: str = "dmd"
    output_dir: str = "runs/distill"
    steps: int = 1000
    batch: int = 8
    lr_generator: float = 1e-5
    lr_fake: float = 1e-5
    warmup: int = 0
    ttur: int = 5
    guidance: float = 3.0
    t_c: int = 999
    fake: str = "copy"
    lora_rank: int = 16
    sid_alpha: float = 1.2
    gan_weight_g: float = 0.0
    regression_weight: float = 0.0
    student_layers: int | None = None
    init_generator: str | None = None
    huber_c: float = 0.03
    pair_steps: int = 20
    gan_weight_d: float = 0.0
    lr_adapter: float = 1e-4
    control: str = "layout"
    nct_levels: int = 20
    nct_xi: float = 1e-3
    nct_eta: float = 1e-2
    nct_lambda: float = 0.0
    nct_distance: str = "l2"
    nct_blocks: int | None = None
    mixed_precision: str = "no"
    max_grad_norm: float | None = 10.0
    ema_decay: float = 0.999
    checkpoint_every: int = 250
    checkpoints_total_limit: int = 2
    resume: str | None = None
    log_every: int = 10
    max_nan_skips: int = 20
    seed: int = 0
    max_sequence_length: int = 40
    export: bool = True

    def __post_init__(self):
        methods.get(self.method)
        if self.fake not in ("copy", "lora"):
            raise ValueError(f"fake must be 'copy' or 'lora', got {self.fake!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        if self.mixed_precision == "fp16" and not self.max_grad_norm:
            raise ValueError("fp16 training without gradient clipping diverges (DMD2, SiD-LSG reports): "
                             "set max_grad_norm or use bf16")
        for name in ("steps", "batch", "ttur", "checkpoint_every", "checkpoints_total_limit", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not 0 <= self.t_c < 1000:
            raise ValueError(f"t_c must be a timestep in [0, 1000), got {self.t_c}")
        if self.nct_blocks is not None and (not isinstance(self.nct_blocks, int) or self.nct_blocks < 0):
            raise ValueError(f"nct_blocks must be a non-negative integer or None, got {self.nct_blocks!r}")

    @classmethod
    def load(cls, path: str | os.PathLike, **overrides) -> DistillConfig:
        data = json.loads(Path(path).read_text())
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{path}: unknown field(s) {', '.join(unknown)}; expected some of {sorted(names)}")
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})


def check_teacher(pipe, config: DistillConfig) -> None:
    """Fail before training on what would break it later."""
    sched = pipe.scheduler
    if not hasattr(sched, "alphas_cumprod"):
        raise ValueError(f"the teacher's scheduler {type(sched).__name__} has no alphas_cumprod; the trainers need a "
                         "DDPM/DDIM-type scheduler")
    if sched.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"unsupported teacher prediction type {sched.config.prediction_type!r}")
    if config.t_c >= sched.config.num_train_timesteps:
        raise ValueError(f"t_c {config.t_c} is outside the teacher's {sched.config.num_train_timesteps} timesteps")
    if not hasattr(pipe, "encode_prompt") or not hasattr(pipe, "transformer"):
        raise ValueError(f"{type(pipe).__name__} is not a text-to-image transformer pipeline")


def _latest(output: Path) -> Path | None:
    found = sorted((p for p in output.glob("checkpoint-*") if p.suffix != ".tmp"),
                   key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def _save(accelerator, output: Path, step: int, limit: int) -> None:
    final = output / f"checkpoint-{step}"
    tmp = output / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "step.json").write_text(json.dumps({"step": step}))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        kept = sorted((p for p in output.glob("checkpoint-*") if p.suffix != ".tmp"),
                      key=lambda p: int(p.name.split("-")[1]))
        for old in kept[:-limit]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()


def build_run(config: DistillConfig, pipe, captions: list[str], device,
              real_latents: torch.Tensor | None = None, pairs: int = 0, progress: bool = False) -> tuple[Run, dict]:
    """(run context, trainable role modules) for ``config`` on the teacher ``pipe``."""
    check_teacher(pipe, config)
    method = methods.get(config.method)
    teacher = Teacher(pipe.transformer, pipe.scheduler, guidance_scale=config.guidance)
    bank = ConditionBank.encode(pipe, captions, max_sequence_length=config.max_sequence_length,
                                latents=real_latents)
    if pairs:
        from .data import teacher_pairs

        bank.pairs = teacher_pairs(pipe, bank, pairs, steps=config.pair_steps, guidance=config.guidance,
                                   seed=config.seed, progress=progress,
                                   call={"max_sequence_length": config.max_sequence_length, "clean_caption": False})
    cfg = pipe.transformer.config
    latent = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    run = Run(teacher, bank, config, latent, device)
    roles = method.build(run, pipe, config)
    return run, roles


def _trainable(run: Run, module: torch.nn.Module) -> list[torch.nn.Parameter]:
    if module is run.extra.get("lora_module"):
        return [p for n, p in module.named_parameters() if "lora_" in n]
    return list(module.parameters())


def train(config: DistillConfig, pipe, captions: list[str], progress: bool = True,
          validate=None, real_latents: torch.Tensor | None = None, pairs: int = 0) -> Path | None:
    """Train; returns the exported pipeline folder (or None when ``export`` is off)."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    output = Path(config.output_dir)
    try:
        import tensorboard  # noqa: F401
        log_with = "tensorboard"
    except ImportError:
        log_with = None
    # cpu=True lets torchrun/accelerate launch start gloo process groups on machines without a GPU
    accelerator = Accelerator(mixed_precision=config.mixed_precision, log_with=log_with,
                              cpu=not torch.cuda.is_available(),
                              project_config=ProjectConfiguration(project_dir=str(output)))
    method = methods.get(config.method)
    run, roles = build_run(config, pipe, captions, accelerator.device, real_latents, pairs,
                           progress and accelerator.is_main_process)
    run.teacher.model.to(accelerator.device)
    for name in ("vae", "text_encoder"):            # NCT's control decode and validation run next to the generator
        if getattr(pipe, name, None) is not None:
            getattr(pipe, name).to(accelerator.device)
    names = list(roles)
    lrs = {"generator": config.lr_generator, "fake": config.lr_fake, "adapter": config.lr_adapter,
           "head": config.lr_fake}
    opts = {n: torch.optim.AdamW(_trainable(run, roles[n]), lr=lrs[n], betas=(0.9, 0.999), weight_decay=0.01)
            for n in names}
    scheds = {n: torch.optim.lr_scheduler.LambdaLR(opts[n], lambda s: min(1.0, (s + 1) / max(1, config.warmup)))
              for n in names}
    prepared = accelerator.prepare(*[roles[n] for n in names], *[opts[n] for n in names],
                                   *[scheds[n] for n in names])
    k = len(names)
    run.modules = dict(zip(names, prepared[:k]))
    opts = dict(zip(names, prepared[k:2 * k]))
    scheds = dict(zip(names, prepared[2 * k:]))
    run.plain = {n: accelerator.unwrap_model(m) for n, m in run.modules.items()}
    ema_role = "generator" if "generator" in names else names[0]
    ema = None
    if config.ema_decay > 0:
        ema = EMAModel(run.plain[ema_role].parameters(), decay=config.ema_decay)
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    for obj in run.extra.get("checkpoint", []):      # e.g. NCT's multiplier
        accelerator.register_for_checkpointing(obj)

    start = 0
    if config.resume:
        src = _latest(output) if config.resume == "latest" else Path(config.resume)
        if src is not None:
            accelerator.load_state(str(src))
            start = json.loads((src / "step.json").read_text())["step"]
        elif config.resume != "latest":
            raise FileNotFoundError(f"resume: no checkpoint at {config.resume}")
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        (output / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    if log_with:
        accelerator.init_trackers("distill")
    log = open(output / "log.jsonl", "a") if accelerator.is_main_process else None  # noqa: SIM115
    phases = method.phases(config)
    skips = 0
    bar = tqdm(total=config.steps, initial=start, desc=f"distill {config.method}",
               disable=not (progress and accelerator.is_main_process))
    t0, done = time.time(), 0
    # each phase's latest values: phases that run every k steps still show at every log step
    logs: dict = {}
    try:
        for step in range(start, config.steps):
            seed = (config.seed * 1_000_003 + step) * 1_009 + accelerator.process_index * 7_919
            logs.pop("nan_skip", None)
            for p_i, phase in enumerate(phases):
                if step % phase.every:
                    continue
                for n in names:
                    active = n in phase.trains
                    run.plain[n].train(active)
                    for param in _trainable(run, run.plain[n]):
                        param.requires_grad_(active)
                with accelerator.autocast():
                    loss, phase_logs = phase.loss(run, seed * 16 + p_i * 101)
                finite = bool(torch.isfinite(loss.detach()).all())
                # every rank must agree on skipping, or DDP's collectives would hang
                finite = bool(accelerator.reduce(torch.tensor(float(finite), device=accelerator.device),
                                                 reduction="mean") == 1.0)
                if not finite:
                    for n in phase.trains:
                        opts[n].zero_grad(set_to_none=True)
                    skips += 1
                    logs["nan_skip"] = phase.name
                    if skips >= config.max_nan_skips:
                        raise FloatingPointError(f"{skips} consecutive non-finite losses in phase {phase.name!r} "
                                                 f"at step {step}; lower the learning rate or use bf16/fp32")
                    continue
                skips = 0
                accelerator.backward(loss)
                for n in phase.trains:
                    params = _trainable(run, run.plain[n])
                    if config.max_grad_norm:
                        norm = accelerator.clip_grad_norm_(params, config.max_grad_norm)
                    else:
                        norm = torch.sqrt(sum(p.grad.float().pow(2).sum() for p in params if p.grad is not None))
                    logs[f"{phase.name}/grad_norm_{n}"] = float(norm)
                    opts[n].step()
                    scheds[n].step()
                for o in opts.values():          # gradients of one phase never leak into the next
                    o.zero_grad(set_to_none=True)
                if phase.after is not None:
                    phase.after(run, logs)
                if ema is not None and (phase.updates_generator or ema_role in phase.trains):
                    ema.step(run.plain[ema_role].parameters())
                logs[f"{phase.name}/loss"] = float(loss.detach())
                logs.update({f"{phase.name}/{key}": v for key, v in phase_logs.items()})
            done += 1
            bar.update()
            if (step + 1) % config.log_every == 0 or step + 1 == config.steps:
                logs["images_per_s"] = done * config.batch * accelerator.num_processes / (time.time() - t0)
                if log is not None:
                    log.write(json.dumps({"step": step + 1, **logs}) + "\n")
                    log.flush()
                if log_with:
                    accelerator.log(logs, step=step + 1)
            if (step + 1) % config.checkpoint_every == 0 or step + 1 == config.steps:
                _save(accelerator, output, step + 1, config.checkpoints_total_limit)
                if validate is not None and accelerator.is_main_process:
                    validate(run, step + 1)
    finally:
        bar.close()
        if log is not None:
            log.close()
    accelerator.wait_for_everyone()
    # ranks must hold the same generator: record every rank's parameter checksum
    sums = accelerator.gather(torch.tensor([parameter_checksum(run.plain[ema_role])], dtype=torch.float64,
                                           device=accelerator.device))
    if accelerator.is_main_process:
        (output / "rank_checksums.json").write_text(json.dumps(sums.cpu().tolist()))
    if log_with:
        accelerator.end_training()
    if not config.export or not accelerator.is_main_process:
        return None
    from .export import export_adapter, export_one_step

    trained = run.plain[ema_role]
    if ema is not None:
        ema.store(trained.parameters())
        ema.copy_to(trained.parameters())
    try:
        if ema_role == "adapter":
            return export_adapter(trained, output / "adapter", control=config.control)
        return export_one_step(pipe, trained, output / "pipeline", t_c=config.t_c)
    finally:
        if ema is not None:
            ema.restore(trained.parameters())


def parameter_checksum(module: torch.nn.Module) -> float:
    """A scalar fingerprint of a module's parameters (for rank-sync checks)."""
    return math.fsum(float(p.detach().double().sum()) for p in module.parameters())
