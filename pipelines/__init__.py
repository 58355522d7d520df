"""Generation pipelines and reference models. :mod:`pipelines.tiny` builds random tiny pipelines offline.

    >>> import pipelines
    >>> pipe = pipelines.load_reference("shapes-t2i")     # same as pipelines.zoo.load_reference
"""


def load_reference(name, path=None, device=None, dtype=None):
    """A ready pipeline of a shipped reference model; see :func:`pipelines.zoo.load_reference`."""
    from .zoo import load_reference as _load

    return _load(name, path=path, device=device, dtype=dtype)
