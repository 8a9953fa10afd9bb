"""The base of every error a user can fix (bad spec, missing data, unusable backbone, ...).

The CLI prints these as one line and exits with code 2; anything else is a bug and shows a traceback.
"""


class UserError(Exception):
    """A problem in what the user asked for; the message names the file/key/value and the fix."""


class SearchInterrupted(KeyboardInterrupt):
    """A search stopped by Ctrl-C (SIGINT) after its state was saved; the message says how far it got
    and how to continue. The CLI prints it and exits with code 130, like any interrupted command."""
