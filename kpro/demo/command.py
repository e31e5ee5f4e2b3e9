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
    p.add_argument("--out", default="kpro-reproduce", type=directory_path, help="directory for models and results (default ./kpro-reproduce)")
    p.add_argument("--seed", type=int, default=0, help="seed of the models, data and sampling; a reproduction over "
                   "seeds runs S, S+1, ... (default 0)")
    p.set_defaults(run=cmd_reproduce)


def cmd_reproduce(args) -> None:
    from . import REPRODUCTIONS, reproduce

    if args.name is None:
        for name, entry in REPRODUCTIONS.items():
            print(f"{name}: {entry.summary}\n  takes {entry.duration}; needs: {entry.needs}")
        return
    reproduce(args.name, Path(args.out), seed=args.seed)
