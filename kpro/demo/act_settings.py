"""What an act ran with, recorded in its output directory, and the checks of what it is given.

An act resumes each of its training runs from the checkpoints in its directory. Rerun there with other
settings (another --seed, a changed keyword, or defaults a newer kpro changed), some runs would be refused
half-way through the act, and others resumed: an internalized model trained on from an explicit-CoT model that
is no longer the one beside it, reported as if one run had made both. So the first run records its settings
(`act_settings.json`), and a rerun with others is refused before any work, each difference named. A directory
written before kpro recorded settings is taken as it is.
"""
from __future__ import annotations

import functools
import inspect
import json
import math
from pathlib import Path
from typing import Callable

from .._files import write_atomic
from .._numbers import MAX_SEED
from .._run_lock import LOCK_FILE, holding

SETTINGS_FILE = "act_settings.json"
UNRECORDED = ("out_dir", "workers")  # where an act runs and in how many processes: neither changes a number


def records_settings(validate: Callable[..., None] | None = None,
                     where: Callable[[Path], Path] = lambda out_dir: out_dir):
    """Decorator of an act `act(out_dir, **settings)`: `validate(**arguments)` refuses bad ones, then the
    settings are checked against those recorded in `where(out_dir)`, or recorded there, before the act runs.
    The act gains `.check(out_dir, **settings)`, the same checks without writing, for a caller about to run
    several acts, and `.directories(out_dir)`, out_dir and where(out_dir)."""
    def decorate(act):
        signature = inspect.signature(act)

        def settings_of(args, kwargs) -> tuple[Path, dict]:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            if validate is not None:
                validate(**bound.arguments)
            out_dir = Path(bound.arguments["out_dir"])
            return where(out_dir), {"act": act.__name__, **{name: value for name, value in bound.arguments.items()
                                                           if name not in UNRECORDED}}

        @functools.wraps(act)
        def run(*args, **kwargs):
            directory, settings = settings_of(args, kwargs)
            check_settings(directory, settings)  # before creating the directory: a file there is named as such
            with holding(directory):  # one run at a time there (a second would resume from the first's checkpoints)
                fresh = check_settings(directory, settings) is None
                if fresh:
                    write_atomic(directory / SETTINGS_FILE, json.dumps(_as_json(settings), indent=1) + "\n")
                try:
                    result = act(*args, **kwargs)
                except BaseException:
                    # failed before writing anything beside the settings: nothing a rerun with others would mix with
                    if fresh and {p.name for p in directory.iterdir()} <= {SETTINGS_FILE, LOCK_FILE}:
                        (directory / SETTINGS_FILE).unlink(missing_ok=True)
                    raise
                if fresh and isinstance(result, dict) and "skipped" in result:  # nothing ran: nothing to keep
                    (directory / SETTINGS_FILE).unlink(missing_ok=True)
                return result

        run.check = lambda *args, **kwargs: check_settings(*settings_of(args, kwargs))
        run.directories = lambda out_dir: list(dict.fromkeys([Path(out_dir), where(Path(out_dir))]))
        return run
    return decorate


def check_settings(directory: Path, settings: dict) -> dict | None:
    """The settings recorded in `directory` (None where none are), refusing other ones than `settings`."""
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} is a file, not a directory: the act writes its runs there")
    path = directory / SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is unreadable ({err}): delete {directory} to start that act over") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} holds a JSON {type(saved).__name__}, not the settings kpro writes: delete "
                         f"{directory} to start that act over")
    mine = _as_json(settings)
    if saved != mine:
        keys = [key for key in {**mine, **saved} if saved.get(key, "(none)") != mine.get(key, "(none)")]
        differences = "; ".join(f"{key} {saved.get(key, '(none)')!r} there, {mine.get(key, '(none)')!r} now"
                                for key in keys)
        raise ValueError(f"{directory} holds a run with other settings ({differences}): its checkpoints would "
                         f"mix with this run's; pass another output directory (--out), or delete {directory} "
                         "to start over")
    return saved


def _as_json(settings: dict) -> dict:
    """The settings as the file reads back (tuples as lists, paths as strings)."""
    return json.loads(json.dumps(settings, default=str))


def check_positive(act: str, **values) -> None:
    """Refuse, before any training, a count below 1, a rate that is not a positive number, or a seed outside
    Batches' range (a larger one would repeat a smaller one's data order), each by its name."""
    for name, value in values.items():
        if name == "seed":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
                raise ValueError(f"{act}: seed must be an integer from 0 to 2**61 - 2, got {value!r}")
        elif name in ("lr", "explicit_lr"):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not 0 < value < math.inf):
                raise ValueError(f"{act}: {name} must be a positive number, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{act}: {name} must be an integer >= 1, got {value!r}")
    seed, seeds = values.get("seed"), values.get("seeds")
    if isinstance(seed, int) and isinstance(seeds, int) and seed + seeds > MAX_SEED + 1:  # seeds S, S + 1, ...
        raise ValueError(f"{act}: seeds {seed} to {seed + seeds - 1} pass 2**61 - 2, the largest seed Batches takes: "
                         f"start at {MAX_SEED + 1 - seeds} or below")
