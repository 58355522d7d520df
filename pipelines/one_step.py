"""One-step pipelines: a distilled PixArt generator that samples in a single denoiser call.

    >>> from pipelines.one_step import OneStepPixArtPipeline
    >>> pipe = OneStepPixArtPipeline.from_pretrained("runs/distill/pipeline")     # doctest: +SKIP
    >>> image = pipe("a red circle").images[0]                                    # doctest: +SKIP

The exported folder is a standard ``PixArtAlphaPipeline`` (``PixArtAlphaPipeline.from_pretrained``
loads it too; call it with ``num_inference_steps=1, guidance_scale=1.0``): the transformer is the
generator and the scheduler a DDIM with ``timestep_spacing="trailing"`` and ``set_alpha_to_one=True``,
so one step runs the generator at t = 999 and returns its x0-prediction exactly. This subclass only
changes the call's defaults to those values.
"""

from __future__ import annotations

from diffusers import PixArtAlphaPipeline


class OneStepPixArtPipeline(PixArtAlphaPipeline):
    def __call__(self, prompt=None, num_inference_steps: int = 1, guidance_scale: float = 1.0, **kwargs):
        return super().__call__(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                                **kwargs)


class MultiStudentPipeline:
    """K one-step students sharing text encoder and VAE; each prompt runs on the student its router picks.

        >>> from pipelines.one_step import MultiStudentPipeline
        >>> pipe = MultiStudentPipeline.from_pretrained("runs/msd/pipeline")          # doctest: +SKIP
        >>> images = pipe(["a red circle", "a blue square"]).images                    # doctest: +SKIP

    The folder is a one-step pipeline (student 0) plus ``students/k/`` transformer folders and
    ``router.json``. A batch is split by student, each group runs in one call (one denoiser call per
    group), and the images come back in the prompts' order.
    """

    def __init__(self, base: OneStepPixArtPipeline, students: list, router):
        self.base, self.students, self.router = base, students, router

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> MultiStudentPipeline:
        from pathlib import Path

        from diffusers import PixArtTransformer2DModel

        from .routing import Router

        path = Path(path)
        base = OneStepPixArtPipeline.from_pretrained(path, **kwargs)
        router = Router.load(path / "router.json")
        students = [PixArtTransformer2DModel.from_pretrained(path / "students" / str(k), **kwargs).eval()
                    for k in range(router.students)]
        return cls(base, students, router)

    def set_progress_bar_config(self, **kwargs) -> None:
        self.base.set_progress_bar_config(**kwargs)

    def __call__(self, prompt, generator=None, **kwargs):
        import torch
        from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ImagePipelineOutput

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        gens = generator if isinstance(generator, list) else [generator] * len(prompts)
        routes = [self.router.route(p) for p in prompts]
        out: list = [None] * len(prompts)
        original = self.base.transformer
        try:
            for k in sorted(set(routes)):
                idx = [i for i, r in enumerate(routes) if r == k]
                self.base.transformer = self.students[k]
                g = [gens[i] for i in idx] if isinstance(generator, list) else generator
                images = self.base([prompts[i] for i in idx], generator=g, **kwargs).images
                for j, i in enumerate(idx):
                    out[i] = images[j]
        finally:
            self.base.transformer = original
        if out and isinstance(out[0], torch.Tensor):
            out = torch.stack(out)
        return ImagePipelineOutput(images=out)
