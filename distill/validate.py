"""Validation during distillation: sample held-out prompts in one step with the current generator
(through the same pipeline object the export writes), score them with the shapes evaluator, save a
grid image and append the scores to ``output_dir/validation.jsonl``.

    >>> from distill.validate import Validator
    >>> validate = Validator(teacher_pipe, prompts, "runs/dmd")              # doctest: +SKIP
    >>> train(config, teacher_pipe, captions, validate=validate)            # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .export import one_step_scheduler


class Validator:
    def __init__(self, teacher_pipe, prompts: list[str], output_dir: str, seed: int = 0, score: bool = True,
                 call: dict | None = None):
        self.pipe, self.prompts, self.output = teacher_pipe, list(prompts), Path(output_dir)
        self.seed, self.score, self.call = seed, score, dict(call or {})

    @torch.no_grad()
    def __call__(self, run, step: int) -> dict:
        from diffusers import PixArtAlphaPipeline
        from PIL import Image

        generator = run.plain.get("generator")
        if generator is None:
            return {}
        was_training = generator.training
        generator.eval()
        pipe = PixArtAlphaPipeline(tokenizer=self.pipe.tokenizer, text_encoder=self.pipe.text_encoder,
                                   vae=self.pipe.vae, transformer=generator,
                                   scheduler=one_step_scheduler(self.pipe.scheduler, run.config.t_c))
        pipe.set_progress_bar_config(disable=True)
        try:
            gens = [torch.Generator().manual_seed(self.seed + i) for i in range(len(self.prompts))]
            images = pipe(self.prompts, num_inference_steps=1, guidance_scale=1.0, generator=gens,
                          output_type="pil", **self.call).images
        finally:
            generator.train(was_training)
        record = {"step": step}
        if self.score:
            from pipelines.zoo.evaluate import score_images

            scores = score_images(images, self.prompts)
            record.update(overall=scores["overall"], image_accuracy=scores["image_accuracy"],
                          attributes=scores["attributes"])
        w, h = images[0].size
        cols = min(4, len(images))
        grid = Image.new("RGB", (w * cols, h * -(-len(images) // cols)), "white")
        for i, img in enumerate(images):
            grid.paste(img, ((i % cols) * w, (i // cols) * h))
        self.output.mkdir(parents=True, exist_ok=True)
        grid.save(self.output / f"validation-{step:06d}.png")
        with open(self.output / "validation.jsonl", "a") as fh:
            fh.write(json.dumps(record) + "\n")
        return record
