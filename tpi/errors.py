"""User-facing errors.

Anything raised as a TpiError is printed by the CLI as one line and a non-zero
exit code; anything else is a bug and gets a traceback only with TPI_DEBUG=1.
"""


class TpiError(Exception):
    """An error the user can act on; its message is shown verbatim."""


class ModelError(TpiError):
    """The model directory or file is missing, malformed or unsupported."""


class CheckpointError(ModelError):
    """A weights file is missing, truncated or corrupt."""


class UnsupportedModelError(ModelError):
    """The architecture or one of its options is not implemented."""


class PromptError(TpiError):
    """The prompt cannot be run (empty, longer than the context window)."""
