"""The one error type for bad input: a config field, a file, a key, the shape of the user's data.

Commands print it as one line and exit with status 2; every other exception is a bug and keeps its traceback. It
is a ValueError, so code that caught the library's ValueErrors before still catches it.
"""


class UserError(ValueError):
    """Bad input from the user, named in one line (the file, field or key, and what is wrong with it)."""
