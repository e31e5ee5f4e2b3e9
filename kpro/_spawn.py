"""What a parent of spawned worker processes (the demo's pool, tokenize's) needs to know about them."""
from __future__ import annotations

import sys


def spawn_imports_main() -> bool:
    """Whether spawned workers import the caller's main module again (multiprocessing's rule): a script's or a
    module's run by name, not a package's `__main__` (`python -m kpro`), `python -c`'s or an interactive
    session's. Where they do, a script that starts workers outside `if __name__ == "__main__":` makes each
    worker run it again, and the workers die starting."""
    main = sys.modules.get("__main__")
    name = getattr(getattr(main, "__spec__", None), "name", None)
    if name is not None:
        return name != "__main__" and not name.endswith(".__main__")
    return getattr(main, "__file__", None) is not None
