"""DMD2-style distribution matching (spec 2.1, 2.2, 2.6): a critic phase that fits the fake score to
the generator's samples every step, and a generator phase every ``ttur`` steps that follows
(fake - real) at a random noise level. No GAN head and no backward simulation in this version."""

from __future__ import annotations

import torch

from ..losses import dmd_loss, fake_score_loss
from .base import Phase, Run, parameterisation_weight, student_and_fake

T = 1000


def fake_phase_loss(run: Run, seed: int) -> tuple[torch.Tensor, dict]:
    emb, mask = run.conditions(seed)
    with torch.no_grad():
        x = run.generate(run.noise(seed + 1), emb, mask, run.plain["generator"])
    t = run.timesteps(seed + 2, 0, T)
    x_t, alpha, sigma = run.noised(x, t, seed + 3)
    fake_x0 = run.teacher.raw_x0(run.modules["fake"], x_t, t, emb, mask)
    weight = parameterisation_weight(run.teacher.prediction, alpha, sigma)
    return fake_score_loss(fake_x0, x, weight / weight.mean())


def generator_phase_loss(run: Run, seed: int) -> tuple[torch.Tensor, dict]:
    emb, mask = run.conditions(seed + 10)
    x = run.generate(run.noise(seed + 11), emb, mask)
    t = run.timesteps(seed + 12, int(0.02 * T), int(0.98 * T))
    x_t, _, _ = run.noised(x.detach(), t, seed + 13)
    with torch.no_grad():
        real = run.real_x0(x_t, t, emb, mask)
        fake = run.teacher.raw_x0(run.plain["fake"], x_t, t, emb, mask)
    loss, logs = dmd_loss(x, real, fake)
    logs.update(gen_mean=float(x.detach().mean()), gen_std=float(x.detach().std()))
    return loss, logs


def phases(config) -> list[Phase]:
    return [Phase("fake", ("fake",), fake_phase_loss, every=1),
            Phase("generator", ("generator",), generator_phase_loss, every=config.ttur, updates_generator=True)]


ROLES = ("generator", "fake")


def build(run: Run, pipe, config) -> dict:
    return student_and_fake(run, config)
