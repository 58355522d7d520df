"""Fidelity metrics against a reference output of the same seed.

    >>> import torch
    >>> from accel.metrics import psnr, ssim, relative_l1
    >>> ref = torch.rand(1, 3, 16, 16)
    >>> psnr(ref, ref)
    inf
    >>> round(ssim(ref, ref), 4)
    1.0

Images are float tensors in [0, 1] shaped ``(..., C, H, W)`` (videos ``(B, F, C, H, W)``), or PIL
images / lists of them. PSNR is computed on the uint8 images a user would save, so sub-quantum
differences do not count. Learned metrics (LPIPS, CLIP, ImageReward) need weights that cannot be
downloaded here; they are not part of this module.
"""

from __future__ import annotations

import math

import numpy as np
import torch


def to_float_images(images) -> torch.Tensor:
    """(N, C, H, W) float in [0, 1] from a tensor, a PIL image, a numpy array or a list of them."""
    if isinstance(images, (list, tuple)):
        return torch.cat([to_float_images(im) for im in images])
    if isinstance(images, torch.Tensor):
        x = images.detach().float().cpu()
    elif isinstance(images, np.ndarray):
        x = torch.from_numpy(np.array(images, copy=True)).float()
        if x.shape[-1] in (1, 3, 4) and x.ndim >= 3:
            x = x.movedim(-1, -3)
        if images.dtype == np.uint8:
            x = x / 255.0
    else:  # PIL
        return to_float_images(np.asarray(images.convert("RGB"))[None])
    if x.ndim == 3:
        x = x[None]
    return x.reshape(-1, *x.shape[-3:])


def to_uint8(images) -> torch.Tensor:
    return (to_float_images(images).clamp(0, 1) * 255).round().to(torch.uint8)


def _check(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {tuple(a.shape)} vs {tuple(b.shape)}")


def psnr(output, reference) -> float:
    """PSNR in dB on the uint8 images; ``inf`` when they are identical."""
    a, b = to_uint8(output).double(), to_uint8(reference).double()
    _check(a, b)
    mse = float(((a - b) ** 2).mean())
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


def ssim(output, reference) -> float:
    """Mean SSIM (torchmetrics, Gaussian window) over the images/frames."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    a, b = to_float_images(output).clamp(0, 1), to_float_images(reference).clamp(0, 1)
    _check(a, b)
    size = min(11, *a.shape[-2:])
    size -= 1 - size % 2  # the window must be odd
    return float(structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=size))


def relative_l1(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference||_1 / ||reference||_1 (raw tensors, e.g. latents)."""
    a, b = output.detach().double(), reference.detach().double()
    _check(a, b)
    return float((a - b).abs().sum() / b.abs().sum().clamp_min(1e-12))


def relative_l2(output: torch.Tensor, reference: torch.Tensor) -> float:
    """||output - reference||_2 / ||reference||_2 (raw tensors, e.g. latents)."""
    a, b = output.detach().double(), reference.detach().double()
    _check(a, b)
    return float((a - b).norm() / b.norm().clamp_min(1e-12))
