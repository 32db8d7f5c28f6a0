"""User-facing errors.

Anything raised as ``AlignError`` is printed by the CLI as one line (``alignrl: error: ...``)
followed by a non-zero exit, without a traceback. Use it for bad input a user can fix; let real
bugs surface as ordinary exceptions.
"""


class AlignError(Exception):
    """A problem with the user's input or environment, with a message that names the fix."""


class ConfigError(AlignError):
    """The composed configuration cannot work (caught before any model loads where possible)."""


class RewardError(AlignError):
    """A reward function raised; the message names the reward."""


class CheckpointError(AlignError):
    """A path that should be a checkpoint is not one, or a checkpoint cannot be used."""
