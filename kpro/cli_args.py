"""Argument types and checks that every subcommand shares, below both `kpro.cli` (which collects the
subcommands) and each method's `command.py`. Nothing here imports torch until it is used: building the
parsers (`python -m kpro --help`, `info`) must not pay for it."""
from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from pathlib import Path

from ._numbers import MAX_SEED
from ._torchrun import world_size

DEVICE_HELP = "cpu, cuda or cuda:N; auto: cuda when torch sees a GPU, else cpu"


class _TorchDtypes(Mapping):
    """{"float32": torch.float32, ...}: the names without torch, the dtypes (importing torch) on lookup."""

    NAMES = ("bfloat16", "float16", "float32", "float64")

    def __getitem__(self, name: str):
        if name not in self.NAMES:
            raise KeyError(name)
        import torch

        return getattr(torch, name)

    def __iter__(self):
        return iter(self.NAMES)

    def __len__(self) -> int:
        return len(self.NAMES)


DTYPES = _TorchDtypes()


class HelpFormatter(argparse.HelpFormatter):
    """Every subcommand's help formatter: an option's default follows its help text, unless the text names
    it already or there is none to show (a flag, whose default is its absence: `--no-save-frozen`'s stored True
    read as the flag being on; a required option)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if ("default" in text or not action.option_strings or action.required or action.nargs == 0
                or action.default is None or action.default is argparse.SUPPRESS):
            return text
        return f"{text} (default: %(default)s)"


def add_device_argument(parser, help: str = DEVICE_HELP) -> None:
    """`--device`, default auto, the same in every command (resolve it with `resolve_device`)."""
    parser.add_argument("--device", default="auto", help=f"{help} (default: auto)")


def resolve_device(device: str | None) -> str:
    """"auto" (or None): "cuda" when torch sees a GPU, else "cpu"; any other name is checked by `check_device`."""
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    check_device(device)
    return device


def check_device(device: str) -> None:
    """A one-line error for a device kpro does not run on (meta, mps, xpu, ...: torch parses them, then fails deep
    inside) or this machine does not have."""
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if parsed.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {device}: kpro's commands run on cpu, cuda or cuda:N (or auto), not on "
                         f"{parsed.type} devices")
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA device (CUDA is not available to torch)")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


def in_flag_terms(err: Exception, flags: dict[str, str]) -> ValueError:
    """`err`, a Python API's error, reworded for the command line: each parameter name of `flags` it holds as a
    word (max_new_tokens) becomes the flag the user typed (--max-new-tokens). The API keeps its own wording."""
    pattern = r"(?<![\w-])(" + "|".join(map(re.escape, flags)) + r")\b"  # not a flag already: --workers
    return ValueError(re.sub(pattern, lambda match: flags[match.group(1)], str(err)))


# A resume refused because the run in --out differs from what the flags ask: the commands' one wording (bitune,
# internalize, train-expanded), from the library's structured refusals. `done`: "trained", "tuned".
def other_settings_refusal(out, done: str, lines: Mapping[str, str]) -> ValueError:
    """Several settings: one line a flag, `lines` {flag: "0.01 in the run, 0.001 now"}."""
    return ValueError(f"--out {out} holds a run {done} with other settings than these flags:\n  "
                      + "\n  ".join(f"{flag}: {line}" for flag, line in lines.items())
                      + "\nresume with the run's flags, or pass another --out for a new run")


def fit_setting_flag(name: str, flags: Mapping[str, str]) -> str:
    """The flag of a setting that fit names in a refused resume (an OtherSettings' differences): every param group's
    peak_lr is the one --lr, and its weight_decay --weight-decay (the norms' group has none); the others by `flags`,
    else by their own name (a setting no flag sets: a run in --out that other code set up)."""
    if re.fullmatch(r"optimizer param group \d+ peak_lr", name):
        return "--lr"
    if re.fullmatch(r"optimizer param group \d+ weight_decay", name):
        return "--weight-decay"
    return flags.get(name, name)


def other_setting_refusal(out, done: str, had: str, now: str) -> ValueError:
    """One setting: `had` and `now` as flags ("--seed 0", "--seed 1")."""
    return ValueError(f"--out {out} holds a run {done} with {had}, and this one asks for {now}: resume with the run's, "
                      "or pass another --out for a new run")


def past_steps_refusal(out, step: int, asked: str) -> ValueError:
    """The run in --out is at `step`, past the steps `asked` for ("--steps 3")."""
    return ValueError(f"--out {out} holds a run at step {step}, past {asked}: pass --steps {step} or more to continue "
                      f"it (--steps {step}: it is done), or another --out for a new run")


def ends_in_warmup_refusal(out, err, warmup: str) -> ValueError:
    """The run in --out warms up over more steps than the --steps asked for (`err`, an EndsInWarmup); `warmup`
    says what set it ("5% of the --steps it started with")."""
    return ValueError(f"--out {out} holds a run at step {err.step} whose learning rate warms up over its first "
                      f"{err.warmup} steps ({warmup}): --steps {err.steps} would end within them; pass --steps "
                      f"{err.warmup + 1} or more to continue it, or another --out for a new run")


# parse_size's parameter (and the "size" of its "cannot read size ...") as convert-gguf and expand take it
SHARD_SIZE_FLAG = {"max_shard_size": "--max-shard-size", "size": "--max-shard-size"}


def block_list(text: str) -> list[int]:
    """'4,9,14' -> [4, 9, 14]."""
    try:
        if any(not part.strip() for part in text.split(",")):  # "2,,5": a missing index, not a list of two
            raise ValueError
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected block indices separated by commas (4,9,14), got {text!r}") from None


def user_path(text: str) -> str:
    """A path argument with a leading `~` or `~user` expanded, as the shell does for a word of its own: bash leaves
    `--out=~/x` and a quoted "~/x" as they are, which became a directory named ~ in the current one."""
    return os.path.expanduser(text)


def directory_path(text: str) -> str:
    """An output directory's path: an empty one (an unset `--out "$DIR"`) would be the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a directory, got an empty path (pass . for this directory)")
    return user_path(text)


def input_path(text: str) -> str:
    """A file or directory a command reads: an empty path (an unset `"$CKPT"`) would be the current directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path, got an empty one (pass . for this directory)")
    return user_path(text)


def file_path(text: str) -> Path:
    """A file a command reads, as a Path (`~` expanded; an empty path refused as input_path refuses it)."""
    return Path(input_path(text))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def check_seed(seed: int, flag: str = "--seed") -> None:
    """A seed of a data order (Batches', TokenShards'), named by its flag before anything loads or is read."""
    if not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{flag} must be an integer from 0 to 2**61 - 2 (a larger one would repeat a smaller one's "
                         f"data order), got {seed}")


def check_input_file(path, flag: str) -> None:
    """A file a command reads, named by its flag where it is missing or a directory (not an OS errno)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{flag} {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"{flag} {path} is a directory; give a file")


def check_batch_split(batch_size: int, grad_accum: int | None = None) -> None:
    """--batch-size split evenly across torchrun's processes (and --grad-accum's micro-batches, where the command has
    the flag), refused by the flags before the model loads: fit refuses it only when it starts, naming no flag."""
    processes = world_size()
    parts = processes * (grad_accum or 1)
    if batch_size % parts == 0:
        return
    if grad_accum is None:
        raise ValueError(f"--batch-size {batch_size} must be a multiple of the {processes} processes (torchrun's "
                         "WORLD_SIZE): each optimizer step's rows are split evenly between them; change --batch-size")
    split = f"--grad-accum {grad_accum}" + (
        f" x {processes} processes (torchrun's WORLD_SIZE) = {parts}" if processes > 1 else "")
    raise ValueError(f"--batch-size {batch_size} must be a multiple of {split}: each optimizer step's rows are split "
                     "evenly into that many micro-batches; change --batch-size or --grad-accum")


def check_output_dir(path, flag: str = "--out") -> None:
    """A directory a command writes into: a file in its place, or in the place of a directory above it, or a
    symbolic link to nothing there (which creating it would meet late, as a raw errno), is named by its flag (a
    positional's metavar: DST)."""
    path = Path(path)
    # A link whose target is missing (not made yet, deleted, a disk not mounted): creating the directory fails as
    # "[Errno 17] File exists", late; creating the target could write where the link's disk should be.
    link = next((p for p in (path, *path.parents) if p.is_symlink() and not p.exists()), None)
    if link is not None:
        raise FileNotFoundError(f"{flag} {path}: {link} is a symbolic link to {os.readlink(link)}, which does not "
                                "exist; create it, or pass another directory")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{flag} {path} is a file; give a directory")
    file = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
    if file is not None:
        raise NotADirectoryError(f"{flag} {path}: {file} is a file, not a directory")
