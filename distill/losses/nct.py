"""Noise-consistency training (NCT) for a new control on a frozen one-step generator. Spec 2.10.

z_t = alpha_t z + sigma_t eps with alpha_t = sqrt(1 - sigma_t^2), so every z_t is standard normal and
(z_t, c) goes from coupled (t = 0, c = h(f(z))) to independent (t = 1). The adapted generator must
agree with itself across neighbouring levels (consistency) and stay close to the frozen generator
at t = 0 (boundary), the latter as a constraint with a Lagrange multiplier."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .common import pseudo_huber


def default_sigma(t: torch.Tensor | float) -> torch.Tensor:
    """sigma_t = sin(pi t / 2): 0 at t = 0, 1 at t = 1, monotone."""
    return torch.sin(torch.as_tensor(t, dtype=torch.float32) * math.pi / 2)


def nct_losses(adapted: Callable, frozen: Callable, z: torch.Tensor, c, eps: torch.Tensor, k: torch.Tensor,
               grid: torch.Tensor, distance: str = "l2",
               huber_c: float = 0.03) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(L_con, L_bound, logs) for noise ``z``, control ``c`` extracted from f(z), shared ``eps``, and
    per-sample level indices ``k`` into ``grid`` (t_0 = 0 < ... < t_N = 1).

    L_con = d(f_phi(z_{t_{k+1}}, c), sg f_phi(z_{t_k}, c)); L_bound = d(f_phi(z, c), f(z))."""
    shape = (-1,) + (1,) * (z.dim() - 1)
    s_lo, s_hi = default_sigma(grid[k]).view(shape), default_sigma(grid[k + 1]).view(shape)
    z_lo = torch.sqrt(1 - s_lo**2) * z + s_lo * eps
    z_hi = torch.sqrt(1 - s_hi**2) * z + s_hi * eps
    with torch.no_grad():
        target = adapted(z_lo, c)
        anchor = frozen(z)

    def dist(a, b):
        if distance == "l2":
            return (a.float() - b.float()).pow(2).flatten(1).mean(1)
        return pseudo_huber(a, b, huber_c)

    l_con = dist(adapted(z_hi, c), target).mean()
    l_bound = dist(adapted(z, c), anchor).mean()
    return l_con, l_bound, {"nct_con": float(l_con.detach()), "nct_bound": float(l_bound.detach())}


def dual_update(lam: float, l_bound: float, xi: float = 1e-3, eta: float = 1e-2) -> float:
    """Projected ascent on the multiplier: lambda <- max(0, lambda + eta (L_bound - xi))."""
    return max(0.0, lam + eta * (float(l_bound) - xi))
