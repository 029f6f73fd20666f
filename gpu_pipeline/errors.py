"""The one error every layer may raise for a bad argument: the command line turns it into one line and exit 2."""


class UsageError(ValueError):
    """A path, option or model given by the user is missing or unusable (the CLI exits with status 2)."""
