"""Distillation losses as pure functions: tensors in, ``(loss, logs)`` out; no accelerate, no optimizers.

    >>> import torch
    >>> from distill.losses import dmd_loss
    >>> x = torch.randn(4, 4, 8, 8, requires_grad=True)
    >>> loss, logs = dmd_loss(x, real_x0=torch.zeros_like(x), fake_x0=x.detach() * 0.9)
    >>> loss.backward()

Every function takes the denoisers' x0-predictions (convert eps/v/flow outputs with
:func:`distill.losses.common.to_x0`) and is pinned by a 1-D Gaussian test whose gradient drives a
one-step generator to the data distribution (``tests/test_distill_losses.py``).
"""

from .common import cfg_combine, pseudo_huber, to_x0
from .dmd import dmd_loss, fake_score_loss, gan_critic_loss, gan_generator_loss, teacher_score_matching_loss
from .nct import dual_update, nct_losses
from .sid import sid_loss, sim_loss

__all__ = [
    "to_x0", "cfg_combine", "pseudo_huber", "dmd_loss", "fake_score_loss", "gan_generator_loss", "gan_critic_loss",
    "teacher_score_matching_loss", "sid_loss", "sim_loss", "nct_losses", "dual_update",
]
