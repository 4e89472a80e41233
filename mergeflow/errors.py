"""Exceptions raised by mergeflow. Every message is one line that names the file and key at fault."""

from __future__ import annotations


class MergeflowError(Exception):
    """Base class: bad input or configuration, reported to the user as one line."""


class CheckpointError(MergeflowError):
    """A checkpoint file cannot be read safely (corrupt, truncated, unsafe pickle, bad values)."""


class IncompatibleCheckpointsError(MergeflowError):
    """Checkpoints disagree on keys, shapes, dtypes or non-float contents."""


class ConfigError(MergeflowError):
    """An unknown method, parameter or invalid parameter value."""


class OutputError(MergeflowError):
    """An output cannot be written safely (it is an input, not a regular file, or the OS refused)."""


class NumericalError(MergeflowError):
    """A numerical step failed on every solver tried, or produced non-finite values."""
