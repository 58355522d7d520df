"""What a distillation method declares: its trainable roles and its phases.

A :class:`Phase` names the roles it trains, the optimizer it steps, how often it runs (two-time-scale
updates: DMD2's critic every step, its generator every ``ttur``), and a loss function of the
:class:`Run` context and a per-step seed. The trainer owns everything else (devices, precision,
clipping, checkpoints, EMA, logging).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..losses.common import to_x0
from ..roles import Teacher, alphas_sigmas


@dataclass
class Phase:
    name: str
    trains: tuple[str, ...]                 # role names whose parameters this phase updates
    loss: Callable[[Run, int], tuple[torch.Tensor, dict]]
    every: int = 1
    updates_generator: bool = False          # the EMA steps after this phase
    after: Callable[[Run, dict], None] | None = None   # e.g. NCT's dual update, after the optimizer step


@dataclass
class Run:
    """Everything a loss function may read. ``modules`` are the trainer's prepared (DDP-wrapped)
    trainable modules: every trainable forward must go through them (unwrapped copies desynchronise
    ranks); ``plain`` are the unwrapped ones for no-grad forwards."""

    teacher: Teacher
    bank: object
    config: object
    latent_shape: tuple[int, ...]
    device: torch.device
    modules: dict[str, torch.nn.Module] = field(default_factory=dict)
    plain: dict[str, torch.nn.Module] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    def gen(self, seed: int) -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    def conditions(self, seed: int):
        emb, mask, _ = self.bank.sample(self.config.batch, seed)
        return emb.to(self.device), mask.to(self.device)

    def real_latents(self, seed: int):
        lat, emb, mask = self.bank.sample_real(self.config.batch, seed)
        return lat.to(self.device), emb.to(self.device), mask.to(self.device)

    def noise(self, seed: int) -> torch.Tensor:
        return torch.randn((self.config.batch, *self.latent_shape), generator=self.gen(seed)).to(self.device)

    def generate(self, z, emb, mask, module: torch.nn.Module | None = None) -> torch.Tensor:
        """x = G(z, c): the generator's x0-prediction at the fixed time t_c from pure noise z."""
        module = module if module is not None else self.modules["generator"]
        t = torch.full((z.shape[0],), self.config.t_c, device=z.device, dtype=torch.long)
        return self.teacher.raw_x0(module, z, t, emb, mask)

    def noised(self, x, t, seed: int):
        alpha, sigma = alphas_sigmas(self.teacher.scheduler, t)
        shape = (-1,) + (1,) * (x.dim() - 1)
        eps = torch.randn(x.shape, generator=self.gen(seed)).to(x.device)
        return alpha.view(shape) * x + sigma.view(shape) * eps, alpha.view(shape), sigma.view(shape)

    def timesteps(self, seed: int, low: int, high: int) -> torch.Tensor:
        return torch.randint(low, high, (self.config.batch,), generator=self.gen(seed)).to(self.device)

    def real_x0(self, x_t, t, emb, mask, grad: bool = False) -> torch.Tensor:
        """Guided teacher x0-prediction (CFG on the real score only)."""
        w = self.config.guidance
        uncond, umask = self.bank.uncond
        uncond = uncond.to(x_t.device).expand(x_t.shape[0], -1, -1)
        umask = umask.to(x_t.device).expand(x_t.shape[0], -1)
        as_teacher = self.extra.get("as_teacher", contextlib.nullcontext)   # LoRA fake: adapters off
        with torch.set_grad_enabled(grad), as_teacher():
            cond = self.teacher.raw_x0(self.teacher.model, x_t, t, emb, mask)
            if w == 1.0:
                return cond
            base = self.teacher.raw_x0(self.teacher.model, x_t, t, uncond, umask)
            return base + w * (cond - base)


def student_and_fake(run: Run, config) -> dict:
    """Generator initialised from the teacher, fake score as a full copy or a LoRA on the teacher."""
    from ..roles import FakeScore, generator_from

    torch.manual_seed(config.seed)
    generator = generator_from(run.teacher) if not config.init_generator else load_student(run, config.init_generator)
    if config.fake == "lora":
        fake = FakeScore.lora_on(run.teacher, rank=config.lora_rank)
        run.extra["as_teacher"] = fake.as_teacher
        run.extra["lora_module"] = fake.module
    else:
        fake = FakeScore.copy_of(run.teacher)
    return {"generator": generator, "fake": fake.module}


def load_student(run: Run, path: str):
    """A generator from a diffusers model folder (e.g. a TSM-pretrained smaller student), checked against
    the teacher: same class, latent channels, sample size and text width, or a clear error."""
    from pathlib import Path

    teacher = run.teacher.model
    folder = Path(path)
    if (folder / "transformer").is_dir():
        folder = folder / "transformer"
    if not (folder / "config.json").exists():
        raise ValueError(f"init_generator {path!r}: no diffusers model folder (config.json) there")
    student = type(teacher).from_pretrained(folder).float().train()
    for key in ("in_channels", "out_channels", "sample_size", "patch_size", "caption_channels",
                "cross_attention_dim"):
        a, b = teacher.config.get(key), student.config.get(key)
        if a != b:
            raise ValueError(f"teacher/student mismatch: {key} is {a} in the teacher and {b} in {path}")
    return student.requires_grad_(True)


def parameterisation_weight(prediction: str, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per-sample weight turning ||D - x||^2 (x0 units) into the teacher's own output-space MSE:
    1/sigma^2 for v-prediction, alpha^2/sigma^2 for epsilon, 1 for x0 ("sample")."""
    a, s = alpha.flatten().float(), sigma.flatten().float().clamp_min(1e-3)
    if prediction == "v_prediction":
        return 1.0 / s**2
    if prediction == "epsilon":
        return (a / s) ** 2
    return torch.ones_like(a)


__all__ = ["Phase", "Run", "parameterisation_weight", "to_x0"]
