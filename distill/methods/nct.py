"""Noise-consistency training of a control adapter on a frozen one-step generator (spec 2.10).

The "teacher" pipeline of this method is the distilled one-step pipeline itself: its transformer is
the frozen generator f, the only trainable role is the :class:`~distill.adapter.ControlAdapter`.
No real images and no diffusion teacher: each step draws z, makes x = f(z, text), extracts the
control c = h(x), and trains the adapter on L_con + lambda L_bound; lambda follows projected dual
ascent on L_bound <= xi after every step (and is checkpointed).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..adapter import ControlAdapter
from ..losses import dual_update, nct_losses
from .base import Phase, Run

ROLES = ("adapter",)


class Multiplier:
    """The Lagrange multiplier as checkpointable state."""

    def __init__(self, value: float = 0.0):
        self.value = value

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])


def latent_sign_control(run: Run, x: torch.Tensor) -> torch.Tensor:
    """A control read from the latent itself: where the channel mean is positive (tests, any model)."""
    return (x.float().mean(1, keepdim=True) > 0).float()


def layout_map(img: torch.Tensor, size) -> torch.Tensor:
    """Foreground occupancy of images ``[B, 3, H, W]`` in 0..255 pooled to ``size`` (1 = mostly shape)."""
    background = torch.tensor([245.0, 245.0, 240.0], device=img.device).view(1, 3, 1, 1)
    fg = ((img.float() - background).abs().amax(1, keepdim=True) > 40).float()
    return (F.adaptive_avg_pool2d(fg, size) > 0.25).float()


def layout_control(run: Run, x: torch.Tensor) -> torch.Tensor:
    """Foreground occupancy of the decoded image at latent resolution (shapes: the layout map)."""
    vae = run.extra["vae"]
    with torch.no_grad():
        img = vae.decode(x / vae.config.scaling_factor, return_dict=False)[0].float()
    return layout_map((img.clamp(-1, 1) + 1) * 127.5, x.shape[-2:])


CONTROLS = {"latent-sign": latent_sign_control, "layout": layout_control}


def build(run: Run, pipe, config) -> dict:
    if config.control not in CONTROLS:
        raise ValueError(f"unknown control {config.control!r}; choose one of {', '.join(CONTROLS)}")
    run.extra["vae"] = pipe.vae
    run.extra["multiplier"] = Multiplier(config.nct_lambda)
    run.extra["checkpoint"] = [run.extra["multiplier"]]
    torch.manual_seed(config.seed)
    return {"adapter": ControlAdapter.for_model(run.teacher.model, control_channels=1,
                                                  blocks=config.nct_blocks)}


def _loss(run: Run, seed: int) -> tuple[torch.Tensor, dict]:
    cfg = run.config
    model = run.teacher.model                       # the frozen one-step generator f
    emb, mask = run.conditions(seed)
    z = run.noise(seed + 1)
    with torch.no_grad():
        x = run.generate(z, emb, mask, model)
        control = CONTROLS[cfg.control](run, x)
    eps = run.noise(seed + 2)
    grid = torch.linspace(0, 1, cfg.nct_levels + 1, device=z.device)
    k = torch.randint(cfg.nct_levels, (z.shape[0],), generator=run.gen(seed + 3)).to(z.device)
    adapter = run.modules["adapter"]

    def adapted(zz, c):
        with run.plain["adapter"].attached(model, c, adapter):
            return run.generate(zz, emb, mask, model)

    def frozen(zz):
        return run.generate(zz, emb, mask, model)

    l_con, l_bound, logs = nct_losses(adapted, frozen, z, control, eps, k, grid, distance=cfg.nct_distance)
    lam = run.extra["multiplier"].value
    run.extra["last_bound"] = l_bound.detach()
    logs["lambda"] = lam
    return l_con + lam * l_bound, logs


def _after(run: Run, logs: dict) -> None:
    m = run.extra["multiplier"]
    m.value = dual_update(m.value, float(run.extra["last_bound"]), run.config.nct_xi, run.config.nct_eta)


def phases(config) -> list[Phase]:
    return [Phase("adapter", ("adapter",), _loss, every=1, after=_after)]
