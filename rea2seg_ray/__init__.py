"""Rea2Seg on Ray."""

import logging
import os
import sys

# The log level a command chose (-v / -q), passed on to every Ray worker so the stages log as the driver does.
LOG_LEVEL_ENV = "REA2SEG_LOG_LEVEL"


def get_logger(module: str) -> logging.Logger:
    """The ``rea2seg.*`` logger of a module (``rea2seg_ray.pipeline.graph`` -> ``rea2seg.pipeline.graph``): the
    CLI configures the ``rea2seg`` logger once, and every library module logs under it."""
    return logging.getLogger("rea2seg" + module.removeprefix("rea2seg_ray"))


def configure_logging(level: int | str | None = None) -> None:
    """The ``rea2seg`` loggers to stderr in a readable format, at ``level`` (default: ``$REA2SEG_LOG_LEVEL``; a
    worker where it is unset keeps Python's defaults). The CLI calls it with the level -v / -q chose and exports
    that level to the workers, whose stage constructors call it with none. Other libraries' loggers (Ray, vLLM,
    transformers) keep their own settings."""
    level = level if level is not None else os.environ.get(LOG_LEVEL_ENV)
    if level is None:
        return
    logger = logging.getLogger("rea2seg")
    logger.setLevel(level)
    handler = next((h for h in logger.handlers if getattr(h, "_rea2seg", False)), None)
    if handler is None:
        handler = logging.StreamHandler()
        handler.setFormatter(
            logging.Formatter("[rea2seg %(asctime)s] %(levelname)s %(name)s: %(message)s", "%H:%M:%S")
        )
        handler._rea2seg = True
        logger.addHandler(handler)
    handler.stream = sys.stderr  # the current one (main() may run again in a process; the old may be closed)
    logger.propagate = False
