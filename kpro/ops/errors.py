"""The ops layer's one error type, below both the dispatcher and the kernel libraries that raise it."""


class BackendError(RuntimeError):
    """A backend was asked for a call it cannot run."""
