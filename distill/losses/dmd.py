"""DMD2: distribution matching, the fake-score (critic) loss, the diffusion-GAN head losses, and
teacher score matching (MSD's pretraining of smaller students). Spec ``distill.md`` 2.1-2.3, 2.9."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import per_sample_mean_abs


def dmd_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """L_DM = 1/2 mean ||x - sg(x - g)||^2 with g = (D_f - D_r^w) / mean_i |x - D_r^w|.

    ``real_x0`` (guided teacher) and ``fake_x0`` are x0-predictions at the noised ``x``; they are
    treated as constants. dL/dx = g / numel, so a step moves x against (fake - real)."""
    with torch.no_grad():
        real, fake = real_x0.float(), fake_x0.float()
        norm = per_sample_mean_abs(x.float() - real).clamp_min(1e-12)
        grad = torch.nan_to_num((fake - real) / norm)
        target = x.float() - grad
    loss = 0.5 * F.mse_loss(x.float(), target, reduction="mean")
    return loss, {"dm_grad_norm": float(grad.norm()), "real_fake_gap": float((real - fake).abs().mean())}


def fake_score_loss(fake_x0: torch.Tensor, x_clean: torch.Tensor,
                    weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Denoising score matching for the fake score on generator samples (x0 units):
    mean weight * ||D_f(x_t) - sg(x)||^2."""
    err = (fake_x0.float() - x_clean.detach().float()).pow(2).flatten(1).mean(1)
    if weight is not None:
        err = err * weight.float().flatten()
    loss = err.mean()
    return loss, {"fake_loss": float(loss.detach())}


def gan_generator_loss(logits_fake: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """L_G = mean softplus(-h(x_gen))."""
    loss = F.softplus(-logits_fake.float()).mean()
    return loss, {"gan_g": float(loss.detach())}


def gan_critic_loss(logits_fake: torch.Tensor, logits_real: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """L_D = mean softplus(h(sg x_gen)) + mean softplus(-h(x_real)) (compute ``logits_fake`` on
    detached generator samples)."""
    fake, real = logits_fake.float(), logits_real.float()
    loss = F.softplus(fake).mean() + F.softplus(-real).mean()
    return loss, {"gan_d": float(loss.detach()), "p_real": float(torch.sigmoid(real.detach()).mean()),
                  "p_fake": float(torch.sigmoid(fake.detach()).mean())}


def teacher_score_matching_loss(student_x0: torch.Tensor, teacher_x0: torch.Tensor,
                                weight: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """L_TSM = E_t[lambda_t ||mu_student(x_t, t) - sg mu_teacher(x_t, t)||^2] (x0-predictions)."""
    err = (student_x0.float() - teacher_x0.detach().float()).pow(2).flatten(1).mean(1)
    if weight is not None:
        err = err * weight.float().flatten()
    loss = err.mean()
    return loss, {"tsm_loss": float(loss.detach())}
