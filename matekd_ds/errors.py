"""User-facing errors: the CLI prints these as one line and exits non-zero."""


class MatekdError(Exception):
    """A problem with the user's input (config, data, models) that has a one-line explanation."""


class RunFailed(Exception):
    """The run cannot go on, for a reason found after it started (no usable checkpoint, no port
    for the process group): one line and exit 1, and metrics.json says "failed" once it exists."""
