"""The project's own exceptions. Every message is written for a clinician, not a programmer."""
from __future__ import annotations


class MedImgError(Exception):
    """Base class: anything the app should show to the user as a clear message."""


class InvalidInputError(MedImgError, ValueError):
    """An uploaded or read file cannot be used (unreadable, wrong type, wrong shape, ...)."""


class MaskMismatchError(InvalidInputError):
    """A ground-truth mask does not match its image (shape, affine or values)."""


class MissingWeightsError(MedImgError, FileNotFoundError):
    """A model's weights or card is missing or does not match its recorded checksum."""


class DatasetNotFoundError(MedImgError, FileNotFoundError):
    """The data root holds no usable dataset for a task."""
