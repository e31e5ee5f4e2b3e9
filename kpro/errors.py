"""Errors shared by layers that cannot import each other (checkpoints, and the process-group helpers
they and the trainer use)."""


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded as the model it claims to be, or a save that failed."""


class DirectoryInUse(RuntimeError):
    """An output directory another process is running in (kpro._run_lock)."""
