"""Export a trained one-step generator as a diffusers pipeline folder.

    >>> from distill.export import export_one_step
    >>> path = export_one_step(teacher_pipe, generator, "runs/distill/pipeline")     # doctest: +SKIP

The folder holds the teacher's text encoder, tokenizer and VAE, the generator as the transformer,
and a DDIM scheduler that runs exactly one step at ``t_c`` and returns the x0-prediction (``trailing``
spacing puts the single timestep at 999; ``set_alpha_to_one`` makes the last step return x0).
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch


def one_step_scheduler(teacher_scheduler, t_c: int = 999):
    from diffusers import DDIMScheduler

    last = teacher_scheduler.config.num_train_timesteps - 1
    if t_c != last:
        raise ValueError(f"the exported one-step scheduler samples at t = {last} (trailing spacing); the generator "
                         f"was trained at t_c = {t_c}")
    return DDIMScheduler.from_config(teacher_scheduler.config, timestep_spacing="trailing",
                                     set_alpha_to_one=True, clip_sample=False, thresholding=False)


def export_one_step(teacher_pipe, generator: torch.nn.Module, out: str | os.PathLike, t_c: int = 999) -> Path:
    from diffusers import PixArtAlphaPipeline

    gen = copy.deepcopy(generator).eval().requires_grad_(False)
    # saved as the stock class so any diffusers loader reads it; OneStepPixArtPipeline only sets defaults
    pipe = PixArtAlphaPipeline(tokenizer=teacher_pipe.tokenizer, text_encoder=teacher_pipe.text_encoder,
                                 vae=teacher_pipe.vae, transformer=gen,
                                 scheduler=one_step_scheduler(teacher_pipe.scheduler, t_c))
    out = Path(out)
    pipe.save_pretrained(out, safe_serialization=True)
    return out


def export_adapter(adapter: torch.nn.Module, out: str | os.PathLike, control: str) -> Path:
    """Write a control adapter as ``adapter.safetensors`` + ``adapter_config.json``."""
    import json

    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in adapter.state_dict().items()},
              str(out / "adapter.safetensors"))
    (out / "adapter_config.json").write_text(json.dumps({**adapter.config, "control": control}, indent=2))
    return out


def load_adapter(path: str | os.PathLike):
    """The :class:`~distill.adapter.ControlAdapter` written by :func:`export_adapter`, and its control name."""
    import json

    from safetensors.torch import load_file

    from .adapter import ControlAdapter

    path = Path(path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    control = cfg.pop("control")
    adapter = ControlAdapter(**cfg)
    adapter.load_state_dict(load_file(str(path / "adapter.safetensors")))
    return adapter.eval(), control
