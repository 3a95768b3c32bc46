"""Errors a person can act on: the CLI prints their message (no traceback) and exits with code 2."""


class UserError(Exception):
    """Bad input: a missing or corrupt file, a drafter for another target, a prompt too long..."""
