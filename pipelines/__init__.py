"""Generation pipelines and reference models. :mod:`pipelines.tiny` builds random tiny pipelines offline."""
