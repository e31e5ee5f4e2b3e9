"""Examples in the ICoT line format `input||cot #### answer`, and the published valid/test sets.

The published sets (Deng, Choi, Shieber 2024; MIT License, see data/LICENSE) ship with kpro, unchanged:
4×4, 5×5, 7×7 and 9×9 multiplication (1,000 lines per split) and GSM8K (valid 500, test 1,319).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

INPUT_END = "||"
ANSWER_MARK = "####"

DATA_DIR = Path(__file__).parent / "data"
PUBLISHED_TASKS = {"4x4": "4_by_4_mult", "5x5": "5_by_5_mult", "7x7": "7_by_7_mult", "9x9": "9_by_9_mult",
                   "gsm8k": "gsm8k"}
PUBLISHED_SPLITS = ("valid", "test")


class DataFormatError(ValueError):
    """A line that is not `input||cot #### answer`; the message names the file and line number."""


@dataclass(frozen=True)
class CoTExample:
    """One example: the input, its chain of thought (may be empty) and the answer, each stripped."""

    input: str
    cot: str
    answer: str
    # "FILE:LINE" where read_examples read it, to name it in errors (an index skips the blank lines before it)
    where: str | None = field(default=None, compare=False, repr=False)

    def line(self) -> str:
        """The example in the file format; `parse_line(example.line()) == example`."""
        return f"{self.input}{INPUT_END}{self.cot} {ANSWER_MARK} {self.answer}"


def parse_line(line: str) -> CoTExample:
    """`input||cot #### answer` -> CoTExample; DataFormatError says what is wrong with the line."""
    text = line.rstrip("\r\n")
    if "\ufeff" in text:  # invisible, and not whitespace: it would become part of a symbol
        raise DataFormatError("a byte-order mark (U+FEFF) inside the text, as files joined with `cat` leave at "
                              "each file's start; remove it")
    if text.count(INPUT_END) != 1 or INPUT_END + "|" in text:  # '|||' would leave a '|' in the input or CoT
        raise DataFormatError(f"expected one {INPUT_END!r} after the input, found "
                              + ("'|||'" if INPUT_END + "|" in text else str(text.count(INPUT_END))))
    source, target = text.split(INPUT_END)
    if ANSWER_MARK in source:
        raise DataFormatError(f"{ANSWER_MARK!r} inside the input, before {INPUT_END!r}")
    if target.count(ANSWER_MARK) != 1 or ANSWER_MARK + "#" in target:  # '#####' would leave a '#' in the answer
        raise DataFormatError(f"expected one {ANSWER_MARK!r} before the answer, found "
                              + ("'#####'" if ANSWER_MARK + "#" in target else str(target.count(ANSWER_MARK))))
    cot, answer = target.split(ANSWER_MARK)
    example = CoTExample(source.strip(), cot.strip(), answer.strip())
    if not example.input:
        raise DataFormatError("the input is empty")
    if not example.answer:
        raise DataFormatError(f"the answer after {ANSWER_MARK!r} is empty")
    return example


def read_examples(path: str | os.PathLike, limit: int | None = None) -> list[CoTExample]:
    """Every example of a file (the first `limit`), in order; blank lines are skipped.

    A bad line raises DataFormatError `path:line: what is wrong`. A UTF-8 byte-order mark at the start is
    not part of the first symbol; one further on (files joined with `cat`) is refused.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be an integer >= 0, or None for every example; got {limit!r}")
    examples = []
    try:
        with open(path, encoding="utf-8-sig") as file:
            for number, line in enumerate(file, start=1):
                if limit is not None and len(examples) >= limit:
                    break
                if not line.strip():
                    continue
                try:
                    example = parse_line(line)
                except DataFormatError as err:
                    raise DataFormatError(f"{path}:{number}: {err}: {_excerpt(line)}") from None
                examples.append(CoTExample(example.input, example.cot, example.answer, where=f"{path}:{number}"))
    except UnicodeDecodeError:
        raise DataFormatError(_not_utf8(path)) from None
    return examples


def _not_utf8(path) -> str:
    """`path:line: ...` naming the first line that is not UTF-8 (text files are decoded a block at a time)."""
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as err:
                return (f"{path}:{number}: not UTF-8 text (byte {err.start + 1} of the line, "
                        f"{raw[err.start:err.start + 4]!r}); save the file as UTF-8")
    return f"{path}: not UTF-8 text; save the file as UTF-8"


def published_file(task: str, split: str) -> Path:
    """The published `valid` or `test` file of a task: '4x4', '5x5', '7x7', '9x9' or 'gsm8k'."""
    if task not in PUBLISHED_TASKS:
        raise ValueError(f"unknown task {task!r}; the published ones are {', '.join(PUBLISHED_TASKS)}")
    if split not in PUBLISHED_SPLITS:
        raise ValueError(f"unknown split {split!r}; the published ones are {', '.join(PUBLISHED_SPLITS)} "
                         "(training sets are generated: see multiplication_training_set)")
    return DATA_DIR / PUBLISHED_TASKS[task] / f"{split}.txt"


def read_published(task: str, split: str) -> list[CoTExample]:
    return read_examples(published_file(task, split))


def _excerpt(line: str, width: int = 80) -> str:
    line = line.rstrip("\r\n")
    return repr(line if len(line) <= width else line[:width] + "...")
