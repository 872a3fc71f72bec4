"""Rea2Seg on Ray."""

import logging


def get_logger(module: str) -> logging.Logger:
    """The ``rea2seg.*`` logger of a module (``rea2seg_ray.pipeline.graph`` -> ``rea2seg.pipeline.graph``): the
    CLI configures the ``rea2seg`` logger once, and every library module logs under it."""
    return logging.getLogger("rea2seg" + module.removeprefix("rea2seg_ray"))
