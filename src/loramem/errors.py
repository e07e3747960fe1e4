"""The one exception type for problems the user can fix (bad input, bad settings).

The CLI turns it into a one-line message and exit code 2; the server into a 4xx.
Anything else escaping is a bug.
"""


class LoramemError(ValueError):
    """A user-facing error: its message is one line that names the problem."""
