"""`python -m kpro reproduce [NAME]`: run a registered reproduction (kpro.demo.REPRODUCTIONS), or list them."""
from __future__ import annotations

from pathlib import Path


def add_parsers(sub) -> None:
    from ..cli_args import directory_path
    from . import REPRODUCTIONS

    p = sub.add_parser("reproduce", help="reproduce a paper's experiment at CPU scale (longer than the demo)",
                       description="Run a named reproduction; without a name, list them with what they need and how "
                                   "long they take. Choices: " + ", ".join(REPRODUCTIONS))
    p.add_argument("name", nargs="?", help="reproduction to run")
    # Defaults None: given without a NAME, they are refused rather than ignored
    p.add_argument("--out", type=directory_path, help="directory for models and results (default ./kpro-reproduce)")
    p.add_argument("--seed", type=int, help="seed of the models, data and sampling (default 0); a reproduction "
                   "over seeds adds S to each of its seeds: bitune-seeds runs S to S+4, expansion-curves S and S+4")
    p.set_defaults(run=cmd_reproduce)


def cmd_reproduce(args) -> None:
    from . import REPRODUCTIONS, reproduce

    if args.name is None:
        given = [f"--{name}" for name in ("out", "seed") if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} for running a reproduction, and "
                             "none is named: give a reproduction's NAME (python -m kpro reproduce alone lists them)")
        for name, entry in REPRODUCTIONS.items():
            print(f"{name}: {entry.summary}\n  takes {entry.duration}; needs: {entry.needs}")
        return
    result = reproduce(args.name, Path(args.out or "kpro-reproduce"), seed=0 if args.seed is None else args.seed)
    if isinstance(result, dict) and "skipped" in result:  # what it needs is not installed: it printed `skipped: ...`
        raise ValueError(f"reproduce {args.name} did not run: {result['skipped']}")
