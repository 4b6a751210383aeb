"""The one exception type users see: its message is printed as a single line, exit code 1."""


class LipsyncError(Exception):
    """A problem with the user's input or environment, explained in one line (no traceback)."""
