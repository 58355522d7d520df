"""Regression pretraining (spec 2.4): the generator learns the teacher's deterministic map from noise
to sample, G(z, c) ~ y, on pairs made once by the teacher's ODE sampler. LPIPS weights cannot be
downloaded here, so the distance is pseudo-Huber in latent space. Also available as an auxiliary term
of ``dmd`` (``regression_weight``)."""

from __future__ import annotations

import torch

from ..losses import pseudo_huber
from .base import Phase, Run

ROLES = ("generator",)


def pair_loss(run: Run, seed: int) -> tuple[torch.Tensor, dict]:
    z_all, y_all, idx_all = run.bank.pairs
    pick = torch.randint(len(z_all), (run.config.batch,), generator=run.gen(seed))
    z, y = z_all[pick].to(run.device), y_all[pick].to(run.device)
    emb, mask = run.bank.embeds[idx_all[pick]].to(run.device), run.bank.masks[idx_all[pick]].to(run.device)
    x = run.generate(z, emb, mask)
    loss = pseudo_huber(x, y, run.config.huber_c).mean()
    return loss, {"regression": float(loss.detach())}


def build(run: Run, pipe, config) -> dict:
    from ..roles import generator_from

    if run.bank.pairs is None:
        raise ValueError("regression needs teacher pairs: pass --pairs N (made once by the teacher's sampler)")
    torch.manual_seed(config.seed)
    return {"generator": generator_from(run.teacher)}


def phases(config) -> list[Phase]:
    return [Phase("generator", ("generator",), pair_loss, every=1, updates_generator=True)]
