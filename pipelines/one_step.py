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
