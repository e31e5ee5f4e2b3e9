"""Errors shared by layers that cannot import each other (checkpoints, and the process-group helpers
they and the trainer use)."""


class CheckpointError(RuntimeError):
    """A checkpoint directory that cannot be loaded as the model it claims to be, or a save that failed."""


class StoppedAndSaid(KeyboardInterrupt):
    """A stop on Ctrl-C, SIGTERM or SIGHUP whose line (what was saved, how to resume) is printed already: the
    command line adds no bare "interrupted" after it. A KeyboardInterrupt to every caller."""


class DirectoryInUse(RuntimeError):
    """An output directory another process is running in (kpro._run_lock)."""


class ResumeRefused(Exception):
    """A resume refused because the run asked for is not the checkpoint's: other settings (OtherSettings), other
    trained parameters (OtherParameters), other data or data settings (OtherExamples, OtherSetting), a checkpoint past
    the run's steps (PastSteps), too few plain batches to skip (TooFewBatches). Each is also the type it was before
    this base existed (a CheckpointError or a ValueError) with its own details; `except ResumeRefused` takes them all.
    Nothing was loaded when one is raised, but for a plain iterable's other batch size (OtherSetting "batch_size"),
    which shows only at its first batch, after the load."""


class OtherSettings(ResumeRefused, CheckpointError):
    """A resume refused because the run was set up otherwise than this call asks: `differences` maps each setting
    that differs, named as the message names it, to (the checkpoint's value, this call's). A command says it in its
    own terms (bitune: its flags)."""

    def __init__(self, message: str, differences: dict):
        super().__init__(message)
        self.differences = differences


class OtherParameters(ResumeRefused, CheckpointError):
    """A resume refused because this optimizer trains other parameters than the checkpoint's did: `trained` names
    those the checkpoint's optimizer trained, `now` this one's (state-dict names). A command says it in its own
    terms (train-expanded: its --train-blocks)."""

    def __init__(self, message: str, trained: list, now: list):
        super().__init__(message)
        self.trained, self.now = list(trained), list(now)


def listed(names, limit: int = 4, more: str = ", ...") -> str:
    """The first `limit` of `names`, joined by ", ", and `more` after them when some are left out, so that a
    message names a few and says there are others. `more` may count them: {left} (those left out), {total}."""
    names = [str(name) for name in names]
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + more.format(left=len(names) - limit, total=len(names))


class PastSteps(ResumeRefused, CheckpointError):
    """A resume refused because the checkpoint, at `step`, is past the run's `steps`. A command says it in its flags."""

    def __init__(self, message: str, step: int, steps: int):
        super().__init__(message)
        self.step, self.steps = step, steps


class EndsInWarmup(ResumeRefused, ValueError):
    """A resume refused because the `steps` asked for end within the `warmup` steps of the run at `step` (the
    warmup it started with, which a resume without one keeps). A command says it in its flags."""

    def __init__(self, message: str, step: int, steps: int, warmup: int):
        super().__init__(message)
        self.step, self.steps, self.warmup = step, steps, warmup
