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

from ..train.data import read_jsonl

PROMPT_TEMPLATE = "Question: {instruction}\n\nAnswer:"
CHOICES_TEMPLATE = "Question: {question}\n\nChoices:\n{choices}\n\nAnswer:"  # one choice a line


@dataclasses.dataclass
class Instruction:
    instruction: str
    response: str


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
        if not isinstance(row.get("instruction"), str) or not isinstance(response, str):
            raise ValueError(f"{path}:{number}: needs string fields 'instruction' and 'response' (or 'output')")
        instruction = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        examples.append(Instruction(instruction, response))
    return examples


def read_multiple_choice(path: str | os.PathLike) -> list[MultipleChoice]:
    """JSONL with `question`, `choices` (strings) and `answer` (the index of the right choice, or its text)."""
    questions = []
    for number, row in read_jsonl(path):
        choices, answer = row.get("choices"), row.get("answer")
        if not isinstance(row.get("question"), str) or not isinstance(choices, list) or len(choices) < 2 \
                or not all(isinstance(c, str) for c in choices):
            raise ValueError(f"{path}:{number}: needs 'question' (string) and 'choices' (two or more strings)")
        if isinstance(answer, str) and answer in choices:
            answer = choices.index(answer)
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise ValueError(f"{path}:{number}: 'answer' must be a choice index in [0, {len(choices)}) or a choice's text")
        questions.append(MultipleChoice(row["question"], choices, answer))
    return questions


def multiple_choice_prompt(question: "MultipleChoice") -> str:
    """`Question: q\\n\\nChoices:\\nc1\\nc2…\\n\\nAnswer:`, the prompt of the paper's multiple-choice evaluation."""
    return CHOICES_TEMPLATE.format(question=question.question, choices="\n".join(question.choices))


def encode_pair(tok, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of `<bos> prompt` and of the answer as it continues the prompt (tokenized together, so a
    SentencePiece model splits the boundary as it would in running text)."""
    prompt_ids = tok.encode(prompt, bos=True)
    full = tok.encode(prompt + answer, bos=True)
    if full[:len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        return prompt_ids, full[len(prompt_ids):]
    return prompt_ids, tok.encode(answer, bos=False)


def tokenize_instructions(tok, examples: Sequence[Instruction], max_length: int) -> tuple[list, int]:
    """(prompt_ids, answer_ids + eos) pairs of at most `max_length` tokens, and how many were dropped."""
    pairs, dropped = [], 0
    for example in examples:
        prompt, answer = encode_pair(tok, PROMPT_TEMPLATE.format(instruction=example.instruction), " " + example.response)
        answer = answer + [tok.eos_id]
        if len(prompt) + len(answer) > max_length:
            dropped += 1
        else:
            pairs.append((prompt, answer))
    return pairs, dropped
