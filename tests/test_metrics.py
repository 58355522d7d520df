import math

import numpy as np
import pytest
import torch
from PIL import Image

from accel.metrics import psnr, relative_l1, relative_l2, ssim, to_uint8


def test_psnr_identical_is_inf_and_one_level_off_is_known():
    ref = torch.zeros(1, 3, 8, 8)
    assert psnr(ref, ref) == math.inf
    off = torch.full((1, 3, 8, 8), 1 / 255)
    assert psnr(off, ref) == pytest.approx(20 * math.log10(255), abs=1e-9)


def test_psnr_ignores_sub_quantum_differences_and_accepts_pil():
    ref = torch.rand(1, 3, 8, 8)
    assert psnr(ref + 1e-5, ref) == math.inf or psnr(ref + 1e-5, ref) > 45
    arr = (np.random.default_rng(0).random((8, 8, 3)) * 255).astype(np.uint8)
    assert psnr(Image.fromarray(arr), torch.from_numpy(arr).permute(2, 0, 1)[None] / 255) == math.inf
    assert to_uint8(Image.fromarray(arr)).shape == (1, 3, 8, 8)


def test_ssim_bounds_and_video_shapes():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 5, 3, 16, 16, generator=g)
    assert ssim(a, a) == pytest.approx(1.0, abs=1e-6)
    b = torch.rand(2, 5, 3, 16, 16, generator=g)
    assert ssim(a, b) < 0.2
    with pytest.raises(ValueError, match="shape mismatch"):
        ssim(a, b[:1])


def test_relative_errors():
    ref = torch.tensor([1.0, -2.0, 2.0])
    out = torch.tensor([1.0, -2.0, 3.0])
    assert relative_l1(out, ref) == pytest.approx(1 / 5)
    assert relative_l2(out, ref) == pytest.approx(1 / 3)
