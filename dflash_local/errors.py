"""Errors a person can act on: the commands print their message on one line (no traceback) and exit with the
error's code (console.command_errors)."""


class UserError(Exception):
    """Bad input: a missing or corrupt file, a drafter for another target, a prompt too long..."""

    exit_code = 1


class UsageError(UserError):
    """Options that do not go together, or a value out of its range."""

    exit_code = 2


class NativeError(RuntimeError):
    """A failure reported by the native helper, with its message."""


class ConversionError(UserError):
    """A drafter that cannot be converted or loaded: its file, checkpoint or target is not what the format asks."""
