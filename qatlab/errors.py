"""The one exception type users see: the CLI turns it into a one-line message and exit code 2."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input: an invalid option, a missing data folder, an unreadable checkpoint.

    The message is one line that says what is wrong and how to fix it.
    """


class DataError(ConfigError):
    """A dataset cannot be found or read (missing folder, wrong format)."""


class CheckpointError(ConfigError):
    """A checkpoint is missing, truncated, or does not fit the model."""
