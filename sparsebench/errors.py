"""The error types the tool turns into one-line messages.

Anything derived from `UserError` is the user's to fix (a bad suite, a missing GPU, a
corrupt file): the CLI prints its message on one line and exits 2, with no traceback.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the input or the machine that the user can fix."""

    exit_code = 2


class ConfigError(UserError):
    """A setting is invalid; the message starts with the key (and file) at fault."""


class CellSkipped(UserError):
    """A cell cannot run on this machine (no GPU, no compiler for the custom op, ...).

    The worker records cells that raise it as `skipped: <reason>`, never as a failure.
    """

    def __init__(self, reason: str, message: str | None = None):
        super().__init__(message or reason)
        self.reason = reason


class NoGPUError(CellSkipped):
    """A GPU device was asked for where TensorFlow sees none: `skipped: no GPU`."""

    def __init__(self, message: str = "no GPU: TensorFlow sees no GPU device on this machine"):
        super().__init__("no GPU", message)
