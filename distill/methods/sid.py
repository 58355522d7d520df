"""Score identity distillation (spec 2.7), on a DDPM-type teacher: the fake score is fitted to the
generator's samples, then the generator follows L_SiD with gradients flowing through the noised
sample into both frozen denoisers. Noise levels t ~ U{0..t_max} (t_max = 800)."""

from __future__ import annotations

import torch

from ..losses import sid_loss
from .base import Phase, Run, student_and_fake
from .dmd import fake_phase_loss

T_MAX = 800


def generator_phase_loss(run: Run, seed: int) -> tuple[torch.Tensor, dict]:
    emb, mask = run.conditions(seed + 10)
    x = run.generate(run.noise(seed + 11), emb, mask)
    t = run.timesteps(seed + 12, 0, T_MAX + 1)
    x_t, _, _ = run.noised(x, t, seed + 13)              # graph kept: d/dx flows through x_t
    real = run.real_x0(x_t, t, emb, mask, grad=True)
    fake = run.teacher.raw_x0(run.plain["fake"], x_t, t, emb, mask)
    return sid_loss(x, real, fake, alpha=run.config.sid_alpha)


def phases(config) -> list[Phase]:
    return [Phase("fake", ("fake",), fake_phase_loss, every=1),
            Phase("generator", ("generator",), generator_phase_loss, every=1, updates_generator=True)]


ROLES = ("generator", "fake")


def build(run: Run, pipe, config) -> dict:
    return student_and_fake(run, config)
