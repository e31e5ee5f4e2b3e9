"""Which command's run an output directory holds: `python -m kpro train-expanded`, `internalize` and `bitune` each
record theirs in --out's RUN_RECORD before they write anything else there, and refuse another command's run in one
line, where resuming it failed later in the library's terms.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

from ._files import write_atomic
from ._run_lock import LOCK_FILE
from ._torchrun import is_main_process

RUN_RECORD = "kpro_run.json"  # which command's run an --out holds: {"command": "internalize"}


@contextlib.contextmanager
def claimed_run_directory(out, command: str):
    """For the block, --out as `command`'s run directory: one holding another command's run, named by the
    RUN_RECORD each training command writes there, is refused (resumed by this one, it failed in the library's
    terms: an optimizer state that does not fit, a run past --steps; internalize wrote its generated data into it
    first); else this command's is recorded, on the main process, before the block writes anything. A block that
    fails having written nothing there takes the record back (and --out and the folders above it, where it made
    them). A run directory of an older kpro has no record: taken."""
    out = Path(out)
    record = out / RUN_RECORD
    try:
        found = json.loads(record.read_text(encoding="utf-8"))
        kind = found.get("command") if isinstance(found, dict) else None
    except FileNotFoundError:
        found = kind = None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"--out {out}: {record} cannot be read ({err}); it records which command's run the "
                         "directory holds: pass another --out, or remove it if the directory holds no run") from None
    if found is not None and not isinstance(kind, str):
        raise ValueError(f"--out {out}: {record} does not name the command whose run the directory holds: pass "
                         "another --out")
    if found is not None and kind != command:
        raise ValueError(f"--out {out} holds a run of the {kind} command (its {RUN_RECORD} says so), not of "
                         f"{command}: pass another --out")
    made_record = found is None and is_main_process()
    made_dirs = []  # --out and the folders above it this call creates, innermost first
    for path in (out, *out.parents):
        if path.exists():
            break
        made_dirs.append(path)
    before = {entry.name for entry in out.iterdir()} - {LOCK_FILE} if out.is_dir() else set()
    if made_record:
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(record, json.dumps({"command": command}) + "\n")
    try:
        yield
    except BaseException:
        # Written nothing of its own: the directory is as it was (another command's run of an older kpro, with no
        # record, must not become this one's), and so are the folders above it
        now = {entry.name for entry in out.iterdir()} - {RUN_RECORD, LOCK_FILE} if out.is_dir() else None
        if made_record and now == before:
            record.unlink(missing_ok=True)
            for path in made_dirs:
                with contextlib.suppress(OSError):  # one holding a lock file another run keeps stays
                    path.rmdir()
        raise
