"""A `python -m kpro` command under torchrun: `torchrun ... tests/_dist_command.py internalize --out ...`, run as
`python -m kpro` runs it (kpro.cli.main leaves the process group before the process exits)."""
import sys

from kpro.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
