"""Errors every layer shares: the refusal of a bad argument, and how an exception reads on one line."""


class UsageError(ValueError):
    """A path, option or model given by the user is missing or unusable (the CLI exits with status 2)."""


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``, for error records and one-line refusals."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
