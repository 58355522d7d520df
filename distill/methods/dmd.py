"""DMD2-style distribution matching (spec 2.1-2.3, 2.6): a critic phase that fits the fake score to
the generator's samples every step, and a generator phase every ``ttur`` steps that follows
(fake - real) at a random noise level. With ``gan_weight_g``/``gan_weight_d`` > 0, a diffusion-GAN
head on the fake network's middle-block features joins both phases (real samples: the bank's
latents). No backward simulation in this version (one-step students)."""

from __future__ import annotations

import torch

from ..gan import GanHead, tap
from ..losses import dmd_loss, fake_score_loss, gan_critic_loss, gan_generator_loss
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
    loss, logs = fake_score_loss(fake_x0, x, weight / weight.mean())
    if _gan(run.config):
        real, r_emb, r_mask = run.real_latents(seed + 4)
        logits_fake = _logits(run, x, emb, mask, seed + 5)
        logits_real = _logits(run, real, r_emb, r_mask, seed + 6)
        d_loss, d_logs = gan_critic_loss(logits_fake, logits_real)
        loss = loss + run.config.gan_weight_d * d_loss
        logs.update(d_logs)
    return loss, logs


def _gan(config) -> bool:
    return config.gan_weight_g > 0 or config.gan_weight_d > 0


def _logits(run: Run, x, emb, mask, seed: int) -> torch.Tensor:
    """Head logits of x re-noised at s ~ U{0..S-1}, read from the fake network's middle block."""
    s = run.timesteps(seed, 0, T)
    x_s, _, _ = run.noised(x, s, seed + 1)
    blocks = run.plain["fake"].transformer_blocks
    with tap(blocks[len(blocks) // 2]) as seen:
        run.teacher.raw_x0(run.modules["fake"], x_s, s, emb, mask)
    return run.modules["head"](seen[-1])


def generator_phase_loss(run: Run, seed: int) -> tuple[torch.Tensor, dict]:
    emb, mask = run.conditions(seed + 10)
    x = run.generate(run.noise(seed + 11), emb, mask)
    t = run.timesteps(seed + 12, int(0.02 * T), int(0.98 * T))
    x_t, _, _ = run.noised(x.detach(), t, seed + 13)
    with torch.no_grad():
        real = run.real_x0(x_t, t, emb, mask)
        fake = run.teacher.raw_x0(run.plain["fake"], x_t, t, emb, mask)
    loss, logs = dmd_loss(x, real, fake)
    if run.config.regression_weight > 0:       # DMD(1)'s auxiliary regression term on teacher pairs
        from .regression import pair_loss

        r_loss, r_logs = pair_loss(run, seed + 15)
        loss = loss + run.config.regression_weight * r_loss
        logs.update(r_logs)
    if _gan(run.config):
        g_loss, g_logs = gan_generator_loss(_logits(run, x, emb, mask, seed + 14))
        loss = loss + run.config.gan_weight_g * g_loss
        logs.update(g_logs)
    logs.update(gen_mean=float(x.detach().mean()), gen_std=float(x.detach().std()))
    return loss, logs


def phases(config) -> list[Phase]:
    critic = ("fake", "head") if _gan(config) else ("fake",)
    return [Phase("fake", critic, fake_phase_loss, every=1),
            Phase("generator", ("generator",), generator_phase_loss, every=config.ttur, updates_generator=True)]


ROLES = ("generator", "fake", "head")


def build(run: Run, pipe, config) -> dict:
    roles = student_and_fake(run, config)
    if config.regression_weight > 0 and run.bank.pairs is None:
        raise ValueError("regression_weight > 0 needs teacher pairs: pass --pairs N")
    if _gan(config):
        if run.bank.latents is None:
            raise ValueError("the GAN head needs real samples: give the condition bank latents (accel distill: "
                             "--real-latents N renders and encodes N training scenes of a shapes teacher)")
        cfg = run.teacher.model.config
        roles["head"] = GanHead(cfg.num_attention_heads * cfg.attention_head_dim)
    return roles
