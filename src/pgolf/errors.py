"""The one exception type that means "the user gave us something we cannot use".

The CLI turns it into a single line on stderr and exit code 2; anything else is a bug and keeps
its traceback.
"""


class PgolfError(Exception):
    """Bad input: a missing or malformed file, an impossible setting; the message names it."""
