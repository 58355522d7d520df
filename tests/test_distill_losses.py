"""Gaussian oracles: data N(2, 0.5^2) per coordinate (16 i.i.d. coordinates a sample, so the losses'
per-sample normalisers average over several values as they do over an image), generator
G(z) = a + b z, exact Gaussian denoisers."""

import math

import pytest
import torch

from distill.losses import (
    dmd_loss,
    dual_update,
    fake_score_loss,
    gan_critic_loss,
    gan_generator_loss,
    nct_losses,
    sid_loss,
    sim_loss,
    teacher_score_matching_loss,
    to_x0,
)

MU, S = 2.0, 0.5
@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: threads only add overhead (10x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


BETAS = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64)
ALPHA_BAR = torch.cumprod(1 - BETAS, 0).float()


def gaussian_x0(x_t, alpha, sigma, mean, var):
    """E[x0 | x_t] for x0 ~ N(mean, var), x_t = alpha x0 + sigma eps."""
    return mean + alpha * var / (alpha**2 * var + sigma**2) * (x_t - alpha * mean)


def _train(step_loss, steps=1500, lr=2e-2, seed=0):
    torch.manual_seed(seed)
    a = torch.zeros(1, requires_grad=True)
    b = torch.ones(1, requires_grad=True)
    opt = torch.optim.Adam([a, b], lr=lr)
    for _ in range(steps):
        z = torch.randn(256, 16)
        loss = step_loss(a, b, z)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return float(a.detach()), abs(float(b.detach()))


def _vp_noise(x):
    t = torch.randint(20, 980, (x.shape[0], 1))
    ab = ALPHA_BAR[t]
    alpha, sigma = ab.sqrt(), (1 - ab).sqrt()
    return alpha * x + sigma * torch.randn_like(x), alpha, sigma


def test_dmd_drives_the_generator_to_the_data():
    def step(a, b, z):
        x = a + b * z
        x_t, alpha, sigma = _vp_noise(x.detach())
        real = gaussian_x0(x_t, alpha, sigma, MU, S**2)
        fake = gaussian_x0(x_t, alpha, sigma, a.detach(), b.detach() ** 2)
        return dmd_loss(x, real, fake)[0]

    a, b = _train(step)
    assert a == pytest.approx(MU, abs=0.05) and b == pytest.approx(S, abs=0.05)


def _edm_sigma(n):
    u = torch.rand(n, 1) * 0.8
    lo, hi, rho = 0.002 ** (1 / 7), 80 ** (1 / 7), 7
    return (hi + (1 - u) * (lo - hi)) ** rho


@pytest.mark.parametrize("loss_fn", [
    lambda x, r, f: sid_loss(x, r, f, alpha=1.2)[0],
    lambda x, r, f: sim_loss(x, r, f)[0],
    lambda x, r, f: sim_loss(x, r, f, huber_c=0.5)[0],
], ids=["sid", "sim-l2", "sim-huber"])
def test_sid_and_sim_drive_the_generator_to_the_data(loss_fn):
    def step(a, b, z):
        x = a + b * z
        sigma = _edm_sigma(x.shape[0])
        x_s = x + sigma * torch.randn_like(x)  # the graph flows through x_sigma into both denoisers
        real = gaussian_x0(x_s, 1.0, sigma, MU, S**2)
        fake = gaussian_x0(x_s, 1.0, sigma, a.detach(), b.detach() ** 2)
        return loss_fn(x, real, fake)

    a, b = _train(step)
    assert a == pytest.approx(MU, abs=0.05) and b == pytest.approx(S, abs=0.05)


def test_sim_with_squared_distance_is_twice_sid_at_alpha_one():
    x = torch.randn(64, 3, requires_grad=True)
    r, f = torch.randn(64, 3), torch.randn(64, 3)
    assert torch.allclose(sim_loss(x, r, f)[0], 2 * sid_loss(x, r, f, alpha=1.0)[0])


def test_exact_fake_denoiser_minimises_the_fake_loss_and_tsm_of_teacher_is_zero():
    torch.manual_seed(0)
    a, b2 = 0.7, 1.3
    x = a + math.sqrt(b2) * torch.randn(50_000, 4)
    x_t, alpha, sigma = _vp_noise(x)
    best = float(fake_score_loss(gaussian_x0(x_t, alpha, sigma, a, b2), x)[0])
    for da, scale in ((0.2, 1.0), (-0.2, 1.0), (0.0, 1.3), (0.0, 0.7)):
        assert best < float(fake_score_loss(gaussian_x0(x_t, alpha, sigma, a + da, b2 * scale), x)[0])
    teacher = gaussian_x0(x_t, alpha, sigma, MU, S**2)
    assert float(teacher_score_matching_loss(teacher.clone(), teacher)[0]) == 0.0


def test_conversions_and_gan_losses():
    x0, eps = torch.randn(8, 4), torch.randn(8, 4)
    alpha, sigma = torch.tensor(0.8), torch.tensor(0.6)
    x_t = alpha * x0 + sigma * eps
    assert torch.allclose(to_x0(eps, x_t, alpha, sigma, "epsilon"), x0, atol=1e-5)
    assert torch.allclose(to_x0(alpha * eps - sigma * x0, x_t, alpha, sigma, "v_prediction"), x0, atol=1e-5)
    x_f = (1 - sigma) * x0 + sigma * eps
    assert torch.allclose(to_x0(eps - x0, x_f, 1 - sigma, sigma, "flow"), x0, atol=1e-5)
    with pytest.raises(ValueError):
        to_x0(eps, x_t, alpha, sigma, "nope")
    logits = torch.zeros(4)
    assert float(gan_generator_loss(logits)[0]) == pytest.approx(math.log(2))
    assert float(gan_critic_loss(logits, logits)[0]) == pytest.approx(2 * math.log(2))


def test_nct_makes_a_frozen_generator_follow_a_control():
    torch.manual_seed(0)
    frozen = lambda z: z  # noqa: E731  the one-step generator f(z) = z
    net = torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.SiLU(), torch.nn.Linear(32, 32), torch.nn.SiLU(),
                              torch.nn.Linear(32, 1))
    torch.nn.init.zeros_(net[-1].weight)
    torch.nn.init.zeros_(net[-1].bias)

    def adapted(z, c):
        return z + net(torch.cat([z, c], 1))

    grid = torch.linspace(0, 1, 21)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, betas=(0.9, 0.95))
    lam, lams = 0.0, []
    for step in range(1200):
        z, eps = torch.randn(256, 1), torch.randn(256, 1)
        c = (frozen(z) > 0).float()  # the control extracted from the frozen generator's output
        k = torch.randint(0, 20, (256,))
        l_con, l_bound, _ = nct_losses(adapted, frozen, z, c, eps, k, grid)
        if step == 0:
            assert float(l_bound.detach()) == 0.0  # zero-initialised adapter: exactly the frozen generator
        opt.zero_grad()
        (l_con + lam * l_bound).backward()
        opt.step()
        lam = dual_update(lam, float(l_bound.detach()))
        lams.append(lam)
    assert max(lams) > 0
    z = torch.randn(4096, 1)
    c = (torch.rand(4096, 1) < 0.5).float()  # controls independent of the noise
    with torch.no_grad():
        follows = ((adapted(z, c) > 0).float() == c).float().mean()
    assert float(follows) >= 0.9
