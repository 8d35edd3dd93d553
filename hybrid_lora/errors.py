"""Errors in what the user gave: a file, a value, a model or data set that cannot be had.

The command line prints such an error as one line (``hybrid-lora train: error: ...``)
and exits with status 2, as for a bad flag; every other exception is a fault of the
program and keeps its traceback. Each subclass also derives from the built-in error
a Python caller would expect (ValueError, FileNotFoundError, ...), so library code
that catches those keeps working.

A message names the file or value and says what was expected, on one line.
"""


class UserError(Exception):
    """Something the user gave is wrong or unavailable; the message says what and what was expected."""


class BadValue(UserError, ValueError):
    """A value, or the content of a file, that is not what was expected."""


class MissingFile(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


class Unavailable(UserError, ConnectionError):
    """A model or data set that cannot be had here: the hub unreachable, a package missing."""
