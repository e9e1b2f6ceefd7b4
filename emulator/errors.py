"""The one exception type the CLI turns into a one-line error."""


class LabError(Exception):
    """A problem the user can fix; the message names the fix and fits on one line."""
