"""Exact-match accuracy and throughput: batched greedy decoding from `[bos] input <eos>`.

The model writes `cot <eos> #### answer <eos>` (an explicit-CoT model), a shorter CoT (partly
internalized), or `<eos> #### answer <eos>` (no CoT); decoding stops at each row's second generated eos.
The prediction is the text after `####` between the two eos tokens; it is correct when it equals the
reference answer once commas and repeated spaces are dropped (GSM8K writes 1,450,000). A row that never
writes its second eos within `max_new_tokens` is counted wrong, and so is one whose answer holds a special
token (the tokenizer's `special_ids`: decoding would drop it). No CoT is ever removed here: what the model
writes is its own.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from .. import lora
from ..generation import check_sampling, generate
from ..tokenizer import pad_left
from .data import ANSWER_MARK, CoTExample
from .tokenization import tokenize_examples

MARGIN_TOKENS = 8  # default max_new_tokens: the longest reference `cot <eos> #### answer <eos>` plus this


@dataclass(frozen=True)
class Prediction:
    """What the model wrote for one example."""

    ids: tuple[int, ...]  # generated tokens up to and including the second eos (all of them if it never came)
    cot: str              # decoded tokens before the first generated eos
    answer: str | None    # the text after `####` between the first and second eos; None without a `####`
    finished: bool        # the second eos was generated
    correct: bool


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    examples_per_second: float  # examples / seconds of decoding (tokenizing the prompts is not counted)
    seconds: float
    correct: int
    total: int
    predictions: list[Prediction]  # in the order of the examples


def evaluate(model, tokenizer, examples, *, batch_size: int = 64, max_new_tokens: int | None = None,
             bos: bool | None = None, progress: Callable[[int, int], None] | None = None) -> Evaluation:
    """Greedy-decode every example (batches of similar prompt lengths, left-padded) and score the answers.

    `bos` None: prompts open with a bos where the tokenizer has one, as training's (`tokenize_examples`).
    `max_new_tokens` defaults to the longest reference `cot <eos> #### answer <eos>` of `examples`
    (in tokens) plus MARGIN_TOKENS; decoding ends as soon as every row of a batch has stopped.
    `progress(examples decoded, examples)` is called after each batch (a set of 1,000 decodes for minutes
    silently otherwise: `kpro.train.progress.CountProgress` prints it).
    """
    if isinstance(model, lora.AdaptedModel):  # its adapter runs in the plain model's forwards
        with lora.active(model.model, model.adapter):
            return evaluate(model.model, tokenizer, examples, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            bos=bos, progress=progress)
    lora.refuse_idle_adapters(model, "evaluate")
    examples = check_evaluation_examples(examples, batch_size)
    if max_new_tokens is not None:  # generate's own check (greedy), before the position check adds it up
        max_new_tokens = check_sampling(max_new_tokens, 0.0, None, None)[0]
    check_tokenizer_fits(tokenizer, model.config.vocab_size)
    tokenized = tokenize_examples(examples, tokenizer, bos)
    longest_prompt, longest_reference = _longest(tokenized)
    if max_new_tokens is None:
        max_new_tokens = MARGIN_TOKENS + longest_reference
    if longest_prompt + max_new_tokens > model.config.max_position_embeddings:  # before any batch is decoded
        raise ValueError(f"evaluating these examples takes up to {longest_prompt + max_new_tokens} positions (the "
                         f"longest prompt, {longest_prompt} tokens, + max_new_tokens={max_new_tokens}), more than "
                         f"the model's max_position_embeddings={model.config.max_position_embeddings}")
    prompts = [list(t.prompt) for t in tokenized]
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    device = next(model.parameters()).device
    generated: list[list[int]] = [[] for _ in examples]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for first in range(0, len(order), batch_size):
        rows = order[first:first + batch_size]
        ids, mask = pad_left([prompts[i] for i in rows], tokenizer.pad_id, device=device)
        out = generate(model, ids, max_new_tokens, attention_mask=mask, eos_token_id=tokenizer.eos_id,
                       pad_token_id=tokenizer.pad_id, stop_after_eos=2)
        for i, new_ids in zip(rows, out[:, ids.shape[1]:].tolist()):
            generated[i] = new_ids
        if progress is not None:
            progress(first + len(rows), len(order))
    seconds = time.perf_counter() - start
    predictions = [read_prediction(new_ids, example.answer, tokenizer) for new_ids, example in zip(generated, examples)]
    correct = sum(p.correct for p in predictions)
    return Evaluation(accuracy=correct / len(examples), examples_per_second=len(examples) / seconds,
                      seconds=seconds, correct=correct, total=len(examples), predictions=predictions)


def check_tokenizer_fits(tokenizer, vocab_size: int) -> None:
    """A tokenizer with more tokens than the model has embeddings is refused (its ids past them would fail the
    model's first forward, naming neither)."""
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {vocab_size} embeddings")


def check_evaluation_examples(examples, batch_size) -> list[CoTExample]:
    """The examples as a list, refused when empty or not CoTExamples, and a positive batch size."""
    examples = list(examples)
    if not examples:
        raise ValueError("evaluate needs at least one example")
    if not all(isinstance(example, CoTExample) for example in examples):
        raise TypeError("evaluate takes CoTExamples (see read_examples)")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    return examples


def evaluation_positions(examples, tokenizer, bos: bool | None = None) -> int:
    """Positions `evaluate` needs for `examples` with its default max_new_tokens: the longest prompt (a batch
    is padded to its longest) plus the longest reference `cot <eos> #### answer <eos>` plus MARGIN_TOKENS."""
    return sum(_longest(tokenize_examples(examples, tokenizer, bos))) + MARGIN_TOKENS


def _longest(tokenized) -> tuple[int, int]:
    """(the longest prompt `[bos] input <eos>`, the longest reference `cot <eos> #### answer <eos>`), in tokens."""
    return max(t.cot_start for t in tokenized), max(len(t.ids) - t.cot_start for t in tokenized)


def read_prediction(new_ids, reference_answer: str, tokenizer) -> Prediction:
    """Split generated ids at the eos tokens into CoT and answer, and compare with `reference_answer`."""
    new_ids = [int(i) for i in new_ids]
    eos = [t for t, token in enumerate(new_ids) if token == tokenizer.eos_id][:2]
    finished = len(eos) == 2
    if finished:
        new_ids = new_ids[:eos[1] + 1]
    outside = [token for token in new_ids if not 0 <= token < tokenizer.vocab_size]
    if outside:  # a model with more embeddings than the tokenizer has tokens wrote one of the others: no text
        return Prediction(tuple(new_ids), f"<token {outside[0]}, outside the tokenizer's {tokenizer.vocab_size}>", None,
                          finished, False)
    if not eos:
        return Prediction(tuple(new_ids), tokenizer.decode(new_ids), None, False, False)
    span = new_ids[eos[0] + 1:eos[1] if finished else None]
    after = tokenizer.decode(span)
    answer = after.split(ANSWER_MARK, 1)[1].strip() if ANSWER_MARK in after else None
    # decode drops special tokens: `1 3 <pad> <bos> 9 4` (or `1 3 <|extra|> 9 4`) would read as the answer `1 3 9 4`
    specials = {*getattr(tokenizer, "special_ids", ()), getattr(tokenizer, "bos_id", None),
                getattr(tokenizer, "pad_id", None)} - {None, tokenizer.eos_id}
    correct = finished and answer is not None and not specials.intersection(span) \
        and answers_match(answer, reference_answer)
    return Prediction(tuple(new_ids), tokenizer.decode(new_ids[:eos[0]]), answer, finished, correct)


def answers_match(predicted: str, reference: str) -> bool:
    """Exact match up to thousands separators and whitespace runs: '1,450,000' == '1450000'."""
    return normalize_answer(predicted) == normalize_answer(reference)


def normalize_answer(text: str) -> str:
    return " ".join(text.replace(",", "").split())
