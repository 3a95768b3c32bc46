"""Errors a person can act on: the CLI prints their message (no traceback) and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing or corrupt file, a drafter for another target, a prompt too long..."""


class ConversionError(UserError):
    """A drafter that cannot be converted or loaded: its file, checkpoint or target is not what the format asks."""
