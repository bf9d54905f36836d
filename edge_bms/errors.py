"""edge_bms exceptions: one base class, each carrying what a user needs to act."""

from __future__ import annotations


class BmsError(Exception):
    """Base class of every edge_bms error."""


class CellModelError(BmsError, ValueError):
    """A cell model file is missing, malformed or inconsistent (the message names the field)."""


class InputError(BmsError, ValueError):
    """Measurements a filter cannot take (wrong shape, non-finite, out of range)."""


class CorrectionModelError(BmsError):
    """The learned correction network could not be loaded or verified.

    ``reason`` is one of "missing", "integrity" (sha256 mismatch) or "metadata"; the
    estimator reports it when it falls back to the plain filter.
    """

    def __init__(self, message: str, reason: str = "metadata") -> None:
        super().__init__(message)
        self.reason = reason


class IdentificationError(BmsError, ValueError):
    """Characterization data that the ECM identification cannot fit (names the file and test)."""


class CheckpointError(BmsError, ValueError):
    """A saved estimator state that does not fit (format, cell model, cell count, values)."""
