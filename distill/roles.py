"""Roles in a distillation run: the frozen teacher, the fake score, the generator.

    >>> from distill.roles import FakeScore, Teacher
    >>> from pipelines.tiny import build_tiny
    >>> pipe = build_tiny("pixart")
    >>> teacher = Teacher(pipe.transformer, pipe.scheduler)
    >>> fake = FakeScore.lora_on(teacher, rank=4)        # adapters on the teacher's own modules
    >>> with fake.as_teacher():                          # adapters disabled: exactly the teacher
    ...     pass

The fake score is either a full trainable copy of the teacher or a peft LoRA adapter on the
teacher's modules (only the adapter's parameters train; with adapters disabled the module *is* the
teacher, bit for bit). The generator starts from the teacher's weights.
"""

from __future__ import annotations

import contextlib
import copy

import torch

from .losses.common import to_x0


def alphas_sigmas(scheduler, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of a DDPM/DDIM-type scheduler at integer timesteps ``t``, fp32."""
    ab = scheduler.alphas_cumprod.to(t.device)[t.long()].float()
    return ab.sqrt(), (1 - ab).sqrt()


class Teacher:
    """Frozen denoiser (eval, no gradients) that returns x0-predictions, with guidance.

    Args:
        model: the diffusers transformer (PixArt here; others follow the same call).
        scheduler: gives alpha_t / sigma_t and the prediction type.
        guidance_scale: classifier-free guidance on the teacher only (DMD2 "real score").
    """

    def __init__(self, model: torch.nn.Module, scheduler, guidance_scale: float = 1.0):
        self.model = model.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.guidance_scale = guidance_scale
        self.prediction = scheduler.config.prediction_type

    def raw_x0(self, model: torch.nn.Module, x_t, t, text, text_mask=None) -> torch.Tensor:
        """x0-prediction of ``model`` (the teacher's architecture) at (x_t, t)."""
        out = model(x_t, encoder_hidden_states=text, encoder_attention_mask=text_mask, timestep=t,
                    added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
        out = out[:, : x_t.shape[1]]  # learned-sigma models return twice the channels
        alpha, sigma = alphas_sigmas(self.scheduler, t)
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        return to_x0(out, x_t, alpha.view(shape), sigma.view(shape), self.prediction)

    @torch.no_grad()
    def x0(self, x_t, t, text, text_mask=None, uncond=None, uncond_mask=None) -> torch.Tensor:
        cond = self.raw_x0(self.model, x_t, t, text, text_mask)
        if uncond is None or self.guidance_scale == 1.0:
            return cond
        return self.raw_x0(self.model, x_t, t, uncond, uncond_mask) + self.guidance_scale * (
            cond - self.raw_x0(self.model, x_t, t, uncond, uncond_mask))


class FakeScore:
    """The critic's score of the generator's distribution: a full copy or a LoRA on the teacher."""

    def __init__(self, teacher: Teacher, module: torch.nn.Module, lora: bool):
        self.teacher, self.module, self.lora = teacher, module, lora

    @classmethod
    def copy_of(cls, teacher: Teacher) -> FakeScore:
        module = copy.deepcopy(teacher.model).float().train().requires_grad_(True)
        return cls(teacher, module, lora=False)

    @classmethod
    def lora_on(cls, teacher: Teacher, rank: int = 16, targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0"),
                name: str = "fake") -> FakeScore:
        from peft import LoraConfig, inject_adapter_in_model

        model = teacher.model
        # not every diffusers model has PeftAdapterMixin (PixArt does not): inject directly
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets),
                                           init_lora_weights=True), model, adapter_name=name)
        for pname, p in model.named_parameters():
            p.requires_grad_("lora_" in pname)
            if "lora_" in pname:
                p.data = p.data.float()  # adapters train in fp32 whatever the teacher's dtype
        return cls(teacher, model, lora=True)

    def parameters(self):
        return [p for p in self.module.parameters() if p.requires_grad]

    @contextlib.contextmanager
    def as_teacher(self):
        """Adapters disabled: the shared module is exactly the teacher (no-op for a full copy)."""
        if not self.lora:
            yield self.teacher.model
            return
        self._toggle(False)
        try:
            yield self.module
        finally:
            self._toggle(True)

    def _toggle(self, enabled: bool) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.module.modules():
            if isinstance(module, BaseTunerLayer):
                module.enable_adapters(enabled)

    def x0(self, x_t, t, text, text_mask=None) -> torch.Tensor:
        return self.teacher.raw_x0(self.module, x_t, t, text, text_mask)


def generator_from(teacher: Teacher) -> torch.nn.Module:
    """A trainable fp32 copy of the teacher: the one-step generator's starting point."""
    return copy.deepcopy(teacher.model).float().train().requires_grad_(True)
