"""Instruction tuning with Bitune or plain LoRA: data, the training run, and zero-shot multiple choice.

Data follows the Bitune reference: the prompt is `Question: {instruction}\\n\\nAnswer:` and the answer
`" " + response + eos`; the loss covers the answer only. Examples longer than `max_length` tokens are
dropped and counted. Multiple-choice questions are scored by the log-likelihood of each choice as an
answer (`acc`), and by that log-likelihood per character of the choice (`acc_norm`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from functools import partial
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import adapters, lora
from .bitune import Bitune, answer_targets, right_pad, split_streams
from .checkpoint import CheckpointError
from .model import Llama
from .train import Batches, LossSum, Schedule, adamw, collate_prompt_answer, fit

PROMPT_TEMPLATE = "Question: {instruction}\n\nAnswer:"
METHODS = ("bitune", "lora")


@dataclasses.dataclass
class Instruction:
    instruction: str
    response: str


@dataclasses.dataclass
class MultipleChoice:
    question: str
    choices: list[str]
    answer: int  # index of the right choice


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """(line number, object) for every non-empty line; a line that is not a JSON object is named."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object")
            rows.append((number, row))
    if not rows:
        raise ValueError(f"{path} holds no examples")
    return rows


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


# -------------------------------------------------------------------------------------------- training

def bitune_loss(module, batch: dict) -> LossSum:
    """fit's loss for a Bitune module: cross-entropy over the answer tokens, through the module's forward
    (so DDP/FSDP wrappers see the call)."""
    logits = module(batch["input_ids"], batch["prompt_lens"], batch["attention_mask"])
    targets = answer_targets(split_streams(batch["input_ids"], batch["prompt_lens"], batch["attention_mask"]))
    total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return LossSum(total, (targets != -100).sum())


def tune(model: Llama, pairs: list, method: str, out_dir: str | os.PathLike, *, steps: int = 3000, batch_size: int = 10,
         lr: float = 3e-4, warmup: float = 0.1, rank: int = 8, alpha: float = 1.0, mode: str = "bitune",
         seed: int = 0, pad_id: int = 0, callbacks=(), stream=None):
    """Train adapters on (prompt, answer) pairs with the reference defaults (AdamW, no weight decay, linear
    schedule with `warmup` of the steps, clipping 1.0, bf16 on GPU). Returns the tuned module: a Bitune,
    or for `method="lora"` a `lora.AdaptedModel` with one `causal` adapter; adapters are saved to
    `out_dir/adapters`, the training state (resumable) to `out_dir/run`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "bitune":
        tuned, loss_fn = Bitune(model, rank=rank, alpha=alpha, mode=mode, seed=seed), bitune_loss
    else:
        lora.add_adapters(model, ["causal"], rank=rank, alpha=alpha, seed=seed)
        tuned, loss_fn = lora.AdaptedModel(model, "causal"), None
    tuned.to(model.embed_tokens.weight.device)
    out_dir = Path(out_dir)
    if steps > 0:
        batches = Batches(pairs, batch_size, partial(collate_prompt_answer, pad_id=pad_id), seed=seed)
        kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
        fit(tuned, batches, out_dir / "run", steps=steps, optimizer=lambda m: adamw(m, lr, weight_decay=0.0),
            schedule=Schedule("linear", warmup_steps=math.ceil(warmup * steps), total_steps=steps),
            clip_grad_norm=1.0, keep_last=1, callbacks=list(callbacks), stream=stream, **kwargs)
    save_tuned_adapters(tuned, out_dir / "adapters")
    return tuned


def save_tuned_adapters(tuned, directory) -> Path:
    if isinstance(tuned, Bitune):
        return tuned.save_adapters(directory)
    return adapters.save_adapters(directory, adapters.lora_tensors(tuned.model), lora_config(tuned.model))


def load_tuned(model: Llama, directory: str | os.PathLike):
    """The tuned module saved by `tune` (its `out_dir/adapters`): a Bitune, or for plain LoRA an
    `AdaptedModel`, with the adapters added to `model` and loaded; the set-up comes from the saved config."""
    saved = adapters.read_config(directory)
    if saved.get("method") == "bitune":
        return Bitune.from_adapters(model, directory)
    if saved.get("method") != "lora":
        raise CheckpointError(f"{directory} holds {saved.get('method')!r} adapters; kpro reads 'bitune' and 'lora'")
    lora.add_adapters(model, saved["adapters"], rank=saved["rank"], alpha=saved["alpha"])
    model.to(model.embed_tokens.weight.device)
    adapters.load_adapters(directory, adapters.lora_tensors(model), lora_config(model))
    return lora.AdaptedModel(model, "causal")


def lora_config(model: nn.Module) -> dict:
    layer = lora.lora_layers(model)[0]
    return {"method": "lora", "rank": layer.rank, "alpha": layer.alpha, "adapters": list(layer.adapters)}


# ------------------------------------------------------------------------------------------- scoring

@torch.no_grad()
def answer_log_likelihoods(tuned, prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]],
                           batch_size: int = 16) -> torch.Tensor:
    """log P(answer | prompt) summed over the answer tokens, [N] float64, for a Bitune or a plain /
    adapted causal model."""
    scores = []
    for start in range(0, len(prompts), batch_size):
        rows = [list(p) + list(a) for p, a in zip(prompts[start:start + batch_size], answers[start:start + batch_size])]
        prompt_lens = [len(p) for p in prompts[start:start + batch_size]]
        device = next(tuned.parameters()).device
        ids, lens = right_pad(rows, 0, device=device)
        mask = (torch.arange(ids.shape[1], device=device) < lens[:, None]).long()
        plens = torch.tensor(prompt_lens, device=device)
        if isinstance(tuned, Bitune):
            logits = tuned(ids, plens, mask)
            targets = answer_targets(split_streams(ids, plens, mask))
        else:  # causal: position t predicts token t + 1; score the answer tokens
            logits = tuned(ids, mask)[:, :-1]
            positions = torch.arange(ids.shape[1] - 1, device=device)
            scored = (positions >= plens[:, None] - 1) & (positions < lens[:, None] - 1)
            targets = ids[:, 1:].masked_fill(~scored, -100)
        logp = torch.log_softmax(logits.double(), -1)
        picked = logp.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        scores.append(picked.masked_fill(targets == -100, 0).sum(-1))
    return torch.cat(scores)


def multiple_choice_accuracy(tuned, tok, questions: Sequence[MultipleChoice], batch_size: int = 16) -> dict:
    """Zero-shot accuracy: each question's choices scored as answers (`" " + choice`) to its prompt."""
    prompts, answers, owners, lengths = [], [], [], []
    for q_index, question in enumerate(questions):
        prompt = PROMPT_TEMPLATE.format(instruction=question.question)
        for choice in question.choices:
            p, a = encode_pair(tok, prompt, " " + choice)
            prompts.append(p)
            answers.append(a)
            owners.append(q_index)
            lengths.append(max(1, len(choice)))
    scores = answer_log_likelihoods(tuned, prompts, answers, batch_size)
    correct = correct_norm = 0
    offset = 0
    for question in questions:
        n = len(question.choices)
        raw = scores[offset:offset + n]
        per_char = raw / torch.tensor(lengths[offset:offset + n], dtype=torch.float64)
        correct += int(raw.argmax()) == question.answer
        correct_norm += int(per_char.argmax()) == question.answer
        offset += n
    return {"acc": correct / len(questions), "acc_norm": correct_norm / len(questions), "questions": len(questions)}


def generate_answers(tuned, tok, prompts: Sequence[str], max_new_tokens: int, **sampling) -> list[str]:
    """Decoded answers to prompt texts (each formatted with PROMPT_TEMPLATE)."""
    encoded = [tok.encode(PROMPT_TEMPLATE.format(instruction=p), bos=True) for p in prompts]
    sampling.setdefault("eos_token_id", tok.eos_id)
    if isinstance(tuned, Bitune):
        new = tuned.generate(encoded, max_new_tokens, **sampling)
    else:
        from .generation import generate
        ids, mask = tok.pad_left(encoded, device=next(tuned.parameters()).device)
        with lora.active(tuned.model, tuned.adapter):
            new = generate(tuned.model, ids, max_new_tokens, attention_mask=mask, **sampling)[:, ids.shape[1]:].tolist()
    return [tok.decode([t for t in row if t != tok.eos_id]).strip() for row in new]

