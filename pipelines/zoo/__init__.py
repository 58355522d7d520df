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
REFERENCES = ("shapes-t2i", "shapes-t2v")


def reference_path(name: str) -> Path:
    """Folder of a shipped reference model; a clear error when it is unknown or not shipped."""
    if name not in REFERENCES:
        raise ValueError(f"unknown reference model {name!r}; choose one of {', '.join(REFERENCES)}")
    path = WEIGHTS / name
    if not (path / "model_index.json").exists():
        raise FileNotFoundError(
            f"reference model {name!r} is not in this installation ({path}); "
            f"train it with `accel zoo train {name}` and pass the folder it writes"
        )
    return path


def load_reference(name: str, path: str | Path | None = None, device=None, dtype=None):
    """A ready diffusers pipeline of a reference model (from the shipped weights, or from `path`)."""
    from diffusers import DiffusionPipeline

    src = Path(path) if path is not None else reference_path(name)
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
