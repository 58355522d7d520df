"""Shared pieces: parameterisation conversions, classifier-free guidance, pseudo-Huber distance."""

from __future__ import annotations

import torch


def to_x0(output: torch.Tensor, x_t: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor,
          prediction: str) -> torch.Tensor:
    """x0-prediction from a model output, for x_t = alpha x0 + sigma eps (in fp32).

    ``prediction``: ``"epsilon"``, ``"v_prediction"`` (v = alpha eps - sigma x0), ``"sample"`` (x0),
    or ``"flow"`` (v = eps - x0 with alpha = 1 - sigma, rectified flow)."""
    out, x = output.float(), x_t.float()
    a, s = alpha.float(), sigma.float()
    if prediction == "epsilon":
        return (x - s * out) / a
    if prediction == "v_prediction":
        return a * x - s * out
    if prediction == "sample":
        return out
    if prediction == "flow":
        return x - s * out
    raise ValueError(f"unknown prediction type {prediction!r}")


def cfg_combine(uncond: torch.Tensor, cond: torch.Tensor, scale: float) -> torch.Tensor:
    """D^w = D(empty) + w (D(c) - D(empty)): guidance on the real (teacher) score only."""
    return uncond + scale * (cond - uncond)


def pseudo_huber(a: torch.Tensor, b: torch.Tensor, c: float = 0.03) -> torch.Tensor:
    """Per-sample sqrt(||a - b||^2 + c^2) - c over all but the batch dimension."""
    diff = (a - b).float().flatten(1)
    return torch.sqrt(diff.pow(2).sum(1) + c * c) - c


def per_sample_mean_abs(t: torch.Tensor) -> torch.Tensor:
    """mean_i |t| per sample, shaped to broadcast against ``t``."""
    return t.abs().flatten(1).mean(1).view(-1, *([1] * (t.dim() - 1)))
