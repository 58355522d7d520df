"""Reference models we train and ship, with their data generators and evaluators.

    >>> from pipelines.zoo import load_reference
    >>> pipe = load_reference("shapes-t2i")            # a diffusers PixArtAlphaPipeline
    >>> image = pipe("a large red circle at the top left").images[0]

The weights are package data (`pipelines/zoo/weights/NAME`, diffusers' `save_pretrained` layout in
safetensors), so this works after a plain `pip install`. `accel zoo train NAME` retrains a model
from :mod:`pipelines.zoo.recipes`; `accel zoo eval NAME` scores it with :mod:`pipelines.zoo.evaluate`.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS = Path(__file__).parent / "weights"
REFERENCES = ("shapes-t2i", "shapes-t2v")  # diffusers pipelines
TEXT_REFERENCES = ("dlm-tasks",)  # diffusion LMs (a DiffusionLMPipeline over transformers weights)


def is_shipped(name: str) -> bool:
    """Whether this installation holds the weights of reference model `name`."""
    marker = "config.json" if name in TEXT_REFERENCES else "model_index.json"
    return (WEIGHTS / name / marker).exists()


def reference_path(name: str) -> Path:
    """Folder of a shipped reference model; a clear error when it is unknown or not shipped."""
    if name not in REFERENCES + TEXT_REFERENCES:
        raise ValueError(f"unknown reference model {name!r}; choose one of {', '.join(REFERENCES + TEXT_REFERENCES)}")
    path = WEIGHTS / name
    if not is_shipped(name):
        raise FileNotFoundError(
            f"reference model {name!r} is not in this installation ({path}); "
            f"train it with `accel zoo train {name}` and pass the folder it writes"
        )
    return path


def load_reference(name: str, path: str | Path | None = None, device=None, dtype=None):
    """A ready pipeline of a reference model (from the shipped weights, or from `path`): a diffusers
    pipeline for the image/video models, a :class:`pipelines.diffusion_lm.DiffusionLMPipeline` for
    ``dlm-tasks``."""
    src = Path(path) if path is not None else reference_path(name)
    if name in TEXT_REFERENCES:
        import torch

        from .dlm import load_pipeline

        pipe = load_pipeline(src, device or "cpu", dtype or torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipe.reference_name = name
        return pipe
    from diffusers import DiffusionPipeline

    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    pipe = DiffusionPipeline.from_pretrained(src, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    for component in pipe.components.values():
        if hasattr(component, "eval"):
            component.eval()
    if device is not None:
        pipe.to(device)
    pipe.reference_name = name
    return pipe
