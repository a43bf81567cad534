"""The one exception type users see for bad input."""

from __future__ import annotations


class SecateursError(ValueError):
    """Bad input or an impossible request.

    The message is one line that says what was wrong and what to do about it.
    The CLI prints it without a traceback and exits with status 2.
    """
