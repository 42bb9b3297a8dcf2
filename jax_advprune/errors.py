"""The one base class of the mistakes a user can fix: the command line prints their message, not a traceback."""

from __future__ import annotations


class UserError(Exception):
    """A setting, an input file or the work directory is not what the run needs.

    The message says what was found, what is expected and how to fix it; the
    command line prints it alone (`--verbose` adds the traceback).
    """
