"""Zero-shot multiple choice and answers to prompts, for a Bitune or a plain (LoRA-adapted) causal model.

Each question is asked with its choices listed (`Question: q\\n\\nChoices:\\nc1\\nc2…\\n\\nAnswer:`, the paper's
evaluation prompt), and each choice is scored by the log-likelihood of `" " + choice` as the answer
(`acc`), and by that log-likelihood per character of the choice (`acc_norm`).
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch

from .. import lora
from ..generation import DECODE_OPTIONS, check_decoding, generate
from ..tokenizer import checked_ids
from ..train.loss import head_cross_entropy, output_head_weight
from .data import (PROMPT_TEMPLATE, MultipleChoice, check_multiple_choice, check_positions, encode_pair,
                   multiple_choice_prompt)
from .streams import answer_targets, right_pad, split_streams, token_lists
from .wrapper import Bitune


def answer_log_likelihoods(tuned, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                           batch_size: int = 16) -> torch.Tensor:
    """log P(answer | prompt) summed over the answer tokens, [N] float64, for a Bitune or a plain /
    adapted causal model. A score that is not finite (NaN or infinite weights) is refused, naming its answer."""
    scores = _log_likelihoods(tuned, prompts, answers, batch_size)
    _refuse_non_finite(scores, lambda i: f"answer_log_likelihoods: answer {i}")
    return scores


@torch.no_grad()
def _log_likelihoods(tuned, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                     batch_size: int, progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """answer_log_likelihoods' scores, unchecked: each caller names a score that is not finite its own way.
    `progress(rows scored, rows)` after each batch."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if len(prompts) != len(answers) or not prompts:
        raise ValueError(f"answer_log_likelihoods takes one answer per prompt, at least one: got {len(prompts)} "
                         f"prompts and {len(answers)} answers")
    prompts, answers = (token_lists(seqs, what, "answer_log_likelihoods", _model_of(tuned).config.vocab_size)
                        for seqs, what in ((prompts, "prompt"), (answers, "answer")))
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        # A causal model scored both silently: an empty answer as log-likelihood 0 (certain), an empty prompt
        # without its answer's first token (nothing predicts it).
        if not answer:
            raise ValueError(f"answer_log_likelihoods: answer {i} is empty; its log-likelihood would be 0, as if "
                             "certain")
        if not prompt:
            raise ValueError(f"answer_log_likelihoods: prompt {i} is empty; nothing would predict the answer's first "
                             "token (start the prompt with bos)")
    check_positions(zip(prompts, answers), _model_of(tuned).config.max_position_embeddings, "prompt + answer")
    if not isinstance(tuned, (Bitune, lora.AdaptedModel)):
        lora.refuse_idle_adapters(tuned, "answer_log_likelihoods")
    scores = []
    for start in range(0, len(prompts), batch_size):
        rows = [list(p) + list(a) for p, a in zip(prompts[start:start + batch_size], answers[start:start + batch_size])]
        prompt_lens = [len(p) for p in prompts[start:start + batch_size]]
        device = next(tuned.parameters()).device
        ids, lens = right_pad(rows, 0, device=device)
        mask = (torch.arange(ids.shape[1], device=device) < lens[:, None]).long()
        plens = torch.tensor(prompt_lens, device=device)
        # the head's weight where it is nothing more (no logits in memory), else the logits through the head
        head = output_head_weight(tuned.model if isinstance(tuned, Bitune) else tuned)
        if isinstance(tuned, Bitune):
            out = tuned(ids, plens, mask, head=head is None)
            targets = answer_targets(split_streams(ids, plens, mask))
        else:  # causal: position t predicts token t + 1; score the answer tokens
            out = tuned(ids, mask, head=head is None)[:, :-1]
            positions = torch.arange(ids.shape[1] - 1, device=device)
            scored = (positions >= plens[:, None] - 1) & (positions < lens[:, None] - 1)
            targets = ids[:, 1:].masked_fill(~scored, -100)
        nll = head_cross_entropy(out, head, targets, reduction="none")  # -log P(token) of every answer token
        scores.append(-nll.double().sum(-1))
        if progress is not None:
            progress(min(start + batch_size, len(prompts)), len(prompts))
    return torch.cat(scores)


def multiple_choice_accuracy(tuned, tok, questions: Sequence[MultipleChoice], batch_size: int = 16,
                             progress: Callable[[int, int], None] | None = None) -> dict:
    """Zero-shot accuracy: each question asked with its choices listed (`multiple_choice_prompt`), each choice
    scored as the answer `" " + choice`; `batch_size` rows a forward, each a prompt with one of its choices.
    `progress(rows scored, rows)` is called after each forward (a file of questions scores for minutes
    silently otherwise: `kpro.train.progress.CountProgress` prints it)."""
    if not questions:
        raise ValueError("multiple_choice_accuracy needs at least one question")
    questions = list(questions)  # read twice: to encode, then to score
    if not isinstance(tuned, (Bitune, lora.AdaptedModel)):
        lora.refuse_idle_adapters(tuned, "multiple_choice_accuracy")
    prompts, answers, lengths = encode_multiple_choice(tok, questions, _model_of(tuned).config.max_position_embeddings)
    scores = _log_likelihoods(tuned, prompts, answers, batch_size, progress)
    rows = [(q_index, choice) for q_index, question in enumerate(questions) for choice in question.choices]
    _refuse_non_finite(scores, lambda i: f"multiple_choice_accuracy: question {rows[i][0]}, choice {rows[i][1]!r}")
    correct = correct_norm = 0
    offset = 0
    for question in questions:
        n = len(question.choices)
        raw = scores[offset:offset + n]
        per_char = raw / torch.tensor(lengths[offset:offset + n], dtype=torch.float64)
        # exact ties go to the first tied choice (argmax returns the first maximum), as lm-eval-harness scores them
        correct += int(raw.argmax()) == question.answer
        correct_norm += int(per_char.argmax()) == question.answer
        offset += n
    return {"acc": correct / len(questions), "acc_norm": correct_norm / len(questions), "questions": len(questions)}


def _refuse_non_finite(scores: torch.Tensor, name: Callable[[int], str]) -> None:
    """A NaN score passed as a number: argmax takes a NaN for the largest, so a model with broken weights was
    credited with every question whose answer is its first NaN choice."""
    bad = (~scores.isfinite()).nonzero()
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"{name(i)} scored {scores[i].item()} ({len(bad)} of {len(scores)} scores are not "
                         "finite): the model computes NaN or infinite outputs (NaN or infinite weights, or an "
                         "overflow in its dtype)")


def encode_multiple_choice(tok, questions: Sequence[MultipleChoice], limit: int) -> tuple[list, list, list]:
    """Each choice's (prompt ids, answer ids) and its length in characters, in order; a question that cannot be
    scored (a character the tokenizer lacks, choices that encode alike, too long for `limit` positions) is
    refused by question and choice (a character the prompt cannot encode by the question text or the listed choice
    that holds it), so that a command can check its files before it trains."""
    prompts, answers, lengths = [], [], []
    for q_index, question in enumerate(questions):
        check_multiple_choice(question, f"question {q_index}")
        prompt = multiple_choice_prompt(question)
        try:  # once: the prompt lists every choice, so a failure here is no one choice's but the part's holding it
            prompt_ids = tok.encode(prompt, bos=True, eos=False)
        except ValueError as err:
            raise ValueError(f"question {q_index}, {_unencodable_part(tok, question)}: {err}") from None
        encoded = {}
        for choice in question.choices:
            try:
                p, a = encode_pair(tok, prompt, " " + choice, prompt_ids=prompt_ids)
            except ValueError as err:
                raise ValueError(f"question {q_index}, choice {choice!r}: {err}") from None
            if len(p) + len(a) > limit:
                raise ValueError(f"question {q_index}, choice {choice!r}: prompt + answer takes {len(p) + len(a)} "
                                 f"tokens, more than the model's max_position_embeddings={limit}")
            if not a:  # it would be scored as no answer at all, log-likelihood 0, and win
                raise ValueError(f"question {q_index}: choice {choice!r} encodes to no tokens after its prompt")
            if tuple(a) in encoded:  # equal scores: the right one would win or lose by its index alone
                raise ValueError(f"question {q_index}: choices {encoded[tuple(a)]!r} and {choice!r} encode to the "
                                 "same tokens (unknown characters, or whitespace the tokenizer drops); the choices "
                                 "must differ as the model reads them")
            encoded[tuple(a)] = choice
            prompts.append(p)
            answers.append(a)
            lengths.append(max(1, len(choice)))
    return prompts, answers, lengths


def _unencodable_part(tok, question: MultipleChoice) -> str:
    """Which part of a question's prompt the tokenizer fails on: its question, or the first listed choice it
    fails on (or the prompt, where neither fails alone)."""
    parts = [(f"its question {question.question!r:.80}", question.question)]
    parts += [(f"choice {choice!r} (listed in the prompt)", choice) for choice in question.choices]
    for name, text in parts:
        try:
            tok.encode(text, bos=False, eos=False)
        except ValueError:
            return name
    return "its prompt"


def generate_answers(tuned, tok, prompts: Sequence[str], max_new_tokens: int, **sampling) -> list[str]:
    """Decoded answers to prompt texts (each formatted with PROMPT_TEMPLATE). `sampling` as in kpro.generate,
    but `eos_token_id` defaults to the tokenizer's eos (None: the model config's, as kpro.generate's default)."""
    if isinstance(prompts, (str, bytes)):  # a string is a sequence of its characters, each a prompt
        raise TypeError(f"generate_answers takes a list of prompts, got the string {prompts!r}: pass [{prompts!r}]")
    prompts = list(prompts)
    for i, prompt in enumerate(prompts):  # anything else would be formatted into the template as its repr
        if not isinstance(prompt, str):
            try:
                checked_ids(prompt, None)
                hint = ": token ids go to Bitune.generate or kpro.generate"
            except (TypeError, ValueError):
                hint = ""
            raise TypeError(f"generate_answers takes prompt texts (str): prompt {i} is {prompt!r:.80}{hint}")
    if not isinstance(tuned, (Bitune, lora.AdaptedModel)):
        lora.refuse_idle_adapters(tuned, "generate_answers")
    encoded = [tok.encode(PROMPT_TEMPLATE.format(instruction=p), bos=True, eos=False) for p in prompts]
    sampling.setdefault("eos_token_id", tok.eos_id)
    # The eos ids and stop_after_eos as decoding reads them (None: the config's eos), refused before decoding;
    # other keywords are left to the generate called below.
    *_, eos, _, stop_after_eos = check_decoding(_model_of(tuned).config, max_new_tokens, **{
        name: value for name, value in sampling.items() if name in DECODE_OPTIONS})
    if isinstance(tuned, Bitune):
        new = tuned.generate(encoded, max_new_tokens, **sampling)
    else:
        ids, mask = tok.pad_left(encoded, device=next(tuned.parameters()).device)
        adapted = isinstance(tuned, lora.AdaptedModel)
        with lora.active(tuned.model, tuned.adapter) if adapted else contextlib.nullcontext():
            new = generate(_model_of(tuned), ids, max_new_tokens, attention_mask=mask,
                           **sampling)[:, ids.shape[1]:].tolist()
    answers = [_until_stop(row, set(eos), stop_after_eos) for row in new]
    for i, answer in enumerate(answers):
        # A model with more embeddings than its tokenizer has tokens can generate an id the tokenizer lacks; its
        # decode would name only the id's place in the answer ("ids[2]"), not which prompt's answer it was.
        lacking = next((at for at, token in enumerate(answer) if not 0 <= token < tok.vocab_size), None)
        if lacking is not None:
            raise ValueError(f"prompt {i} ({prompts[i]!r:.40}) generated id {answer[lacking]} after {lacking} tokens, "
                             f"which the tokenizer lacks: the model's vocabulary ({_model_of(tuned).config.vocab_size} "
                             f"embeddings) exceeds the tokenizer's ({tok.vocab_size} tokens)")
    return [tok.decode(answer).strip() for answer in answers]


def _until_stop(row: list[int], eos: set[int], stop_after_eos: int) -> list[int]:
    """A generated row's tokens before the eos that ended it, eos ids left out: what follows it is the padding
    of a row that finished before the others (decoded, a pad id that is no eos read as text)."""
    kept, seen = [], 0
    for token in row:
        if token in eos:
            seen += 1
            if seen >= stop_after_eos:
                break
        else:
            kept.append(token)
    return kept


def _model_of(tuned):
    """The kpro.Llama inside a Bitune or a LoRA-adapted model, or the model itself."""
    return tuned.model if isinstance(tuned, Bitune) else lora.unwrap(tuned)
