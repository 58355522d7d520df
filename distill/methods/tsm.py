"""Teacher score matching (MSD, spec 2.9): a smaller student learns the teacher's x0-predictions on
noised clean samples, L_TSM = E_t ||mu_student(x_t, t) - mu_teacher(x_t, t)||^2; the result
initialises the student's distribution-matching stage (``init_generator``).

The student is the teacher's architecture with ``student_layers`` blocks, its blocks initialised
from evenly spaced teacher blocks (embeddings and output layers copied). Clean samples: the bank's
real latents, or else the teacher-pair samples."""

from __future__ import annotations

import torch

from ..losses import teacher_score_matching_loss
from .base import Phase, Run

ROLES = ("generator",)
T = 1000


def smaller_student(teacher_model, layers: int):
    """The teacher's class and config with ``layers`` blocks, weights taken from the teacher."""
    cfg = dict(teacher_model.config)
    if not 1 <= layers < cfg["num_layers"]:
        raise ValueError(f"student_layers must be in [1, {cfg['num_layers']}) for a smaller student, got {layers}")
    cfg["num_layers"] = layers
    student = type(teacher_model).from_config(cfg)
    state = teacher_model.state_dict()
    picks = torch.linspace(0, teacher_model.config.num_layers - 1, layers).round().long().tolist()
    mapped = {}
    for k, v in state.items():
        if k.startswith("transformer_blocks."):
            i, rest = k.split(".", 2)[1:]
            if int(i) in picks:
                for j, p in enumerate(picks):
                    if p == int(i):
                        mapped[f"transformer_blocks.{j}.{rest}"] = v
        else:
            mapped[k] = v
    student.load_state_dict(mapped)
    return student.float().train()


def clean_latents(run: Run, seed: int) -> torch.Tensor:
    bank = run.bank
    source = bank.latents if bank.latents is not None else (bank.pairs[1] if bank.pairs is not None else None)
    if source is None:
        raise ValueError("TSM needs clean samples: real latents (--real-latents N) or teacher pairs (--pairs N)")
    pick = torch.randint(len(source), (run.config.batch,), generator=run.gen(seed))
    return source[pick].to(run.device), pick


def _loss(run: Run, seed: int) -> tuple[torch.Tensor, dict]:
    x, pick = clean_latents(run, seed)
    emb, mask = run.conditions(seed + 1)
    if run.bank.latents is not None:          # real latents come with their own captions
        emb, mask = run.bank.embeds[pick].to(run.device), run.bank.masks[pick].to(run.device)
    t = run.timesteps(seed + 2, 0, T)
    x_t, _, _ = run.noised(x, t, seed + 3)
    with torch.no_grad():
        target = run.teacher.raw_x0(run.teacher.model, x_t, t, emb, mask)
    student = run.teacher.raw_x0(run.modules["generator"], x_t, t, emb, mask)
    return teacher_score_matching_loss(student, target)


def build(run: Run, pipe, config) -> dict:
    if not config.student_layers:
        raise ValueError("tsm trains a smaller student: set student_layers")
    if run.bank.latents is None and run.bank.pairs is None:
        raise ValueError("TSM needs clean samples: real latents (--real-latents N) or teacher pairs (--pairs N)")
    return {"generator": smaller_student(run.teacher.model, config.student_layers)}


def phases(config) -> list[Phase]:
    return [Phase("generator", ("generator",), _loss, every=1, updates_generator=True)]
