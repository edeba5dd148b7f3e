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


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite or exploding loss; the run stopped without saving it.

    The CLI prints its one-line message and exits with code 3; a comparison grid records the
    cell as failed with this message as the reason.
    """
