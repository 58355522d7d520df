"""Conditions for data-free distillation: caption embeddings encoded once by the teacher's encoder.

    >>> from distill.data import ConditionBank
    >>> from pipelines.tiny import build_tiny
    >>> pipe = build_tiny("pixart")
    >>> bank = ConditionBank.encode(pipe, ["a red circle", "a blue square"], max_sequence_length=16)
    >>> emb, mask, idx = bank.sample(4, seed=0)          # reproducible per (seed) draw
    >>> emb.shape[0], bank.uncond[0].shape[0]
    (4, 1)

DMD2/SiD need no images: only conditions. Sampling is a pure function of a seed, so a resumed or
multi-process run draws exactly the batches an uninterrupted one would (rank r uses its own seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ConditionBank:
    captions: list[str]
    embeds: torch.Tensor          # [N, L, C]
    masks: torch.Tensor           # [N, L]
    uncond: tuple[torch.Tensor, torch.Tensor]   # ([1, L, C], [1, L]) embedding of ""
    latents: torch.Tensor | None = None         # [N, C, H, W] real samples paired with the captions (GAN)
    pairs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None   # (z, y, caption index): teacher ODE

    @classmethod
    @torch.no_grad()
    def encode(cls, pipe, captions: list[str], max_sequence_length: int = 40, batch: int = 64,
               latents: torch.Tensor | None = None) -> ConditionBank:
        if not captions:
            raise ValueError("the condition bank needs at least one caption")
        # encode wherever the text encoder is (train() moves it to the accelerator, and MSD encodes
        # again for every student); the bank itself lives on the CPU
        device = next(pipe.text_encoder.parameters()).device
        embeds, masks = [], []
        for i in range(0, len(captions), batch):
            e, m, _, _ = pipe.encode_prompt(captions[i:i + batch], do_classifier_free_guidance=False,
                                            max_sequence_length=max_sequence_length, clean_caption=False,
                                            device=device)
            embeds.append(e.float().cpu())
            masks.append(m.cpu())
        u, um, _, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, max_sequence_length=max_sequence_length,
                                         clean_caption=False, device=device)
        if latents is not None and len(latents) != len(captions):
            raise ValueError(f"{len(latents)} real latents for {len(captions)} captions")
        return cls(list(captions), torch.cat(embeds), torch.cat(masks), (u.float().cpu(), um.cpu()), latents)

    def sample(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(len(self.captions), (n,), generator=g)
        return self.embeds[idx], self.masks[idx], idx

    def subset(self, keep: list[int]) -> ConditionBank:
        keep_t = torch.tensor(keep, dtype=torch.long)
        latents = self.latents[keep_t] if self.latents is not None else None
        return ConditionBank([self.captions[i] for i in keep], self.embeds[keep_t], self.masks[keep_t], self.uncond,
                             latents)

    def sample_real(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, embeddings, masks) of ``n`` real samples and their own captions."""
        g = torch.Generator().manual_seed(seed)
        idx = torch.randint(len(self.captions), (n,), generator=g)
        return self.latents[idx], self.embeds[idx], self.masks[idx]


@torch.no_grad()
def teacher_pairs(pipe, bank: ConditionBank, n: int, steps: int = 20, guidance: float = 3.0, seed: int = 0,
                  progress: bool = True, call: dict | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(z, y, caption index): noise and the teacher's deterministic sample from it (DDIM, eta = 0), the
    regression targets of spec 2.4. ``y`` is a scaled latent, like the generator's output."""
    from tqdm.auto import tqdm

    cfg = pipe.transformer.config
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(bank.captions), (n,), generator=g)
    z = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    ys = []
    vae_scale = getattr(pipe, "vae_scale_factor", 8)
    size = cfg.sample_size * vae_scale
    extra = {"height": size, "width": size, "use_resolution_binning": False, **(call or {})}
    for i in tqdm(range(n), desc="teacher pairs", disable=not progress):
        ys.append(pipe(bank.captions[int(idx[i])], latents=z[i:i + 1], num_inference_steps=steps,
                       guidance_scale=guidance, output_type="latent", **extra).images)
    return z, torch.cat(ys).float().cpu(), idx       # the bank stays on the CPU wherever the teacher ran
