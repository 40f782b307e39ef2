"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class MatekdError(Exception):
    """A problem with the user's input (config, data, models) that has a one-line explanation."""
