"""The one base of every error that a user can act on: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """Bad input, a folder in the wrong state, a model that cannot be used: the message says what to do instead."""
