"""Score identity distillation (SiD) and score implicit matching (SIM). Spec ``distill.md`` 2.7-2.8.

Both take the denoisers' outputs at x_sigma/x_t *with* the graph through the noised input (the nets'
parameters are frozen, the sample is not)."""

from __future__ import annotations

import torch

from .common import per_sample_mean_abs


def sid_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor,
             alpha: float = 1.2) -> tuple[torch.Tensor, dict]:
    """mean[(y_r - y_f) . ((y_r - x) - alpha (y_r - y_f))] / sg(max(mean_i |x - y_r|, 1e-5)),
    dropping samples with non-finite terms."""
    y_r, y_f, xf = real_x0.float(), fake_x0.float(), x.float()
    norm = per_sample_mean_abs(xf - y_r).detach().clamp_min(1e-5)
    term = ((y_r - y_f) * ((y_r - xf) - alpha * (y_r - y_f)) / norm).flatten(1).mean(1)
    keep = torch.isfinite(term)
    loss = term[keep].mean() if bool(keep.any()) else term.sum() * 0.0
    return loss, {"sid_loss": float(loss.detach()), "dropped": int((~keep).sum())}


def sim_loss(x: torch.Tensor, real_x0: torch.Tensor, fake_x0: torch.Tensor,
             huber_c: float | None = None) -> tuple[torch.Tensor, dict]:
    """SIM in x0 units: mean[d'(y) . (D_f - x)] / sg(mean_i |x - D_r|), y = D_r - D_f.

    d = ||.||^2 (``huber_c=None``, d'(y) = 2y: twice SiD at alpha = 1) or pseudo-Huber with constant c
    (d'(y) = y / sqrt(||y||^2 + c^2), per sample)."""
    y_r, y_f, xf = real_x0.float(), fake_x0.float(), x.float()
    y = y_r - y_f
    if huber_c is None:
        dprime = 2.0 * y
    else:
        size = y.flatten(1).pow(2).sum(1).view(-1, *([1] * (y.dim() - 1)))
        dprime = y / torch.sqrt(size + huber_c**2)
    norm = per_sample_mean_abs(xf - y_r).detach().clamp_min(1e-5)
    loss = ((dprime * (y_f - xf)) / norm).flatten(1).mean(1).mean()
    return loss, {"sim_loss": float(loss.detach())}
