"""Quiet ``torch.onnx.export``: the exporter warns and logs about its own internals."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def quiet_exporter() -> Iterator[None]:
    """Silence the exporter's FutureWarnings/UserWarnings (pytree LeafSpec, dynamic-axis
    renaming) and its log lines ("torchvision is not installed. Skipping ..."): nothing
    a user can act on. Errors still raise."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)
