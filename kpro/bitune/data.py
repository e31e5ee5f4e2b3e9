"""Instruction data for Bitune (and plain LoRA): instruction/response and multiple-choice JSONL files, and
their prompts and answers as token ids.

Data follows the Bitune reference: the prompt is `Question: {instruction}\\n\\nAnswer:` and the answer
`" " + response + eos`; the loss covers the answer only. Examples longer than `max_length` tokens are
dropped and counted. Multiple-choice questions are asked as the paper's evaluation asks them, the choices
listed in the prompt (`Question: q\\n\\nChoices:\\nc1\\nc2\\n\\nAnswer:`), each scored as the answer `" " + choice`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

from .._numbers import is_integer
from ..tokenizer import checked_ids, special_token_in
from ..train.data import read_jsonl

PROMPT_TEMPLATE = "Question: {instruction}\n\nAnswer:"
CHOICES_TEMPLATE = "Question: {question}\n\nChoices:\n{choices}\n\nAnswer:"  # one choice a line


@dataclasses.dataclass
class Instruction:
    instruction: str
    response: str
    # "FILE:LINE" where read_instructions read it, to name it in errors (an index among the rows is not its line)
    where: str | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass
class MultipleChoice:
    question: str
    choices: list[str]
    answer: int  # index of the right choice


def read_instructions(path: str | os.PathLike) -> list[Instruction]:
    """JSONL with `instruction` (and an optional `input`, appended after a blank line) and `response`
    (or `output`)."""
    examples = []
    for number, row in read_jsonl(path):
        response = row.get("response", row.get("output"))
        if "response" in row and "output" in row and row["response"] != row["output"]:
            raise ValueError(f"{path}:{number}: has both 'response' and 'output', and they differ: which is the answer?")
        if not isinstance(row.get("instruction"), str) or not isinstance(response, str):
            raise ValueError(f"{path}:{number}: needs string fields 'instruction' and 'response' (or 'output')")
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):  # its repr would become part of the prompt
            raise ValueError(f"{path}:{number}: 'input' must be a string, got {type(extra).__name__}")
        instruction = row["instruction"] + (f"\n\n{extra}" if extra else "")
        examples.append(Instruction(instruction, response, where=f"{path}:{number}"))
    return examples


def read_multiple_choice(path: str | os.PathLike) -> list[MultipleChoice]:
    """JSONL with `question`, `choices` (strings) and `answer` (the index of the right choice, or its text)."""
    questions = []
    for number, row in read_jsonl(path):
        choices, answer = row.get("choices"), row.get("answer")
        if isinstance(answer, str) and isinstance(choices, list) and answer in choices:
            index = int(answer) if answer.isascii() and answer.isdigit() else None
            if index is not None and index < len(choices) and choices.index(answer) != index:
                raise ValueError(f"{path}:{number}: 'answer' {answer!r} is both the text of choice "
                                 f"{choices.index(answer)} and the index of choice {index}: which is it? Give "
                                 "the index as a number")
            answer = choices.index(answer)
        question = MultipleChoice(row.get("question"), choices, answer)
        check_multiple_choice(question, f"{path}:{number}")
        questions.append(question)
    return questions


def check_multiple_choice(question: "MultipleChoice", where: str) -> None:
    """A question string, two or more distinct choices with some text (an empty choice would be scored as an
    answer of no tokens, log-likelihood 0, and always win; twins make the right one depend on the tie), and the
    index of the right one."""
    choices = question.choices
    if not isinstance(question.question, str) or not isinstance(choices, list) or len(choices) < 2 \
            or not all(isinstance(c, str) for c in choices):
        raise ValueError(f"{where}: needs 'question' (string) and 'choices' (two or more strings)")
    if not all(c.strip() for c in choices):
        raise ValueError(f"{where}: choice {next(i for i, c in enumerate(choices) if not c.strip())} is empty")
    if any("\n" in c for c in choices):  # the prompt lists one choice a line: it would read as two choices
        raise ValueError(f"{where}: choice {next(i for i, c in enumerate(choices) if chr(10) in c)} holds a line "
                         "break; the prompt lists the choices one a line")
    if len(set(choices)) < len(choices):
        twin = next(c for c in choices if choices.count(c) > 1)
        raise ValueError(f"{where}: choice {twin!r} is listed twice; the choices must differ")
    answer = question.answer
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
        raise ValueError(f"{where}: 'answer' must be a choice index in [0, {len(choices)}) or a choice's text, got "
                         f"{answer!r}")


def check_pairs(pairs, vocab_size: int, limit: int) -> None:
    """Refuse, before any training, the first example that is not a (prompt ids, answer ids) pair of
    non-empty token ids in the vocabulary within the model's `limit` positions, naming its index in `pairs`
    (a batch would name its place in the batch, steps later)."""
    for i, pair in enumerate(pairs):
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"example {i} must be a (prompt_ids, answer_ids) pair, got {pair!r:.60}")
        for part, ids in zip(("prompt", "answer"), pair):
            if not checked_ids(ids, vocab_size, f"example {i} {part}"):
                raise ValueError(f"example {i} has an empty {part}; both need tokens")
    check_positions(pairs, limit, "example")


def check_positions(pairs, limit: int, what: str) -> None:
    """Refuse the first (prompt, answer) pair longer than the model's `limit` positions, naming it."""
    for i, (prompt, answer) in enumerate(pairs):
        if len(prompt) + len(answer) > limit:
            raise ValueError(f"{what} {i} takes {len(prompt) + len(answer)} tokens, more than the model's "
                             f"max_position_embeddings={limit}")


def multiple_choice_prompt(question: "MultipleChoice") -> str:
    """`Question: q\\n\\nChoices:\\nc1\\nc2…\\n\\nAnswer:`, the prompt of the paper's multiple-choice evaluation."""
    return CHOICES_TEMPLATE.format(question=question.question, choices="\n".join(question.choices))


def encode_pair(tok, prompt: str, answer: str, prompt_ids: list[int] | None = None) -> tuple[list[int], list[int]]:
    """Token ids of `<bos> prompt` and of the answer as it continues the prompt (tokenized together, so a
    SentencePiece model splits the boundary as it would in running text). The prompt's tokens must be a prefix
    of prompt + answer's (the built-in templates end in "Answer:" and the answers start with a space).
    `prompt_ids`: the prompt's `tok.encode(prompt, bos=True, eos=False)`, where already encoded."""
    if prompt_ids is None:
        prompt_ids = tok.encode(prompt, bos=True, eos=False)
    full = tok.encode(prompt + answer, bos=True, eos=False)
    if full[:len(prompt_ids)] != prompt_ids:
        # Tokenizing the answer alone would change the text (SentencePiece adds a leading space: "Answer: " +
        # "Paris" would read "Answer:  Paris"), and no split of the joint tokens is the prompt's
        raise ValueError(f"the boundary between the prompt's end {prompt[-8:]!r} and the answer's start "
                         f"{answer[:8]!r} falls inside a token (prompt + answer tokenize otherwise than the prompt "
                         "alone, as where the prompt ends in a space that joins the answer's first word): end the "
                         "prompt where a token ends, with the space at the start of the answer")
    return prompt_ids, full[len(prompt_ids):]


def tokenize_instructions(tok, examples: Sequence[Instruction], max_length: int) -> tuple[list, int]:
    """(prompt_ids, answer_ids + eos) pairs of at most `max_length` tokens, and how many were dropped. A bad
    example is named by its file and line where read_instructions read it, else by its index."""
    if not is_integer(max_length) or max_length < 1:  # 0 or 10.5 would drop every example; None fail unnamed
        raise ValueError(f"max_length must be a positive integer, got {max_length!r}")
    max_length = int(max_length)
    pairs, dropped = [], 0
    for i, example in enumerate(examples):
        name = example.where or f"example {i} (from 0)"
        if isinstance(example.response, str) and not example.response.strip():
            # it would train the model to answer a bare space and eos; a multiple-choice question's empty
            # choice is refused alike
            raise ValueError(f"{name}: the response is empty{' (whitespace only)' if example.response else ''}: "
                             "give each instruction the answer to train on, or leave the example out")
        try:
            prompt, answer = encode_pair(tok, PROMPT_TEMPLATE.format(instruction=example.instruction),
                                         " " + example.response)
        except ValueError as err:  # a symbol the tokenizer lacks: say which example
            raise ValueError(f"{name}: {err}") from None
        special = special_token_in(tok, prompt[1:] + answer)
        if special is not None:
            raise ValueError(f"{name}: its text spells the tokenizer's {special} token, which would "
                             "end or restart the sequence there; remove it from the data")
        answer = answer + [tok.eos_id]
        if len(prompt) + len(answer) > max_length:
            dropped += 1
        else:
            pairs.append((prompt, answer))
    return pairs, dropped
