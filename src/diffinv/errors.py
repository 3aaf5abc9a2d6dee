"""The one base of every error that a user can act on: the CLI prints its message as one line and exits 2."""


class UserError(Exception):
    """Bad input, a folder in the wrong state, a model that cannot be used: the message says what to do instead."""


def brief(value: object, limit: int = 120) -> str:
    """``repr(value)`` cut to about ``limit`` characters, without building the whole of a huge value's repr first."""
    import reprlib

    short = reprlib.Repr()
    short.maxlevel, short.maxstring, short.maxother = 3, limit, limit
    short.maxlist = short.maxtuple = short.maxdict = short.maxset = 8
    text = short.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
