"""sim_backend's small exception hierarchy.

Callers catch :class:`SimError` for anything this package raises on purpose; bad
user input is also a :class:`ValueError` so generic validation code keeps working.
"""

from __future__ import annotations


class SimError(Exception):
    """Base class of every error sim_backend raises deliberately."""


class SimInputError(SimError, ValueError):
    """An input (a field of a structure, a file, a hyper-parameter) is invalid.

    The message names the field and the offending value.
    """


class ModelFileError(SimError):
    """A model file is missing, unreadable or not a sim_backend model."""
