"""The base of every error a user can fix (bad spec, missing data, unusable backbone, ...).

The CLI prints these as one line and exits with code 2; anything else is a bug and shows a traceback.
"""


class UserError(Exception):
    """A problem in what the user asked for; the message names the file/key/value and the fix."""
