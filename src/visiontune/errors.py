"""Errors a user can fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input: the message names the input and what is allowed. Never a traceback."""

    exit_code = 2


def first_line(exc: BaseException) -> str:
    """An exception's first line of text (its type's name when it has none), for one-line
    errors built from a library's."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class DataError(UserError):
    """The data cannot be used as given (bad rows, empty dataset, unreadable files)."""
