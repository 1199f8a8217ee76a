"""Library errors. The CLI turns these into a one-line stderr message and an exit code."""


class LungkitError(Exception):
    """A user-facing failure with a clear message (bad input, bad weights, offline download...)."""

    exit_code = 2


class NoImagesError(LungkitError):
    exit_code = 3


class WeightsError(LungkitError):
    exit_code = 4
