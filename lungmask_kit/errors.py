"""Library errors. The CLI turns these into a one-line stderr message and an exit code."""


class LungkitError(Exception):
    """A user-facing failure with a clear message (bad input, bad weights, offline download...)."""

    exit_code = 2


class NoImagesError(LungkitError):
    exit_code = 3


class WeightsError(LungkitError):
    exit_code = 4


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, so that no `except Exception` on the way (ours, typer's)
    swallows it; the CLI ends with exit status 128 + signal number."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
