"""Observability: a progress line for people and a JSONL metrics file for programs."""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from .._files import write_atomic
from .._numbers import is_integer


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class StatusLine:
    """One status line on `stream`: redrawn in place on a terminal (at most ~10 times a second, always when
    `final`, which ends it with a newline); elsewhere (a log file, a pipe) printed whole at each `milestone`
    the caller names."""

    def __init__(self, stream):
        self.stream = stream
        self.tty = hasattr(stream, "isatty") and stream.isatty()
        self.last_draw = 0.0
        self.line_open = False  # a terminal line drawn without its newline yet

    def show(self, line: str, *, milestone: bool, final: bool = False) -> None:
        if self.tty:
            now = time.perf_counter()
            if final or now - self.last_draw > 0.1:
                self.stream.write("\r\033[K" + line + ("\n" if final else ""))
                self.last_draw, self.line_open = now, not final
        elif milestone:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """End an in-place line that stopped before its final draw (an interrupted run)."""
        if self.line_open:
            self.stream.write("\n")
            self.stream.flush()
            self.line_open = False


PROGRESS_SECONDS = 10  # off a terminal, a CountProgress line after this long without one (convert-gguf's pace)
LOG_SECONDS = 60  # off a terminal, a training's progress line at least this often (besides every 5% of its steps)


class CountProgress:
    """`mc.jsonl: 120/160 choices scored in 0:42, eta 0:14`, as a `progress(done, total)` callback, for work
    counted in items that says nothing until it ends (scoring a file, decoding a set). On `stream` (default
    stderr): redrawn in place on a terminal, elsewhere a line once `seconds` (default PROGRESS_SECONDS) have
    passed since the start or the last line, and none when the count is done: the caller prints its result.
    As a context manager, it closes the line however the block ends."""

    def __init__(self, what: str, unit: str, *, stream=None, seconds: float | None = None):
        self.what, self.unit = what, unit
        self.line = StatusLine(sys.stderr if stream is None else stream)  # progress, not a result: stdout stays free
        self.seconds = PROGRESS_SECONDS if seconds is None else seconds
        self.start = self.said = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        elapsed = now - self.start
        eta = elapsed / done * (total - done) if done else math.inf
        last = done >= total
        milestone = not last and now - self.said >= self.seconds
        if milestone:
            self.said = now
        self.line.show(f"{self.what}: {done:,}/{total:,} {self.unit} in {format_duration(elapsed)}, "
                       f"eta {format_duration(eta)}", milestone=milestone, final=last)

    def close(self) -> None:
        """End an in-place line that stopped before the count was done (an error, Ctrl-C)."""
        self.line.close()

    def __enter__(self) -> "CountProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ProgressLine:
    """`step 120/600  loss 1.2345  lr 3.00e-04  51,234 tok/s  eta 1:02`.

    On `stream` (default stderr). On a terminal the line is redrawn in place (at most ~10 times a second);
    elsewhere (a log file, a pipe) a full line is printed every `every` steps and at the last step; by default
    (`every` None) every 5% of the steps, and once LOG_SECONDS have passed without a line (a long run's 5% can
    take hours). Speed and ETA count this session's steps only, so a resumed run is not credited with time it did
    not spend.
    """

    def __init__(self, total_steps: int, start_step: int = 0, *, stream=None, every: int | None = None):
        self.total, self.start_step = total_steps, start_step
        self.line = StatusLine(sys.stderr if stream is None else stream)  # progress, not a result: stdout stays free
        if every is not None and (not is_integer(every) or every < 1):
            raise ValueError(f"every must be a positive integer or None (every 5% of the steps), got {every!r}")
        self.every = int(every) if every is not None else max(1, (total_steps - start_step) // 20)
        self.seconds = LOG_SECONDS if every is None else math.inf  # a step count asked for is kept to
        self.start = self.said = time.perf_counter()
        self.tokens = 0

    def update(self, step: int, loss: float, lr: float, tokens: int) -> None:
        self.tokens += tokens
        now = time.perf_counter()
        elapsed = now - self.start
        done = step - self.start_step
        eta = elapsed / done * (self.total - step) if done else math.inf
        last = step == self.total
        milestone = last or done % self.every == 0 or now - self.said >= self.seconds
        if milestone:
            self.said = now
        self.line.show(f"step {step:5d}/{self.total}  loss {loss:.4f}  lr {lr:.2e}  "
                       f"{self.tokens / max(elapsed, 1e-9):,.0f} tok/s  eta {format_duration(eta)}",
                       milestone=milestone, final=last)

    def close(self) -> None:
        """End an in-place line that stopped before the last step (an interrupted run)."""
        self.line.close()


class MetricsLog:
    """One JSON object per step in `path`, appended and flushed as the run goes.

    Resuming from step s first drops the lines of steps after s (steps the interrupted run did but no
    checkpoint kept), so the file tells the history of the weights being trained, each step once.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int = 0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step == 0:
            self.path.write_text("")
        elif self.path.exists():
            kept = [json.dumps(record) for record in read_metrics(self.path) if record.get("step", 0) <= resume_step]
            # removed where the write fails (a full disk, Ctrl-C), which names the file
            write_atomic(self.path, "".join(line + "\n" for line in kept))
        self.file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record, sort_keys=False) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics file, in order.

    A last line cut short (the process died while writing it) is dropped: that step was never
    checkpointed. Any other line that is not a JSON object is an error naming the file and line.
    """
    path = Path(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):
                break
            raise ValueError(f"{path}:{number}: not a JSON record ({err})") from None
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{number}: not a JSON object")
        records.append(record)
    return records


def last_logged_step(path: str | os.PathLike) -> int:
    """The step of the last whole line of a metrics file (0 before its first step, or with no file): what
    `read_metrics(path)[-1]["step"]` gives, read from the file's end, so that polling a long run costs little.
    The window read doubles until it holds a whole record, however long the records are."""
    try:
        with open(path, "rb") as file:
            size, window = file.seek(0, 2), 4096
            while True:
                file.seek(max(0, size - window))
                lines = file.read().split(b"\n")
                whole = lines if window >= size else lines[1:]  # the first may be cut by the seek
                for line in reversed(whole):
                    try:
                        return int(json.loads(line)["step"])
                    except (ValueError, KeyError, TypeError):  # the line being written, or the empty one after the last
                        continue
                if window >= size:
                    return 0
                window *= 2
    except FileNotFoundError:
        return 0
