"""The one exception type for a user's mistake: the runner prints its message as one
line and exits non-zero, with no traceback and no record."""


class UserError(Exception):
    """Bad input: the message says what is wrong and what is allowed."""
