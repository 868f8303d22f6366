"""Errors that the user can fix: the CLI prints them as one line and exits with code 2."""


class DoriError(ValueError):
    """Bad input (a path, a file, a number): the message names the field and what is allowed."""
