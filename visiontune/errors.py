"""The exceptions visiontune raises for a user's mistake, and only for those.

Every error caused by what a user gave (a data folder, an option value, a checkpoint or weights file)
derives from :class:`UserError`. The ``visiontune`` command prints such an error as one line,
``visiontune <subcommand>: error: <message>``, and exits with code 2, no traceback; any other exception is a
bug and keeps its traceback. From Python they are ordinary exceptions; the option and file errors are
``ValueError`` subclasses as well, so ``except ValueError`` keeps working.

==============================================  =================================================
class                                           raised for
==============================================  =================================================
:class:`ConfigError`                            a bad option value (``model.lr must be > 0, ...``)
``StrategyError``, ``BackboneError``,           (ConfigError) strategy, backbone / weights, group
``GroupError``, ``ScheduleError``               and schedule options
``DataError``                                   a dataset problem (every problem listed at once);
                                                ``DataOptionError`` (also a ConfigError): bad
                                                ``ImageDataModule`` options
``BadImageError``                               one unreadable image file
:class:`CheckpointError`                        a checkpoint file that cannot be loaded
``CheckpointMismatchError``                     a checkpoint that does not fit the model
``DeltaError``                                  an unreadable or mismatching task delta
==============================================  =================================================

This module imports nothing, so every part of the package can use it.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "CheckpointNotFoundError", "ConfigError", "UserError"]


class UserError(Exception):
    """A mistake in what the user gave (data, options, files); the message says what and where.

    Example:
        >>> from visiontune.data import DataError
        >>> issubclass(DataError, UserError), issubclass(ConfigError, ValueError)
        (True, True)
    """


class ConfigError(UserError, ValueError):
    """A bad option value; the message names the option and the value."""


class CheckpointError(UserError, ValueError):
    """A checkpoint file that cannot be loaded (missing, truncated, not a checkpoint, unsafe to unpickle);
    the message names the file."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path that names no file (also a ``FileNotFoundError``)."""
