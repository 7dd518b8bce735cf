"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: the message names the input and what is allowed. Never a traceback."""

    exit_code = 2


class DataError(UserError):
    """The data cannot be used as given (bad rows, empty dataset, unreadable files)."""
