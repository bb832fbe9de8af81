"""Errors a user can act on: the CLI prints them as one line and exits non-zero."""


class UserError(Exception):
    """Bad input, configuration or state, reported without a traceback."""


class RejectedInput(UserError):
    """One input (an image, an id, a file) failed a safety or validity check."""
