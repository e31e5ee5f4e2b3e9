"""Instruction data, the Bitune / LoRA training entry point, multiple-choice scoring and the CLI."""
import argparse
import copy
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file, save_file
import torch
import torch.nn.functional as F

import kpro
from kpro import bitune, cli, lora
from kpro import train as kt
from kpro.bitune import Bitune
from kpro.train import collate_prompt_answer
from conftest import held_by_another_run, tiny_config

ROOT = Path(__file__).resolve().parents[1]
TOK = kpro.CharTokenizer("abcdefghijklmnopqrstuvwxyz0123456789 ?.:\nQAC")


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_instructions(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": "add", "input": "1 2", "response": "3"},
                                              {"instruction": "say hi", "output": "hi"}])
    assert bitune.read_instructions(path) == [bitune.Instruction("add\n\n1 2", "3"), bitune.Instruction("say hi", "hi")]
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x", "response": "y"}\n\n{"question": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:3: needs string fields"):
        bitune.read_instructions(tmp_path / "bad.jsonl")
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match=r"broken.jsonl:1: not valid JSON"):
        bitune.read_instructions(tmp_path / "broken.jsonl")
    for row, message in (({"instruction": "a", "input": {"k": "v"}, "response": "b"}, "'input' must be a string, got dict"),
                         ({"instruction": "a", "input": 0, "response": "b"}, "'input' must be a string, got int"),
                         ({"instruction": "a", "response": "b", "output": "c"}, "has both 'response' and 'output'"),
                         ({"instruction": "a", "response": None, "output": "c"}, "has both 'response' and 'output'")):
        write_jsonl(tmp_path / "odd.jsonl", [row])  # a repr in the prompt, a dropped 0, one answer chosen, before
        with pytest.raises(ValueError, match=rf"odd.jsonl:1: {message}"):
            bitune.read_instructions(tmp_path / "odd.jsonl")


@pytest.mark.parametrize("response", ["", "   "])
def test_an_empty_response_is_refused_naming_its_line(tmp_path, response):
    """An empty or blank response was trained on as the answer " " + eos ("4 examples, 0 dropped"), where an
    empty multiple-choice choice and an empty answer given as ids are refused."""
    path = write_jsonl(tmp_path / "i.jsonl", [{"instruction": "a", "response": "b"},
                                               {"instruction": "c", "response": response}])
    with pytest.raises(ValueError, match=r"i.jsonl:2: the response is empty"):
        bitune.tokenize_instructions(TOK, bitune.read_instructions(path), 30)
    with pytest.raises(ValueError, match=r"example 0 \(from 0\): the response is empty"):
        bitune.tokenize_instructions(TOK, [bitune.Instruction("hi", response)], 30)


def test_read_multiple_choice(tmp_path):
    path = write_jsonl(tmp_path / "mc.jsonl", [{"question": "q", "choices": ["a", "b"], "answer": 1},
                                               {"question": "r", "choices": ["x", "y", "z"], "answer": "z"}])
    assert [q.answer for q in bitune.read_multiple_choice(path)] == [1, 2]
    for row, message in (({"question": "q", "choices": ["a", "b"], "answer": 2}, "'answer' must be a choice index"),
                         ({"question": "q", "choices": ["a", " "], "answer": 0}, "choice 1 is empty"),
                         ({"question": "q", "choices": ["a", "a", "b"], "answer": "a"}, "choice 'a' is listed twice"),
                         # the text of choice 1, or the index 2 as a string (a dataset's label): refused, not guessed
                         ({"question": "q", "choices": ["1", "2", "3"], "answer": "2"},
                          "'answer' '2' is both the text of choice 1 and the index of choice 2"),
                         ({"question": "q", "choices": ["a\nb", "c"], "answer": 1}, "choice 0 holds a line break")):
        write_jsonl(tmp_path / "bad.jsonl", [row])
        with pytest.raises(ValueError, match=rf"bad.jsonl:1: {message}"):
            bitune.read_multiple_choice(tmp_path / "bad.jsonl")


def test_prompt_format_eos_and_dropping_long_examples():
    pairs, dropped = bitune.tokenize_instructions(TOK, [bitune.Instruction("hi", "yo"),
                                                          bitune.Instruction("x" * 50, "long")], max_length=30)
    assert dropped == 1 and len(pairs) == 1
    with pytest.raises(ValueError, match="example 1 \\(from 0\\): character 'Z' is not in the alphabet"):
        bitune.tokenize_instructions(TOK, [bitune.Instruction("hi", "yo"), bitune.Instruction("say Z", "z")], 30)
    prompt, answer = pairs[0]
    assert TOK.decode(prompt) == "Question: hi\n\nAnswer:" and prompt[0] == TOK.bos_id
    assert TOK.decode(answer) == " yo" and answer[-1] == TOK.eos_id


@pytest.mark.parametrize("max_length", [None, "64", 0, -3, 10.5, True])
def test_a_max_length_that_is_no_positive_integer_is_refused_by_name(max_length):
    """0, -3 and 10.5 dropped every example without a word; None and "64" failed in a comparison, unnamed."""
    with pytest.raises(ValueError, match=rf"max_length must be a positive integer, got {re.escape(repr(max_length))}"):
        bitune.tokenize_instructions(TOK, [bitune.Instruction("hi", "yo")], max_length)


def test_an_example_the_tokenizer_cannot_encode_is_named_by_its_file_and_line(tmp_path, capsys):
    """Named "example 2 (from 0)" before: its index among the rows, not its line (blank lines make them differ)."""
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "say a", "response": "a"}\n\n{"instruction": "say b", "response": "b"}\n\n'
                    '{"instruction": "say Z", "response": "z"}\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:5: character 'Z' is not in the alphabet"):
        bitune.tokenize_instructions(TOK, bitune.read_instructions(path), 30)
    (tmp_path / "train.jsonl").write_text(path.read_text())  # the command reads it as its --data
    assert bitune_command(tmp_path, "--batch-size", "1") == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'train.jsonl'}:5: character 'Z' is not in the alphabet"), err


def test_sentencepiece_answer_continues_the_prompt():
    tok = kpro.Tokenizer(ROOT / "tests" / "data" / "mistral_7b_tokenizer.model")
    prompt, answer = bitune.encode_pair(tok, "Question: capital of France?\n\nAnswer:", " Paris")
    assert prompt + answer == tok.encode("Question: capital of France?\n\nAnswer: Paris")
    assert tok.decode(answer) == "Paris"


def test_a_prompt_and_answer_whose_boundary_falls_inside_a_token_are_refused_not_respaced():
    """Where the prompt's tokens were not a prefix of prompt + answer's, the answer was tokenized alone, which adds
    SentencePiece's leading space: "Answer: " + "Paris" was trained and scored as "Answer:  Paris"."""
    tok = kpro.Tokenizer(ROOT / "tests" / "data" / "mistral_7b_tokenizer.model")
    for prompt, answer in (("Question: hi\n\nAnswer: ", "Paris"), ("The capital is Par", "is")):
        with pytest.raises(ValueError, match=rf"the boundary between the prompt's end {re.escape(repr(prompt[-8:]))} "
                                             rf"and the answer's start {re.escape(repr(answer[:8]))} falls inside a "
                                             r"token"):
            bitune.encode_pair(tok, prompt, answer)


def tiny_pairs(n=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(3, 40, (int(torch.randint(1, 6, (1,), generator=gen)),), generator=gen).tolist(),
             torch.randint(3, 40, (int(torch.randint(1, 5, (1,), generator=gen)),), generator=gen).tolist()) for _ in range(n)]


def test_bitune_loss_for_fit_equals_the_module_loss():
    torch.manual_seed(0)
    bt = Bitune(kpro.Llama(tiny_config()), rank=2, seed=0)
    batch = collate_prompt_answer(tiny_pairs(), pad_id=0)
    loss_sum = bitune.bitune_loss(bt, batch)
    assert int(loss_sum.count) == int((batch["labels"] != -100).sum())
    expected = bt.loss(batch["input_ids"], batch["prompt_lens"], batch["attention_mask"])
    torch.testing.assert_close(loss_sum.total / loss_sum.count, expected)


def test_loss_weighting_per_example_as_the_reference_or_per_token():
    """The reference (batch 1 x accumulation) averages each example's answer tokens, then the examples;
    the token mean weighs long answers more. Both against log-softmax by hand, for Bitune and for LoRA."""
    torch.manual_seed(0)
    pairs = tiny_pairs(6, seed=4)
    assert len({len(a) for _, a in pairs}) > 1  # answers of different lengths: the two weightings differ
    batch = collate_prompt_answer(pairs, pad_id=0)
    bt = Bitune(kpro.Llama(tiny_config()).double(), rank=2, seed=0).double()
    logits = bt(batch["input_ids"], batch["prompt_lens"], batch["attention_mask"])
    per_row = []
    for row, (prompt, answer) in enumerate(pairs):  # answer stream: [prompt[P-1], answer...]; position t predicts t+1
        logp = F.log_softmax(logits[row], -1)
        per_row.append(torch.stack([-logp[t, token] for t, token in enumerate(answer)]))
    by_example = bitune.bitune_loss(bt, batch, weighting="example")
    assert int(by_example.count) == len(pairs)
    torch.testing.assert_close(by_example.total / by_example.count, torch.stack([r.mean() for r in per_row]).mean())
    by_token = bitune.bitune_loss(bt, batch, weighting="token")
    torch.testing.assert_close(by_token.total / by_token.count, torch.cat(per_row).mean())
    assert not torch.allclose(by_example.total / by_example.count, by_token.total / by_token.count)

    model = kpro.Llama(tiny_config()).double()
    lora.add_adapters(model, ["causal"], rank=2, seed=0)
    adapted = lora.AdaptedModel(model, "causal").double()
    causal = adapted(batch["input_ids"], batch["attention_mask"])
    rows = []
    for row, (prompt, answer) in enumerate(pairs):
        logp = F.log_softmax(causal[row], -1)
        rows.append(torch.stack([-logp[len(prompt) - 1 + i, token] for i, token in enumerate(answer)]))
    lora_example = bitune.training.lora_loss(adapted, batch, weighting="example")
    torch.testing.assert_close(lora_example.total / lora_example.count, torch.stack([r.mean() for r in rows]).mean())
    lora_token = bitune.training.lora_loss(adapted, batch, weighting="token")
    torch.testing.assert_close(lora_token.total / lora_token.count, torch.cat(rows).mean())
    with pytest.raises(ValueError, match="unknown loss weighting 'sample'"):
        bitune.tune(kpro.Llama(tiny_config()), pairs, "bitune", "unused", weighting="sample")


def test_a_head_with_a_bias_or_a_hook_counts_in_the_losses_and_scores_as_in_the_logits():
    """The losses and scores take lm_head.weight into the fused cross-entropy only for a plain bias-free head
    without hooks: the bias of a head swapped in, or a hook on it (soft-capping here), was dropped silently.
    Such a head now makes the logits, and every loss and score is that of the model's own logits."""
    pairs = tiny_pairs(4, seed=4)
    prompts, answers = [p for p, _ in pairs], [a for _, a in pairs]
    batch = collate_prompt_answer(pairs, pad_id=0)
    torch.manual_seed(0)
    bt = Bitune(kpro.Llama(tiny_config(tie_word_embeddings=False)).double(), rank=2, seed=0).double()
    torch.manual_seed(1)
    model = kpro.Llama(tiny_config(tie_word_embeddings=False)).double()
    lora.add_adapters(model, ["causal"], rank=2, seed=0)
    adapted = lora.AdaptedModel(model, "causal")

    def swap_head(llama, change):
        """A biased copy of the head, or a soft-capping hook on it."""
        if change == "hook":
            return llama.lm_head.register_forward_hook(lambda module, args, out: 3 * torch.tanh(out / 3))
        biased = torch.nn.Linear(48, 67, dtype=torch.float64).requires_grad_(False)
        with torch.no_grad():
            biased.weight.copy_(llama.lm_head.weight)
            biased.bias.copy_(torch.linspace(-3, 3, 67))
        llama.lm_head = biased

    for change in ("hook", "bias"):
        swap_head(bt.model, change)
        swap_head(model, change)
        per_row, causal_rows = [], []
        for prompt, answer in pairs:  # each row's nll from its own logits, as in the weighting test above
            logp = F.log_softmax(bt(torch.tensor([prompt + answer]), torch.tensor([len(prompt)]))[0], -1)
            per_row.append(torch.stack([-logp[t, token] for t, token in enumerate(answer)]))
            logp = F.log_softmax(adapted(torch.tensor([prompt + answer]))[0], -1)
            causal_rows.append(torch.stack([-logp[len(prompt) - 1 + i, token] for i, token in enumerate(answer)]))
        for rows, loss in ((per_row, bitune.bitune_loss), (causal_rows, bitune.training.lora_loss)):
            module = bt if loss is bitune.bitune_loss else adapted
            by_token = loss(module, batch, weighting="token")
            torch.testing.assert_close(by_token.total / by_token.count, torch.cat(rows).mean(), msg=change)
            by_example = loss(module, batch, weighting="example")
            torch.testing.assert_close(by_example.total / by_example.count, torch.stack([r.mean() for r in rows]).mean())
        torch.testing.assert_close(bt.loss(batch["input_ids"], batch["prompt_lens"], batch["attention_mask"]),
                                   torch.cat(per_row).mean())
        torch.testing.assert_close(bitune.answer_log_likelihoods(bt, prompts, answers),
                                   -torch.stack([r.sum() for r in per_row]).detach())
        torch.testing.assert_close(bitune.answer_log_likelihoods(adapted, prompts, answers),
                                   -torch.stack([r.sum() for r in causal_rows]).detach())


def test_tune_weighs_examples_alike_by_default(tmp_path, monkeypatch):
    seen = []
    original = bitune.training.weighted_loss
    monkeypatch.setattr(bitune.training, "weighted_loss", lambda *a: seen.append(a[-1]) or original(*a))
    for method in ("bitune", "lora"):
        bitune.tune(kpro.Llama(tiny_config()), tiny_pairs(16), method, tmp_path / method, steps=1, batch_size=4)
    assert seen == ["example", "example"]  # the reference's, for both methods


def test_log_likelihoods_of_answers():
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config()).double()
    pairs = tiny_pairs(5)
    scores = bitune.answer_log_likelihoods(model, [p for p, _ in pairs], [a for _, a in pairs], batch_size=2)
    for (prompt, answer), score in zip(pairs, scores):
        logp = F.log_softmax(model(torch.tensor([prompt + answer]))[0], -1)
        expected = sum(logp[len(prompt) - 1 + i, token] for i, token in enumerate(answer))
        torch.testing.assert_close(score, expected.detach())
    bt = Bitune(model, rank=2, seed=0).double()
    bt_scores = bitune.answer_log_likelihoods(bt, [p for p, _ in pairs], [a for _, a in pairs], batch_size=3)
    for (prompt, answer), score in zip(pairs, bt_scores):
        loss = bt.loss(torch.tensor([prompt + answer]), torch.tensor([len(prompt)]))
        torch.testing.assert_close(score, -loss.detach() * len(answer))


def test_multiple_choice_picks_the_likeliest_choice():
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size))
    questions = [bitune.MultipleChoice("what is a", ["b", "cc", "d"], 0), bitune.MultipleChoice("pick", ["x", "y"], 1)]
    result = bitune.multiple_choice_accuracy(model, TOK, questions)
    expected = 0
    assert bitune.multiple_choice_prompt(questions[0]) == "Question: what is a\n\nChoices:\nb\ncc\nd\n\nAnswer:"
    for q in questions:
        prompt = "Question: " + q.question + "\n\nChoices:\n" + "\n".join(q.choices) + "\n\nAnswer:"  # the paper's
        pairs = [bitune.encode_pair(TOK, prompt, " " + c) for c in q.choices]
        scores = bitune.answer_log_likelihoods(model, [p for p, _ in pairs], [a for _, a in pairs])
        expected += int(scores.argmax()) == q.answer
    assert result["acc"] == expected / 2 and result["questions"] == 2


def test_multiple_choice_accuracy_reports_the_rows_scored_after_each_forward():
    """It took a whole file without a word (minutes for a PIQA-sized one): `progress(rows scored, rows)` now
    follows it, batch by batch, and leaves the scores as they were."""
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size))
    questions = [bitune.MultipleChoice("what is a", ["b", "cc", "d"], 0), bitune.MultipleChoice("pick", ["x", "y"], 1)]
    calls = []
    result = bitune.multiple_choice_accuracy(model, TOK, questions, batch_size=2,
                                             progress=lambda done, total: calls.append((done, total)))
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert result == bitune.multiple_choice_accuracy(model, TOK, questions, batch_size=2)


def test_acc_norm_divides_by_the_choices_characters_and_each_choice_is_scored_after_a_space(monkeypatch):
    from kpro.bitune import evaluation

    scored = []

    def scores(tuned, prompts, answers, batch_size, progress=None):  # "bb" less likely in all, likelier per character
        scored.extend(TOK.decode(a) for a in answers)
        return torch.tensor([-1.5, -2.5], dtype=torch.float64)
    monkeypatch.setattr(evaluation, "_log_likelihoods", scores)
    model = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size))
    result = bitune.multiple_choice_accuracy(model, TOK, [bitune.MultipleChoice("which", ["a", "bb"], 1)])
    assert scored == [" a", " bb"]
    assert result == {"acc": 0.0, "acc_norm": 1.0, "questions": 1}  # -2.5 / 2 > -1.5 / 1; not / 3 tokens with " "


def test_the_eval_batch_size_counts_rows_of_a_prompt_and_one_choice(monkeypatch):
    """--eval-batch-size said "questions scored at once"; it batches (prompt, choice) rows."""
    import argparse

    from kpro.bitune import command

    sub = argparse.ArgumentParser().add_subparsers()
    command.add_parsers(sub)
    option = next(action for action in sub.choices["bitune"]._actions if "--eval-batch-size" in action.option_strings)
    assert option.help.startswith("rows scored at once, each a question's prompt with one of its choices")
    torch.manual_seed(0)
    bt = Bitune(kpro.Llama(tiny_config(vocab_size=TOK.vocab_size)), rank=2, seed=0)
    rows, forward = [], Bitune.forward
    monkeypatch.setattr(Bitune, "forward", lambda self, ids, *args, **kwargs: rows.append(ids.shape[0]) or
                        forward(self, ids, *args, **kwargs))
    questions = [bitune.MultipleChoice(f"say {c}", ["a", "b", "c"], 0) for c in "ab"]
    bitune.multiple_choice_accuracy(bt, TOK, questions, batch_size=4)
    assert rows == [4, 2]


def test_multiple_choice_refuses_questions_it_would_score_wrongly():
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size, max_position_embeddings=40))
    for questions, message in (([], "at least one question"),
                               ([bitune.MultipleChoice("q", ["a", ""], 0)], "question 0: choice 1 is empty"),
                               ([bitune.MultipleChoice("q", ["x", "x", "y"], 1)], "choice 'x' is listed twice"),
                               ([bitune.MultipleChoice("q", ["a", "b"], 5)], r"'answer' must be a choice index in \[0, 2\)"),
                               ([bitune.MultipleChoice("q" * 30, ["a", "b"], 0)], "more than the model's max_position")):
        with pytest.raises(ValueError, match=message):  # scored (an empty choice winning; 0.0 accuracy) before
            bitune.multiple_choice_accuracy(model, TOK, questions)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        bitune.answer_log_likelihoods(model, [[1, 5]], [[6]], batch_size=0)
    with pytest.raises(ValueError, match="one answer per prompt"):
        bitune.answer_log_likelihoods(model, [[1, 5], [1, 7]], [[6]])
    # the model's check said "input_ids hold token ids outside [0, vocab_size=67)", naming neither answer nor id
    vocab = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"answer_log_likelihoods: answer 1\[0\] = {vocab} is outside the "
                                         rf"vocabulary \[0, {vocab}\)"):
        bitune.answer_log_likelihoods(model, [[1, 5], [1, 7]], [[6], [vocab]])


def test_scores_that_are_not_finite_are_refused_by_answer_and_by_question():
    """NaN scores passed: argmax takes a NaN for the largest, so broken weights scored acc 1.0 where every
    answer was the first choice."""
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size))
    bt = Bitune(model, rank=2, seed=0)
    with torch.no_grad():
        model.layers[1].mlp.down_proj.causal.lora_B.weight.fill_(float("nan"))
    questions = [bitune.MultipleChoice("say a", ["a", "b"], 0), bitune.MultipleChoice("say c", ["c", "d", "e"], 0)]
    with pytest.raises(ValueError, match=r"multiple_choice_accuracy: question 0, choice 'a' scored nan \(5 of 5 "
                                         r"scores are not finite\): the model computes NaN or infinite outputs"):
        bitune.multiple_choice_accuracy(bt, TOK, questions)
    with pytest.raises(ValueError, match=r"answer_log_likelihoods: answer 0 scored nan \(2 of 2"):
        bitune.answer_log_likelihoods(bt, [[1, 5, 6], [1, 7]], [[7, 8], [9]])
    plain = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size))
    with torch.no_grad():
        plain.embed_tokens.weight[9].fill_(float("inf"))  # only the row that reads token 9: the second answer
    assert bitune.answer_log_likelihoods(plain, [[1, 5]], [[7, 8]]).isfinite().all()
    with pytest.raises(ValueError, match=r"answer_log_likelihoods: answer 1 scored nan \(1 of 2"):
        bitune.answer_log_likelihoods(plain, [[1, 5], [1, 9, 5]], [[7, 8], [6]])


def test_a_model_tuned_in_place_is_not_scored_as_its_base():
    """tune and Bitune adapt the model in place: scoring that model ran its base, untuned, without a word."""
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size))
    tuned = Bitune(model, rank=2, seed=0)
    questions = [bitune.MultipleChoice("what is a", ["b", "cc", "d"], 0)]
    for call in (lambda m: bitune.multiple_choice_accuracy(m, TOK, questions),
                 lambda m: bitune.generate_answers(m, TOK, ["say a"], 2)):
        with pytest.raises(ValueError, match=r"the model has LoRA adapters \(bidir, causal\) and none is active or "
                                             r"merged, so it would run as its base model: pass what tune returned"):
            call(model)
        call(tuned)  # what tune returns is scored as tuned
    with lora.active(model, "causal"):
        bitune.multiple_choice_accuracy(model, TOK, questions)  # an adapter active: that one runs
    with lora.active(model, None):  # the base, asked for
        base = bitune.multiple_choice_accuracy(model, TOK, questions)
    untouched = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size))
    untouched.load_state_dict({k: v for k, v in model.state_dict().items() if ".lora_" not in k}, strict=False)
    assert base == bitune.multiple_choice_accuracy(untouched, TOK, questions)
    with pytest.raises(ValueError, match="^multiple_choice_accuracy: the model has LoRA adapters"):
        bitune.multiple_choice_accuracy(model, TOK, questions)
    with pytest.raises(TypeError, match=r"generate_answers takes a list of prompts, got the string 'say a'"):
        bitune.generate_answers(tuned, TOK, "say a", 2)  # twelve answers, one per character, before
    with pytest.raises(ValueError, match=r"pad_id must be a token id of the model \(an integer in \[0, \d+\)\), got 999"):
        bitune.tune(kpro.Llama(tiny_config(vocab_size=TOK.vocab_size)), [([1, 5], [6, 2])], "lora", None, steps=1,
                    pad_id=999)


def test_multiple_choice_refuses_choices_the_model_reads_alike():
    """'a  b' and 'a b' (SentencePiece folds the spaces), or two words of unknown characters, encode to the same
    tokens: equal scores, so the labelled one won or lost by its index alone."""
    tok = kpro.Tokenizer(ROOT / "tests" / "data" / "sentencepiece_test_model.model")
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(vocab_size=tok.vocab_size))
    for choices in (["a b", "a  b", "c"], ["東京", "大阪"]):
        with pytest.raises(ValueError, match=rf"question 0: choices {choices[0]!r} and {choices[1]!r} encode to the "
                                             "same tokens"):
            bitune.multiple_choice_accuracy(model, tok, [bitune.MultipleChoice("where", choices, 1)])
    questions = (bitune.MultipleChoice("q", ["a b", "c"], 0) for _ in range(2))  # a generator: read twice
    assert bitune.multiple_choice_accuracy(model, tok, questions)["questions"] == 2


def test_a_character_the_tokenizer_lacks_is_blamed_on_the_question_or_choice_that_holds_it():
    """The prompt lists every choice and was encoded once per choice: a character of the question or of choice 1
    was blamed on choice 0, the first to be encoded."""
    from kpro.bitune.evaluation import encode_multiple_choice
    for question, message in (
            (bitune.MultipleChoice("say a", ["a", "bZ", "c"], 0), r"^question 1, choice 'bZ' \(listed in the prompt\): "
                                                                  r"character 'Z' is not in the alphabet"),
            (bitune.MultipleChoice("say Z", ["a", "b"], 0), r"^question 1, its question 'say Z': character 'Z' is "
                                                            r"not in the alphabet")):
        with pytest.raises(ValueError, match=message):
            encode_multiple_choice(TOK, [bitune.MultipleChoice("say a", ["a", "b"], 0), question], 100)


def test_generated_answers_end_at_their_eos(monkeypatch):
    """A row that finished before the others is padded with the model's pad id; with a pad id other than the eos,
    that padding was decoded into the answer (batched answers then differed from one-by-one ones)."""
    def generated(model, ids, max_new_tokens, **kwargs):
        rows = [[4, 5, TOK.eos_id, TOK.pad_id, TOK.pad_id], [6, TOK.eos_id, 7, TOK.eos_id, TOK.pad_id], [4, 4, 4, 4, 4]]
        return torch.cat((ids, torch.tensor(rows)), 1)
    monkeypatch.setattr(bitune.evaluation, "generate", generated)
    model = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size))
    assert bitune.generate_answers(model, TOK, ["x", "y", "z"], 5) == ["bc", "d", "bbbbb"]
    assert bitune.generate_answers(model, TOK, ["x", "y", "z"], 5, stop_after_eos=2)[1] == "de"


def test_an_answer_id_the_tokenizer_lacks_is_named_by_its_prompt(monkeypatch):
    """A model with more embeddings than its tokenizer has tokens generated an id the tokenizer lacks, and the
    call died in the tokenizer's "ids[2] = 62 is outside the vocabulary [0, 45)", naming neither the prompt nor
    the answer ("ids[2]" is a place in the answer, read as a prompt's index)."""
    big = TOK.vocab_size + 5

    def generated(model, ids, max_new_tokens, **kwargs):  # the third row's lacking id after its eos is padding
        rows = [[4, 5, 6, 7], [4, 5, big - 2, 4], [4, TOK.eos_id, big - 1, big - 1]]
        return torch.cat((ids, torch.tensor(rows)), 1)
    monkeypatch.setattr(bitune.evaluation, "generate", generated)
    model = kpro.Llama(tiny_config(vocab_size=big))
    with pytest.raises(ValueError, match=rf"^prompt 1 \('what is a river please\?'\) generated id {big - 2} "
                                         rf"after 2 tokens, which the tokenizer lacks: the model's vocabulary \({big} "
                                         rf"embeddings\) exceeds the tokenizer's \({TOK.vocab_size} tokens\)"):
        bitune.generate_answers(model, TOK, ["one", "what is a river please?", "two"], 4)


def test_generate_answers_takes_eos_token_id_none_as_the_configs_eos(monkeypatch):
    """None is kpro.generate's own default, the config's eos; generate_answers crashed on it after generating
    (torch.as_tensor(None))."""
    torch.manual_seed(0)
    bt = Bitune(kpro.Llama(tiny_config(vocab_size=TOK.vocab_size, eos_token_id=5)), rank=2, seed=0)
    assert bitune.generate_answers(bt, TOK, ["x", "y"], 4, eos_token_id=None) == \
        bitune.generate_answers(bt, TOK, ["x", "y"], 4, eos_token_id=5)

    def generated(model, ids, max_new_tokens, **kwargs):
        return torch.cat((ids, torch.tensor([[4, 5, 6, TOK.eos_id]])), 1)
    monkeypatch.setattr(bitune.evaluation, "generate", generated)
    model = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size, eos_token_id=5))  # 5 is "c", the tokenizer's eos 2
    assert bitune.generate_answers(model, TOK, ["x"], 4, eos_token_id=None) == ["b"]  # cut at the config's eos
    assert bitune.generate_answers(model, TOK, ["x"], 4) == ["bcd"]  # the default: the tokenizer's


def test_log_likelihoods_refuse_empty_prompts_and_answers():
    """A causal model scored an empty answer as log-likelihood 0 (certain) and an empty prompt without its
    answer's first token; flat lists of ids raised a TypeError from len()."""
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config()).double()
    for tuned in (model, Bitune(kpro.Llama(tiny_config()).double(), rank=2, seed=0)):
        for prompts, answers, message in (([[1, 5], [1, 6]], [[7], []], "answer 1 is empty"),
                                          ([[1, 5], []], [[7], [8]], "prompt 1 is empty"),
                                          ([1, 5], [7, 8], r"prompt 0 is 1 \(one prompt: \[ids\]\)"),
                                          ([[1, 5]], [7], r"answer 0 is 7 \(one answer: \[ids\]\)")):
            with pytest.raises(ValueError, match=message):
                bitune.answer_log_likelihoods(tuned, prompts, answers)


def test_generate_answers_takes_a_plain_model():
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size))
    ids, mask = TOK.pad_left([TOK.encode(bitune.PROMPT_TEMPLATE.format(instruction="say a"))])
    expected = kpro.generate(model, ids, 3, attention_mask=mask, eos_token_id=TOK.eos_id)[0, ids.shape[1]:].tolist()
    text = TOK.decode([t for t in expected if t != TOK.eos_id]).strip()
    assert bitune.generate_answers(model, TOK, ["say a"], 3) == [text]  # an AttributeError before


def test_tune_refuses_examples_beyond_the_model_positions_and_a_zero_alpha(tmp_path):
    model = kpro.Llama(tiny_config(max_position_embeddings=8))
    with pytest.raises(ValueError, match="example 1 takes 9 tokens, more than the model's max_position_embeddings=8"):
        bitune.tune(model, [([1, 2], [3]), ([1] * 6, [4, 5, 6])], "bitune", tmp_path, steps=1, batch_size=1)
    with pytest.raises(ValueError, match="alpha must be a finite number other than 0"):
        bitune.tune(model, [([1, 2], [3])], "lora", tmp_path, steps=1, batch_size=1, alpha=0)
    # Bad pairs were found in the batch that held them, steps into the run, named by their place in the batch.
    for bad, message in ((([1, 2], []), "example 3 has an empty answer"),
                         (([1, 99], [3]), r"example 3 prompt\[1\] = 99 is outside the vocabulary \[0, 67\)"),
                         ("ab", r"example 3 must be a \(prompt_ids, answer_ids\) pair")):
        with pytest.raises((ValueError, TypeError), match=message):
            bitune.tune(model, [([1, 2], [3])] * 3 + [bad], "bitune", tmp_path / "bad", steps=1, batch_size=1)
        assert not (tmp_path / "bad").exists()
    with pytest.raises(ValueError, match="seed must be an integer"):  # torch's manual_seed error before
        bitune.tune(model, [([1, 2], [3])], "bitune", tmp_path, steps=1, batch_size=1, seed=1.5)


@pytest.mark.parametrize("method", ["bitune", "lora"])
def test_tune_trains_saves_adapters_and_resumes(tmp_path, method):
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config())
    pairs = tiny_pairs(40)
    before = {n: p.clone() for n, p in model.named_parameters()}
    tuned = bitune.tune(model, pairs, method, tmp_path, steps=3, batch_size=8, lr=1e-2, rank=2, alpha=2.0)
    changed = [n for n, p in tuned.named_parameters() if n.removeprefix("model.") in before
               and not torch.equal(p, before[n.removeprefix("model.")])]
    assert changed == []  # base weights frozen
    assert any(p.abs().sum() > 0 for n, p in tuned.named_parameters() if "lora_B" in n)
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert config["method"] == method
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2, 3]
    if method == "lora":
        assert isinstance(tuned, lora.AdaptedModel)
    torch.manual_seed(0)
    loaded = bitune.load_tuned(kpro.Llama(tiny_config()), tmp_path / "adapters")
    assert type(loaded) is type(tuned)
    ids, plens, mask = torch.tensor([[1, 5, 6, 7, 2]]), torch.tensor([3]), torch.ones(1, 5, dtype=torch.long)
    args = (ids, plens, mask) if method == "bitune" else (ids, mask)
    assert torch.equal(loaded(*args), tuned(*args))
    with pytest.raises(ValueError, match="unknown method"):
        bitune.tune(kpro.Llama(tiny_config()), pairs, "prefix", tmp_path / "x")


class Killed(Exception):
    """A SIGKILL in the middle of a step: nothing more is saved."""


def kill_at_step(monkeypatch, step):
    """fit dies in its `step`-th training step from now on (as killat.py's SIGKILL), before the step is done."""
    from kpro.train import loop

    original, calls = loop._train_step, []

    def train_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise Killed(f"killed in step {step}")
        return original(*args, **kwargs)
    monkeypatch.setattr(loop, "_train_step", train_step)


@pytest.mark.parametrize("method", ["bitune", "lora"])
def test_tune_saves_every_n_steps_and_a_killed_run_resumes_bit_identically(tmp_path, monkeypatch, method):
    """tune wrote a checkpoint only at the end and on Ctrl-C/SIGTERM: a run killed otherwise (out of memory,
    preempted) left none, and ran again from step 1. save_every=N saves every N steps; the run killed between
    two saves resumes from the last one and ends as the uninterrupted run does, bit for bit."""
    def run(out, **options):
        torch.manual_seed(0)
        return bitune.tune(kpro.Llama(tiny_config()), tiny_pairs(40), method, out, steps=6, batch_size=4, lr=1e-2,
                           rank=2, alpha=2.0, **options)

    straight = run(tmp_path / "straight")
    kill_at_step(monkeypatch, 5)
    with pytest.raises(Killed):
        run(tmp_path / "killed", save_every=2)
    assert [path.name for path in kt.list_checkpoints(tmp_path / "killed" / "run")] == ["step-00000004"]
    # The checkpoint holds what trains (adapters, mixing scalars), not the base: the digest of the base is checked
    saved = load_file(tmp_path / "killed" / "run" / "step-00000004" / "module.safetensors")
    frozen = {name for name, p in straight.named_parameters() if not p.requires_grad}
    assert frozen and not frozen & set(saved)
    assert {name for name, p in straight.named_parameters() if p.requires_grad} <= set(saved)
    monkeypatch.undo()
    resumed = run(tmp_path / "killed", save_every=2)
    losses = [[m["loss"] for m in kt.read_metrics(out / "run" / "metrics.jsonl")] for out in (tmp_path / "straight",
                                                                                              tmp_path / "killed")]
    assert len(losses[0]) == 6 and losses[0] == losses[1]
    for (name, tensor), (_, other) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(tensor, other), name
    with pytest.raises(ValueError, match="save_every must be a positive integer or None, got 0"):
        run(tmp_path / "zero", save_every=0)


@pytest.mark.parametrize("method", ["bitune", "lora"])
def test_tune_takes_a_numpy_rank_and_alpha(tmp_path, method):
    """The settings recorded in each checkpoint kept a NumPy rank as given: the first save raised 'Object of
    type int64 is not JSON serializable' after training, and no adapters were saved."""
    torch.manual_seed(0)
    bitune.tune(kpro.Llama(tiny_config()), tiny_pairs(8), method, tmp_path, steps=np.int64(1),
                batch_size=np.int64(4), lr=np.float32(1e-3), rank=np.int64(2), alpha=np.float32(2))
    settings = json.loads((tmp_path / "run" / "step-00000001" / "tune_settings.json").read_text())
    config = json.loads((tmp_path / "adapters" / "adapter_config.json").read_text())
    assert (settings["rank"], settings["alpha"], config["rank"], config["alpha"]) == (2, 2.0, 2, 2.0)


def test_load_tuned_rebuilds_lora_on_other_projections_and_names(tmp_path):
    """save_tuned_adapters recorded neither the projections adapted nor the adapter's name: adapters on q_proj
    and v_proj only, or named other than "causal", could not be loaded from the files it wrote."""
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config())
    lora.add_adapters(model, ["mine"], rank=2, targets=["q_proj", "v_proj"], seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    tuned = lora.AdaptedModel(model, "mine")
    bitune.save_tuned_adapters(tuned, tmp_path / "adapters")
    torch.manual_seed(0)
    loaded = bitune.load_tuned(kpro.Llama(tiny_config()), tmp_path / "adapters")
    assert isinstance(loaded, lora.AdaptedModel) and loaded.adapter == "mine"
    assert bitune.lora_config(loaded.model)["targets"] == ["q_proj", "v_proj"]
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    assert torch.equal(loaded(ids), tuned(ids))
    with pytest.raises(TypeError, match="takes a Bitune or a kpro.lora.AdaptedModel, got Llama"):
        bitune.save_tuned_adapters(model, tmp_path / "other")


def test_layers_one_set_up_cannot_rebuild_are_refused_before_saving(tmp_path):
    """save_tuned_adapters recorded the first LoRA layer's set-up and wrote every layer's tensors: an adapter added
    to some layers alone (as add_adapters' own error suggests, layer by layer) made a file load_tuned refused as
    "unexpected" tensors. Refused when saving, naming the layer that differs; so are projections adapted in some
    blocks only."""
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config())
    lora.add_adapters(model, ["a"], rank=2, seed=0)
    for layer in lora.lora_layers(model)[1:]:
        layer.add_adapter("b")
    with pytest.raises(ValueError, match=r"LoRA layer layers\.0\.self_attn\.k_proj has .*'adapters': \['a', 'b'\]"
                                         r".*layer layers\.0\.self_attn\.q_proj .*'adapters': \['a'\]"):
        bitune.save_tuned_adapters(lora.AdaptedModel(model, "a"), tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
    some = kpro.Llama(tiny_config())
    lora.add_adapters(some, ["a"], rank=2, targets=["q_proj", "v_proj"], seed=0)
    last = some.layers[-1].self_attn
    last.q_proj = torch.nn.Linear(last.q_proj.in_features, last.q_proj.out_features, bias=False)  # its base only
    with pytest.raises(ValueError, match=f"q_proj is adapted in some of the {len(some.layers)} blocks only"):
        bitune.save_tuned_adapters(lora.AdaptedModel(some, "a"), tmp_path / "some")


def test_adapters_are_not_saved_while_merged(tmp_path):
    """Saved while merged, the adapters recorded the merged weights as their base: load_tuned into the base they
    were tuned on refused them as "tuned on another base model"."""
    def base():
        torch.manual_seed(0)
        return kpro.Llama(tiny_config())

    model = base()
    lora.add_adapters(model, ["causal"], rank=2, seed=0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
    for layer in lora.lora_layers(model):
        layer.merge("causal")
    tuned = lora.AdaptedModel(model, "causal")
    with pytest.raises(ValueError, match=r"cannot save adapters while one is merged into the base weights "
                                         r"\(14 of 14 LoRA layers; first: layers.0.self_attn.q_proj, adapter 'causal'\)"
                                         r": .* Save them before merging; unmerge\(\) alone does not do.*load the base "
                                         r"weights again .*strict=False"):
        bitune.save_tuned_adapters(tuned, tmp_path / "adapters")
    assert not (tmp_path / "adapters").exists()
    for layer in lora.lora_layers(model):
        layer.unmerge()
    # The error advised unmerge() as a way to save: the weights are then the base to rounding only (fp32 too), and
    # the file records that, which the base they were tuned on refuses
    bitune.save_tuned_adapters(tuned, tmp_path / "adapters")
    with pytest.raises(kpro.CheckpointError, match="tuned on another base model"):
        bitune.load_tuned(base(), tmp_path / "adapters")
    model.load_state_dict(base().state_dict(), strict=False)  # the way the error gives
    bitune.save_tuned_adapters(tuned, tmp_path / "adapters")
    loaded = bitune.load_tuned(base(), tmp_path / "adapters")
    ids = torch.randint(0, 67, (2, 6))
    assert torch.equal(loaded(ids), tuned(ids))
    bt = Bitune(base(), rank=2, seed=0)
    lora.lora_layers(bt.model)[3].merge("bidir")
    with pytest.raises(ValueError, match=r"\(1 of 14 LoRA layers; first: layers.0.self_attn.o_proj, adapter 'bidir'\)"):
        bt.save_adapters(tmp_path / "bitune")


@pytest.mark.parametrize("method", ["bitune", "lora"])
def test_a_failed_load_tuned_leaves_the_model_as_it_was(tmp_path, method):
    """load_tuned added the adapters to the caller's model before loading them: a file that did not match left
    the model adapted and frozen, and the retry failed with "has LoRA adapters already"."""
    torch.manual_seed(0)
    bitune.tune(kpro.Llama(tiny_config()), tiny_pairs(8), method, tmp_path, steps=0, rank=2)
    files = tmp_path / "adapters"
    good = (files / "adapters.safetensors").read_bytes()
    (files / "adapters.safetensors").write_bytes(b"not a safetensors file")
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config())
    before = {name: (type(module), module.weight.requires_grad) for name, module in model.named_modules()
              if isinstance(module, torch.nn.Linear)}
    with pytest.raises(kpro.CheckpointError, match="is not a readable safetensors file"):
        bitune.load_tuned(model, files)
    after = {name: (type(module), module.weight.requires_grad) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) or isinstance(module, lora.LoRALinear)}
    assert after == before and not lora.lora_layers(model)
    (files / "adapters.safetensors").write_bytes(good)
    assert lora.lora_layers(bitune.load_tuned(model, files).model)  # the retry works


@pytest.mark.parametrize("method", ["bitune", "lora"])
def test_a_tune_refused_before_its_first_step_leaves_the_model_as_it_was(tmp_path, method):
    """The adapters went into the caller's model before fit's resume checks (another lr) or Batches' (a batch
    the examples cannot fill) refused: the model was left adapted and frozen, and the corrected call failed
    with "has LoRA adapters already". Adapters a step has trained stay, on Ctrl-C too."""
    pairs = tiny_pairs(16)

    def base():
        torch.manual_seed(0)
        return kpro.Llama(tiny_config())

    bitune.tune(base(), pairs, method, tmp_path, steps=1, batch_size=4, lr=1e-2, rank=2)
    model = base()

    def assert_plain():
        assert not lora.lora_layers(model) and all(p.requires_grad for p in model.parameters())

    with pytest.raises(kpro.CheckpointError, match="was trained with other settings"):
        bitune.tune(model, pairs, method, tmp_path, steps=2, batch_size=4, lr=1e-3, rank=2)
    assert_plain()
    with pytest.raises(ValueError, match="16 examples cannot fill one batch of 20"):
        bitune.tune(model, pairs, method, tmp_path / "other", steps=1, batch_size=20, rank=2)
    assert_plain()
    bitune.tune(model, pairs, method, tmp_path, steps=2, batch_size=4, lr=1e-2, rank=2)  # the corrected call
    assert lora.lora_layers(model)

    class CtrlC(kt.Callback):
        def on_batch(self, run, batch):
            os.kill(os.getpid(), signal.SIGINT)  # in the first step: it finishes, is saved, and fit raises
            return batch

    model = base()
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # not ignored, as in a background job
    try:
        with pytest.raises(KeyboardInterrupt):
            bitune.tune(model, pairs, method, tmp_path / "interrupted", steps=3, batch_size=4, rank=2,
                        callbacks=[CtrlC()])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert kt.latest_checkpoint(tmp_path / "interrupted" / "run").name == "step-00000001"
    assert lora.lora_layers(model)  # trained: kept


@pytest.mark.parametrize("method", ["bitune", "lora"])
def test_resuming_tune_with_other_adapters_or_loss_is_refused(tmp_path, method):
    pairs = tiny_pairs(16)

    def tune(method=method, steps=2, base_seed=0, **settings):
        torch.manual_seed(base_seed)
        return bitune.tune(kpro.Llama(tiny_config()), pairs, method, tmp_path, steps=steps, batch_size=4,
                           **{"rank": 2, **settings})

    tune(steps=1)
    config = (tmp_path / "adapters" / "adapter_config.json").read_text()
    changed = {"rank": 4, "alpha": 16.0, **({"mode": "only_causal"} if method == "bitune" else {}), "weighting": "token"}
    expected = "rank: 2 in the checkpoint, 4 now\n  alpha: 1.0 in the checkpoint, 16.0 now\n  " + \
        ("mode: 'bitune' in the checkpoint, 'only_causal' now\n  " if method == "bitune" else "") + \
        "weighting: 'example' in the checkpoint, 'token' now\nresume with the same settings"
    with pytest.raises(kpro.CheckpointError, match=r"step-00000001 was tuned with other settings than this call asks "
                                                   r"for:\n  " + expected.replace("(", r"\(")):
        tune(**changed)
    other = "lora" if method == "bitune" else "bitune"
    with pytest.raises(kpro.CheckpointError, match=rf"method: '{method}' in the checkpoint, '{other}' now"):
        tune(method=other)
    assert (tmp_path / "adapters" / "adapter_config.json").read_text() == config  # not rewritten
    # Another base: the resume loaded the checkpoint's base weights over the model given, silently.
    with pytest.raises(kpro.CheckpointError, match=r"base_model: 'sha256:\w+' in the checkpoint, 'sha256:\w+' now "
                                                   r"\(another base model\)\n"):
        tune(base_seed=1)
    tune(steps=2)  # the same settings resume
    assert [m["step"] for m in kt.read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    with pytest.raises(ValueError, match="steps must be an integer >= 0"):
        tune(steps=-5)
    with pytest.raises(ValueError, match="holds a tuned run: steps=0 would save untrained adapters over its adapters"):
        tune(steps=0)
    with pytest.raises(ValueError, match="holds a run of 2 steps already, more than steps=1"):
        tune(steps=1)  # a warmup error about the first run's schedule before
    if method == "lora":
        with pytest.raises(ValueError, match="mode='no_mix' is a Bitune ablation"):
            tune(mode="no_mix")  # ignored before


def test_a_run_tuned_on_a_base_of_one_dtype_resumed_on_float32_norms_beside_it_says_how_to_load_it(tmp_path):
    """load_pretrained(dtype="auto") now keeps a checkpoint's float32 norms beside its bfloat16 matrices, where it
    cast every tensor to bfloat16: a run tuned on the old load is refused as another base, and says which dtype
    gives the run its base."""
    def base(mixed):
        torch.manual_seed(0)
        model = kpro.Llama(tiny_config()).to(torch.bfloat16)
        if mixed:
            for module in model.modules():
                if isinstance(module, kpro.model.RMSNorm):
                    module.float()
            randomize = torch.Generator().manual_seed(3)  # values bfloat16 would round
            with torch.no_grad():
                for module in model.modules():
                    if isinstance(module, kpro.model.RMSNorm):
                        module.weight.add_(torch.rand(module.weight.shape, generator=randomize) * 1e-3)
        return model

    def tune(model, steps):
        return bitune.tune(model, tiny_pairs(8), "lora", tmp_path / "out", steps=steps, batch_size=4, rank=2)

    tune(base(False), 1)
    with pytest.raises(kpro.errors.OtherSettings, match=r"\(another base model\); if it is the same checkpoint: "
                                                        r"load_pretrained\(dtype=\"auto\"\) keeps each tensor's stored "
                                                        r"dtype, where it once cast every tensor to bfloat16: load the "
                                                        r"base with dtype=torch.bfloat16\n"):
        tune(base(True), 2)
    with pytest.raises(kpro.errors.OtherSettings, match=r"\(another base model\)\n"):  # one dtype: no such hint
        torch.manual_seed(5)
        tune(kpro.Llama(tiny_config()).to(torch.bfloat16), 2)


def test_a_resume_in_another_dtype_names_the_dtype_and_another_base_only_where_one_is(tmp_path):
    """The base digest, taken in the model's dtype, was all a resume compared: the same base in another dtype was
    refused as "base_model: ... (another base model, or another dtype of it)", which left the user to guess. The
    run records its dtype now: another is named with both values, and another base beside it where the base, cast
    to the run's dtype, tells (a wider one); a narrower copy cannot give the run's values back."""
    def tune(out, dtype, steps=1, base_seed=0):
        torch.manual_seed(base_seed)
        return bitune.tune(kpro.Llama(tiny_config()).to(dtype), tiny_pairs(8), "lora", tmp_path / out, steps=steps,
                           batch_size=4, rank=2)

    def differences(out, dtype, base_seed=0):
        with pytest.raises(kpro.errors.OtherSettings) as refused:
            tune(out, dtype, steps=2, base_seed=base_seed)
        return refused.value.differences, str(refused.value)

    tune("fp32", torch.float32)
    same, message = differences("fp32", torch.bfloat16)  # the same base, narrower
    assert same == {"base_dtype": ("float32", "bfloat16")}
    assert "\n  base_dtype: 'float32' in the checkpoint, 'bfloat16' now\nresume with" in message
    tune("bf16", torch.bfloat16)
    assert differences("bf16", torch.float32)[0] == {"base_dtype": ("bfloat16", "float32")}  # the same base, wider
    other, message = differences("bf16", torch.float32, base_seed=1)
    assert list(other) == ["base_model", "base_dtype"] and other["base_dtype"] == ("bfloat16", "float32")
    assert re.search(r"base_model: 'sha256:\w+' in the checkpoint, 'sha256:\w+' now \(another base model\)\n", message)
    # A run saved before the dtype was recorded: its digest differs for another base or another dtype alike
    settings = tmp_path / "fp32" / "run" / "step-00000001" / bitune.training.SETTINGS_FILE
    settings.write_text(json.dumps({k: v for k, v in json.loads(settings.read_text()).items() if k != "base_dtype"}))
    other, message = differences("fp32", torch.bfloat16)
    assert list(other) == ["base_model or dtype"] and "(another base model, or another dtype of it: the run " \
                                                       "recorded no dtype)" in message
    tune("fp32", torch.float32, steps=2)  # its own base and dtype resume it


@pytest.mark.parametrize("method", ["bitune", "lora"])
def test_a_run_saved_with_the_sampled_base_digest_resumes_onto_its_base_only(tmp_path, method):
    """Checkpoints tune saved before the base digest covered every value record the sampled one: a resume
    compares the base with it (a digest of the new kind would differ from any such record)."""
    from test_bitune import sampled_fingerprint

    def tune(steps, base_seed=0):
        torch.manual_seed(base_seed)
        return bitune.tune(kpro.Llama(tiny_config()), tiny_pairs(16), method, tmp_path, steps=steps, batch_size=4,
                           rank=2)

    tune(steps=1)
    settings = tmp_path / "run" / "step-00000001" / bitune.training.SETTINGS_FILE
    torch.manual_seed(0)
    saved = {**json.loads(settings.read_text()), "base_model": sampled_fingerprint(kpro.Llama(tiny_config()))}
    settings.write_text(json.dumps(saved))
    with pytest.raises(kpro.CheckpointError, match=rf"base_model: '{saved['base_model']}' in the checkpoint, "
                                                   r"'\w+' now \(another base model"):
        tune(steps=2, base_seed=1)
    tune(steps=2)
    assert [m["step"] for m in kt.read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2]


def test_cli_end_to_end(tmp_path):
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size, max_position_embeddings=256))
    kpro.save_pretrained(model, tmp_path / "base")
    TOK.save(tmp_path / "base")
    data = write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"say {c}", "response": c} for c in "abcdefghij"]
                       + [{"instruction": "say something long", "response": "no"}])
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "say a", "choices": ["a", "b"], "answer": 0}])
    run = lambda *extra: subprocess.run([sys.executable, "-m", "kpro", "bitune", "--model", str(tmp_path / "base"),
                                         "--data", str(data), "--out", str(tmp_path / "out"), "--device", "cpu",
                                         "--steps", "2", "--batch-size", "4", "--max-length", "28", *extra],
                                        capture_output=True, text=True, cwd=ROOT)
    result = run("--eval", str(mc))
    assert result.returncode == 0, result.stderr
    assert "10 examples, 1 dropped for being longer than 28" in result.stderr and "acc " in result.stdout
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["method"] == "bitune" and str(mc) in saved["eval"]
    assert saved["loss_weighting"] == "example"  # the reference's weighting is the command's default
    bad = run("--eval", str(data))
    assert bad.returncode == 1 and "needs 'question'" in bad.stderr
    bad = run("--baseline", "lora", "--mode", "no_mix")
    assert bad.returncode == 1 and "--mode no_mix is a Bitune ablation" in bad.stderr
    bad = run("--eval", str(tmp_path))  # a directory: a traceback before
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and bad.stderr.count("\n") == 1, bad.stderr
    for question, message in (({"question": "say b", "choices": ["b", "Z"], "answer": 0},
                               r"question 0, choice 'Z' \(listed in the prompt\): character 'Z' is not in the "
                               "alphabet"),
                              ({"question": "say a" * 60, "choices": ["a", "b"], "answer": 0},
                               r"question 0, choice 'a': prompt \+ answer takes \d+ tokens, more than the model's")):
        write_jsonl(tmp_path / "bad_mc.jsonl", [{"question": "say a", "choices": ["a", "b"], "answer": 0}, question])
        bad = run("--eval", str(tmp_path / "bad_mc.jsonl"), "--out", str(tmp_path / "bad_out"))
        # named after training before, and without the file, question or choice
        assert bad.returncode == 1 and re.search(f"--eval {tmp_path / 'bad_mc.jsonl'}: {message}".replace(
            "question 0", "question 1"), bad.stderr), bad.stderr
        assert not (tmp_path / "bad_out").exists()
    bad = run("--max-length", "300")  # the last --max-length wins
    assert bad.returncode == 1 and "--max-length 300 is more than the model's max_position_embeddings=256" in bad.stderr


def bitune_command(tmp_path, *args):
    """`python -m kpro bitune` in this process on a tiny base and tmp_path/train.jsonl (unless written already: 11
    examples, the last dropped at --max-length 28): its exit status."""
    if not (tmp_path / "base").exists():
        torch.manual_seed(0)
        kpro.save_pretrained(kpro.Llama(tiny_config(vocab_size=TOK.vocab_size, max_position_embeddings=256)),
                             tmp_path / "base")
        TOK.save(tmp_path / "base")
    if not (tmp_path / "train.jsonl").exists():
        write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"say {c}", "response": c} for c in "abcdefghij"]
                    + [{"instruction": "say something long", "response": "no"}])
    return cli.main(["bitune", "--model", str(tmp_path / "base"), "--data", str(tmp_path / "train.jsonl"),
                     "--out", str(tmp_path / "out"), "--device", "cpu", "--steps", "1", *args])


def test_bitune_eval_reports_its_scoring_progress_on_stderr(tmp_path, capsys, monkeypatch):
    """`--eval` said nothing while it scored (413 s for 300 questions of SmolLM2 on a CPU; a PIQA-sized file about
    40 minutes): a line of the choices scored and an ETA now goes to stderr every 10 s (here every batch), as
    convert-gguf's; stdout keeps the scores."""
    from kpro.train import progress

    monkeypatch.setattr(progress, "PROGRESS_SECONDS", 0, raising=False)
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "say a", "choices": ["a", "b"], "answer": 0},
                                             {"question": "say b", "choices": ["a", "b", "c"], "answer": 1}])
    assert bitune_command(tmp_path, "--steps", "0", "--eval", str(mc), "--eval-batch-size", "2") == 0
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if "choices scored" in line]
    assert [line.split(" in ")[0] for line in lines] == [f"{mc}: 2/5 choices scored", f"{mc}: 4/5 choices scored"]
    assert all(re.fullmatch(r".* in \d+:\d\d, eta \d+:\d\d", line) for line in lines), lines
    assert "choices scored" not in out and f"{mc}: acc " in out


def test_bitune_stopped_while_scoring_says_the_adapters_are_saved(tmp_path, capsys, monkeypatch):
    """A stop during --eval (tens of minutes for a PIQA-sized file) said a bare "interrupted", though the
    adapters were saved and a rerun only scores."""
    from kpro.bitune import evaluation

    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "say a", "choices": ["a", "b"], "answer": 0}])

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "multiple_choice_accuracy", stopped)
        assert bitune_command(tmp_path, "--eval", str(mc)) == 130
    err = capsys.readouterr().err
    assert err.endswith(f"interrupted while scoring {mc}: the adapters are saved in {tmp_path / 'out' / 'adapters'}; "
                        "run the same command again to score --eval (it trains no further)\n"), err
    assert "\ninterrupted\n" not in err and not (tmp_path / "out" / "results.json").exists()
    [metrics] = (tmp_path / "out").rglob("metrics.jsonl")
    trained = metrics.read_text()
    assert bitune_command(tmp_path, "--eval", str(mc)) == 0  # the rerun scores, and trains no further
    assert (tmp_path / "out" / "results.json").exists() and metrics.read_text() == trained


def test_bitune_refuses_a_batch_size_the_kept_examples_cannot_fill_before_training(tmp_path, capsys, monkeypatch):
    """Refused inside tune before, after the base was hashed, as "10 examples cannot fill one batch of 11
    (drop_last=True)", naming neither --batch-size nor --max-length."""
    def no_training(*args, **kwargs):
        raise AssertionError("tune was called")
    monkeypatch.setattr(bitune.training, "tune", no_training)
    for args, message in (
            (["--batch-size", "11", "--max-length", "28"],
             f"--batch-size 11 is more than the 10 examples of {tmp_path / 'train.jsonl'} kept at --max-length 28 "
             "(1 longer one dropped): a step takes one full batch; pass --batch-size 10 or less, or a larger "
             "--max-length (at most the model's 256)"),
            (["--batch-size", "12"], f"--batch-size 12 is more than the 11 examples of {tmp_path / 'train.jsonl'}: "
                                     "a step takes one full batch; pass --batch-size 11 or less")):
        assert bitune_command(tmp_path, *args) == 1
        err = capsys.readouterr().err
        assert err.endswith(f"error: {message}\n"), err


def test_bitune_resumed_on_other_examples_names_data_and_max_length(tmp_path, capsys):
    """Refused with fit's hint "other data, or the same cut into rows of another length (seq_len)": no such option
    here; the kept examples are --data's at --max-length."""
    assert bitune_command(tmp_path, "--batch-size", "4", "--max-length", "28") == 0  # 10 examples kept
    capsys.readouterr()
    data, out = tmp_path / "train.jsonl", tmp_path / "out"
    assert bitune_command(tmp_path, "--batch-size", "4", "--steps", "2") == 1  # the 11th kept too
    err = capsys.readouterr().err
    assert err.endswith(f"error: --out {out} holds a run tuned on 10 examples, and --data {data} at --max-length 256 "
                        "keeps 11: resume with the run's --data and --max-length, or pass another --out for a new "
                        "run\n"), err
    write_jsonl(data, [{"instruction": f"say {c}", "response": c} for c in "klmnopqrst"])  # as many, other ones
    assert bitune_command(tmp_path, "--batch-size", "4", "--steps", "2", "--max-length", "28") == 1
    err = capsys.readouterr().err
    assert err.endswith(f"error: --out {out} holds a run tuned on other examples than the 10 that --data {data} at "
                        "--max-length 28 keeps (as many): resume with the run's --data and --max-length, or pass "
                        "another --out for a new run\n"), err


def test_a_rerun_ending_within_the_runs_warmup_is_refused_in_flags(tmp_path, capsys, monkeypatch):
    """A run of --steps 100 (warmup 10) stopped at step 3, rerun with --steps 5, got the schedule's own words:
    "a linear schedule needs total_steps > warmup_steps", of a warmup the user never set."""
    import kpro.bitune.training as training
    real_fit = training.fit

    class StopAtStep3(kt.Callback):
        def on_step_end(self, run, metrics):
            if run.step == 3:
                run.stop()
    monkeypatch.setattr(training, "fit", lambda *a, callbacks=(), **k: real_fit(*a, callbacks=[*callbacks,
                                                                                             StopAtStep3()], **k))
    assert bitune_command(tmp_path, "--batch-size", "4", "--steps", "100") == 0
    monkeypatch.setattr(training, "fit", real_fit)
    capsys.readouterr()
    assert bitune_command(tmp_path, "--batch-size", "4", "--steps", "5") == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --out {tmp_path / 'out'} holds a run at step 3 whose learning rate warms up over its first 10 steps "
        "(10% of the --steps it started with): --steps 5 would end within them; pass --steps 11 or more to continue "
        "it, or another --out for a new run")


def test_bitune_resume_refusals_name_the_commands_flags(tmp_path, capsys):
    """A resume's refusals came in the library's terms, some with wrong advice: another --lr was named "optimizer
    param group 0 peak_lr", with "another number of total steps is fine" (the command refuses fewer) and "a
    checkpoint's weights alone load with kpro.load_pretrained" (not this one's: no config.json); another --mode,
    --rank, --alpha, --loss-weighting, --dtype or --baseline said "tune into another out_dir than ..."; fewer --steps
    said "steps=1"; another --batch-size "the checkpoint's data had batch_size=4". Each refusal names the command's
    flags now."""
    out = tmp_path / "out"
    assert bitune_command(tmp_path, "--batch-size", "4", "--steps", "2") == 0
    capsys.readouterr()

    def refusal(*args):
        assert bitune_command(tmp_path, *args) == 1
        err = capsys.readouterr().err
        assert "error: " in err and err.endswith("\n"), err  # after the examples line
        return err[err.index("error: ") + len("error: "):-1]
    other = f"--out {out} holds a run tuned with other settings than these flags:\n  "
    fix = "\nresume with the run's flags, or pass another --out for a new run"
    assert refusal("--batch-size", "4", "--steps", "3", "--lr", "1e-3") == \
        other + "--lr: 0.0003 in the run, 0.001 now" + fix
    assert refusal("--batch-size", "4", "--steps", "2", "--mode", "only_causal", "--rank", "4", "--alpha", "2",
                   "--loss-weighting", "token") == \
        other + "--rank: 8 in the run, 4 now\n  --alpha: 1.0 in the run, 2.0 now\n  --mode: bitune in the run, " \
                "only_causal now\n  --loss-weighting: example in the run, token now" + fix
    assert refusal("--batch-size", "4", "--steps", "2", "--baseline", "lora") == \
        other + "--baseline: none (Bitune) in the run, lora now" + fix
    assert refusal("--batch-size", "4", "--steps", "2", "--dtype", "bfloat16") == \
        other + "--dtype: float32 in the run, bfloat16 now" + fix  # "--model, --dtype: another base model than
    # the run's, or another --dtype of it" before, with the same --model
    assert refusal("--batch-size", "4", "--steps", "1") == \
        f"--out {out} holds a run of 2 steps already, more than --steps 1: pass --steps 2 or more (more extend " \
        "it), or another --out for a new run"
    assert refusal("--batch-size", "2", "--steps", "3") == \
        f"--out {out} holds a run tuned with --batch-size 4, and this one asks for --batch-size 2: resume with the " \
        "run's, or pass another --out for a new run"
    assert refusal("--batch-size", "4", "--steps", "3", "--seed", "1") == \
        f"--out {out} holds a run tuned with --seed 0, and this one asks for --seed 1: resume with the run's, or pass " \
        "another --out for a new run"
    assert refusal("--steps", "0") == \
        f"--out {out} holds a run tuned for 2 steps: --steps 0 would save untuned adapters over its adapters; pass " \
        "--steps 2 to score its adapters (more to tune them further), or another --out for a new run"
    assert bitune_command(tmp_path, "--batch-size", "4", "--steps", "2") == 0  # as the message says
    torch.manual_seed(1)  # another base at the same --model path: the run keeps its digest, not the path
    kpro.save_pretrained(kpro.Llama(tiny_config(vocab_size=TOK.vocab_size, max_position_embeddings=256)),
                         tmp_path / "base")
    assert refusal("--batch-size", "4", "--steps", "2") == other + "--model: another base model than the run's" + fix
    # Another device (a run on a GPU resumed on the CPU), and a setting no flag sets (a run tune made with warmup=)
    from kpro.bitune.command import _other_settings
    from kpro.errors import OtherSettings
    err = OtherSettings("fit's", {"precision": ("bf16", "fp32"), "schedule warmup_steps": (1, 2)})
    assert str(_other_settings(err, argparse.Namespace(out=out))) == \
        other + "--device: bf16 in the run, fp32 now (bf16: autocast on a GPU)\n  schedule warmup_steps: 1 in the " \
                "run, 2 now" + fix


def test_bitune_saves_every_n_steps_and_the_same_command_resumes_a_killed_run(tmp_path, capsys, monkeypatch):
    """The command had no --save-every: a run killed between its start and its end (SIGKILL: out of memory,
    preempted) left no checkpoint, and the same command started it over from step 1."""
    kill_at_step(monkeypatch, 3)
    with pytest.raises(Killed):
        bitune_command(tmp_path, "--batch-size", "4", "--steps", "4", "--save-every", "2")
    assert [path.name for path in kt.list_checkpoints(tmp_path / "out" / "run")] == ["step-00000002"]
    monkeypatch.undo()
    capsys.readouterr()
    assert bitune_command(tmp_path, "--batch-size", "4", "--steps", "4", "--save-every", "2") == 0
    assert f"resumed from {tmp_path / 'out' / 'run' / 'step-00000002'} at step 2/4" in capsys.readouterr().err
    assert [m["step"] for m in kt.read_metrics(tmp_path / "out" / "run" / "metrics.jsonl")] == [1, 2, 3, 4]


def another_run_is_refused(directory) -> bool:
    """Whether a run started now in `directory` (from another thread, as from another process) is refused."""
    from kpro._run_lock import holding
    from kpro.errors import DirectoryInUse

    refused = []

    def other_run():
        try:
            with holding(directory):
                pass
        except DirectoryInUse:
            refused.append(True)
    thread = threading.Thread(target=other_run)
    thread.start()
    thread.join()
    return bool(refused)


def test_bitune_holds_out_from_its_start_to_its_results(tmp_path, capsys, monkeypatch):
    """bitune held only --out/run, and only while fit trained: a second run into --out, started while the first
    scored its --eval, resumed, saved its adapters and results.json, and the first then wrote its own results.json
    over them; an --out another kpro run held was not refused either. The command now holds --out throughout, and
    tune holds out_dir until its adapters are saved."""
    out = tmp_path / "out"
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "say a", "choices": ["a", "b"], "answer": 0}])
    with held_by_another_run(out):
        assert bitune_command(tmp_path, "--batch-size", "4", "--eval", str(mc)) == 1
        assert "in use by another kpro run" in capsys.readouterr().err
        assert sorted(p.name for p in out.iterdir()) == [".kpro-run.lock"]  # nothing of this run's
    seen = []
    scoring, saving = bitune.evaluation.multiple_choice_accuracy, bitune.training.save_tuned_adapters
    monkeypatch.setattr(bitune.evaluation, "multiple_choice_accuracy",
                        lambda *args, **kwargs: seen.append(("scoring", another_run_is_refused(out)))
                        or scoring(*args, **kwargs))
    monkeypatch.setattr(bitune.training, "save_tuned_adapters",  # out_dir is the adapters' folder's parent
                        lambda tuned, directory: seen.append(("saving", another_run_is_refused(directory.parent)))
                        or saving(tuned, directory))
    assert bitune_command(tmp_path, "--batch-size", "4", "--eval", str(mc)) == 0
    assert seen == [("saving", True), ("scoring", True)]
    assert not another_run_is_refused(out)  # released at the end
    seen.clear()
    bitune.tune(kpro.Llama(tiny_config()), [([1, 2], [3])] * 2, "lora", tmp_path / "lib", steps=1, batch_size=1)
    assert seen == [("saving", True)]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="needs torch.distributed with gloo")
def test_bitune_under_torchrun_holds_out_and_writes_on_rank_0_only(tmp_path):
    """Every torchrun process took the --out lock, and the second was refused ("in use by another kpro run"):
    the command no longer ran under torchrun. And every rank saved the adapters, scored each --eval file, printed
    the scores and wrote results.json. Now rank 0 holds --out and does these alone."""
    bitune_command(tmp_path, "--steps", "0", "--out", str(tmp_path / "setup"))  # writes the base and the data
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"question": "say a", "choices": ["a", "b"], "answer": 0}])
    out, record = tmp_path / "out", tmp_path / "record"
    record.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(ROOT / "tests" / "_dist_bitune.py"), str(record), "bitune", "--model",
                           str(tmp_path / "base"), "--data", str(tmp_path / "train.jsonl"), "--out", str(out),
                           "--device", "cpu", "--steps", "2", "--batch-size", "2", "--eval", str(mc)],
                          env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    ranks = [json.loads((record / f"writes-rank{r}.json").read_text()) for r in range(2)]
    assert ranks == [{"writes": [str(out / "adapters"), str(out / "results.json")], "status": 0},
                     {"writes": [], "status": 0}]
    assert done.stdout.count("adapters saved to") == 1 and done.stdout.count("acc_norm") == 1, done.stdout
    assert done.stderr.count("11 examples, 0 dropped") == 1, done.stderr
    assert [m["step"] for m in kt.read_metrics(out / "run" / "metrics.jsonl")] == [1, 2]
    assert str(mc) in json.loads((out / "results.json").read_text())["eval"]
    assert not another_run_is_refused(out)  # released


@pytest.mark.parametrize("args, message", [
    # checked inside tune before, after the model and the data had loaded (nan passed with --steps 0)
    (["--lr", "0"], "--lr must be a positive finite number, got 0"),
    (["--lr", "nan", "--steps", "0"], "--lr must be a positive finite number, got nan"),
    (["--lr", "inf"], "--lr must be a positive finite number, got inf"),
    (["--seed", "-1"], "--seed must be an integer from 0 to 2**61 - 2 (a larger one would repeat a smaller one's data "
                       "order), got -1"),
    (["--save-every", "0"], "--save-every must be positive"),
    (["--seed", str(2 ** 80)],  # "Overflow when unpacking long long" before
     f"--seed must be an integer from 0 to 2**61 - 2 (a larger one would repeat a smaller one's data order), got "
     f"{2 ** 80}"),
    (["--seed", str(2 ** 61 - 1)],  # shuffled the data as --seed 0 does (Python hashes ints modulo 2**61 - 1)
     f"--seed must be an integer from 0 to 2**61 - 2 (a larger one would repeat a smaller one's data order), got "
     f"{2 ** 61 - 1}"),
    # refused by LoRA's "LoRA alpha must be ..." before, after the model and the data had loaded
    *[(["--alpha", alpha], f"--alpha must be a finite number other than 0 (0 makes every adapter a no-op that learns "
                           f"nothing), got {alpha}") for alpha in ("0", "nan", "inf")],
])
def test_bitune_checks_lr_alpha_and_seed_before_loading_anything(tmp_path, capsys, args, message):
    """--model and --data do not exist: each check named here comes before anything is read."""
    assert cli.main(["bitune", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "nope.jsonl"),
                     "--out", str(tmp_path / "out"), "--device", "cpu", *args]) == 1
    err = capsys.readouterr().err
    assert err == f"error: {message}\n", err


@pytest.mark.parametrize("args, message", [  # each accepted and ignored before
    (["--steps", "0", "--lr", "1e-3"], "--lr shapes training; --steps 0 trains nothing (it saves the untuned "
                                       "adapters and scores them on --eval): drop it, or pass --steps N"),
    (["--steps", "0", "--batch-size", "4", "--loss-weighting", "token"],
     "--batch-size, --loss-weighting shape training; --steps 0 trains nothing"),
    (["--eval-batch-size", "4"], "--eval-batch-size 4 sizes the scoring of --eval files, and none is given: pass "
                                 "--eval FILE, or drop it"),
    (["--steps", "0", "--save-every", "2"], "--save-every 2 checkpoints training, and --steps 0 trains nothing (it "
                                            "saves the untuned adapters and scores them on --eval): drop it, or pass "
                                            "--steps N"),
    (["--steps", "0", "--seed", "3", "--lr", "3e-4", "--eval-batch-size", "16"],  # given as their defaults
     "--data"),
])
def test_bitune_refuses_flags_it_would_ignore(tmp_path, capsys, args, message):
    """Only flags given (otherwise than their defaults) are refused: the last case goes on to the missing --data."""
    assert cli.main(["bitune", "--model", str(tmp_path / "nope"), "--data", str(tmp_path / "nope.jsonl"),
                     "--out", str(tmp_path / "out"), "--device", "cpu", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1, err


def test_generate_answers_takes_numpy_and_tensor_eos_ids():
    """kpro.generate takes a numpy or 0-dim tensor eos id; generate_answers failed on it after generating."""
    import numpy as np
    from kpro.bitune.evaluation import generate_answers
    torch.manual_seed(0)
    tok = kpro.CharTokenizer("abcdefghijklmnopqrstuvwxyz ?:\n.QA")
    model = kpro.Llama(tiny_config(vocab_size=tok.vocab_size))
    lora.add_adapters(model, ["causal"], rank=2)
    adapted = lora.AdaptedModel(model, "causal")
    expected = generate_answers(adapted, tok, ["ab", "c"], 4, eos_token_id=2)
    for eos in (np.int64(2), torch.tensor(2), [2]):
        assert generate_answers(adapted, tok, ["ab", "c"], 4, eos_token_id=eos) == expected


def test_generate_answers_takes_the_eos_collections_kpro_generate_takes(monkeypatch):
    """kpro.generate takes a set, frozenset or range of eos ids; generate_answers decoded the whole batch, then
    failed at torch.as_tensor(eos) ("Could not infer dtype of set"). A bad eos is now refused before decoding."""
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size))
    expected = bitune.generate_answers(model, TOK, ["ab", "c"], 4, eos_token_id=[2, 3])
    for eos in ({2, 3}, frozenset({2, 3}), range(2, 4), (2, 3), np.array([2, 3])):
        assert bitune.generate_answers(model, TOK, ["ab", "c"], 4, eos_token_id=eos) == expected

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded before the eos was refused")
    monkeypatch.setattr(bitune.evaluation, "generate", no_decoding)
    with pytest.raises(TypeError, match=r"eos_token_id must be a token id or a list of them, got \{'x'\}"):
        bitune.generate_answers(model, TOK, ["ab"], 4, eos_token_id={"x"})


def test_generate_answers_refuses_prompts_that_are_not_texts():
    """Token-id lists (what Bitune.generate takes), None or a number were formatted into the prompt template as
    their repr ('Question: [1, 10, 11]') and answered without a word."""
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size))
    ids = TOK.encode("hi", bos=True, eos=False)
    for prompts, message in (([ids], r"prompt 0 is \[1, .*\]: token ids go to Bitune.generate or kpro.generate"),
                             ((["hi", torch.tensor(ids)]), "prompt 1 is tensor.*: token ids go to Bitune.generate"),
                             (["hi", "ho", None], r"prompt 2 is None$"),
                             ([42], r"prompt 0 is 42$"),
                             ([b"hi"], r"prompt 0 is b'hi'$")):
        with pytest.raises(TypeError, match=r"generate_answers takes prompt texts \(str\): " + message):
            bitune.generate_answers(model, TOK, prompts, 2)


def test_example_weighting_leaves_rows_without_targets_out_of_the_count():
    """The official per-example mean averages over the rows that have answer tokens: a row with none (a batch
    built by hand, a custom loss) is not counted as an example."""
    from kpro.bitune.training import weighted_loss
    logits = torch.randn(3, 4, 11, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    targets = torch.tensor([[1, 2, -100, -100], [-100] * 4, [3, -100, -100, -100]])
    out = weighted_loss(logits, None, targets, "example")
    per_row = [F.cross_entropy(logits[0, :2], targets[0, :2]), F.cross_entropy(logits[2, :1], targets[2, :1])]
    assert int(out.count) == 2
    torch.testing.assert_close(out.total / out.count, torch.stack(per_row).mean())


# Mutation round 11: TRA1 (bitune/training.py:246 `math.ceil` -> `int`)
def test_tunes_default_warmup_is_a_tenth_of_the_steps_rounded_up(tmp_path):
    """The docstring's "10% of the steps": 5 steps warm up over 1 (0.5 rounded up), not 0; 25 steps over 3."""
    from kpro.train.checkpointing import saved_schedule

    gen = torch.Generator().manual_seed(0)
    pairs = [(torch.randint(3, 12, (3,), generator=gen).tolist(), torch.randint(3, 12, (2,), generator=gen).tolist())
             for _ in range(8)]
    for steps, warmup in ((5, 1), (25, 3)):
        torch.manual_seed(0)
        out = tmp_path / f"run{steps}"
        bitune.tune(kpro.Llama(tiny_config(vocab_size=13, num_hidden_layers=1)), pairs, "lora", out, steps=steps,
                    batch_size=2, rank=2)
        assert saved_schedule(out / "run")["warmup_steps"] == math.ceil(0.1 * steps) == warmup


# Mutation round 11: AD1 (adapters.py:214 tensors the model has no place for no longer refused)
def test_load_tuned_refuses_an_adapter_file_holding_tensors_the_model_has_no_place_for(tmp_path):
    torch.manual_seed(0)
    model = kpro.Llama(tiny_config(num_hidden_layers=1))
    base = copy.deepcopy(model)
    lora.add_adapters(model, ["causal"], rank=2)
    bitune.save_tuned_adapters(lora.AdaptedModel(model, "causal"), tmp_path / "a")
    file = tmp_path / "a" / "adapters.safetensors"
    tensors = load_file(file)
    name = next(n for n in tensors if ".causal.lora_A." in n)
    tensors[name.replace(".causal.", ".bidir.")] = tensors[name].clone()  # an adapter the config does not name
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(kpro.CheckpointError, match=r"does not match the model: missing \[\], unexpected \['model\."):
        bitune.load_tuned(base, tmp_path / "a")


# Mutation round 12
def test_an_eval_file_named_twice_through_dot_dot_is_refused(tmp_path, capsys, monkeypatch):
    """`--eval mc.jsonl --eval sub/../mc.jsonl` names one file twice: pathlib does not fold `..` (it folds
    `./`), only resolve() does."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "ck").mkdir()
    (tmp_path / "sub").mkdir()
    (tmp_path / "inst.jsonl").write_text('{"instruction": "ab", "response": "cd"}\n')
    (tmp_path / "mc.jsonl").write_text('{"question": "ab", "choices": ["c", "d"], "answer": 0}\n')
    assert cli.main(["bitune", "--model", "ck", "--data", "inst.jsonl", "--eval", "mc.jsonl",
                     "--eval", "sub/../mc.jsonl", "--out", "o"]) == 1
    assert capsys.readouterr().err == "error: --eval sub/../mc.jsonl is named twice\n"


# Mutation round 12
def test_max_length_equal_to_the_models_positions(tmp_path, capsys, monkeypatch):
    """--max-length equal to max_position_embeddings (256) is allowed ("at most the model's"); at that
    --max-length, no larger one exists to advise."""
    from kpro import bitune
    monkeypatch.setattr(bitune.training, "tune", lambda *a, **k: pytest.fail("tune was called"))
    write_jsonl(tmp_path / "train.jsonl", [{"instruction": f"say {c}", "response": c} for c in "abcdefghij"]
                + [{"instruction": "say " + "a" * 300, "response": "no"}])  # longer than 256 tokens: dropped
    assert bitune_command(tmp_path, "--max-length", "256", "--batch-size", "11") == 1
    err = capsys.readouterr().err
    assert err.endswith(f"error: --batch-size 11 is more than the 10 examples of {tmp_path / 'train.jsonl'} kept at "
                        "--max-length 256 (1 longer one dropped): a step takes one full batch; pass --batch-size 10 "
                        "or less\n"), err


# Mutation round 12
def test_a_lora_runs_results_have_no_mode(tmp_path, capsys):
    """results.json's "mode" is Bitune's ablation; plain LoRA has none (null)."""
    assert bitune_command(tmp_path, "--baseline", "lora", "--steps", "0") == 0
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["method"] == "lora" and results["mode"] is None
    assert bitune_command(tmp_path, "--steps", "0", "--out", str(tmp_path / "b")) == 0
    assert json.loads((tmp_path / "b" / "results.json").read_text())["mode"] == "bitune"


def test_infinite_scores_are_refused_like_nan_ones(monkeypatch):
    """An infinite score is not finite: refused as a NaN one is (the docstring: 'A score that is not finite
    (NaN or infinite weights) is refused'); -inf for the right choice silently scored it wrong."""
    from kpro.bitune import evaluation
    model = kpro.Llama(tiny_config(vocab_size=TOK.vocab_size))
    monkeypatch.setattr(evaluation, "_log_likelihoods",
                        lambda tuned, prompts, answers, *a, **k: torch.tensor([float("-inf"), -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"answer_log_likelihoods: answer 0 scored -inf \(1 of 2 scores"):
        bitune.answer_log_likelihoods(model, [[1, 5], [1, 6]], [[7], [8]])
    with pytest.raises(ValueError, match=r"multiple_choice_accuracy: question 0, choice 'a' scored -inf"):
        bitune.multiple_choice_accuracy(model, TOK, [bitune.MultipleChoice("say a", ["a", "b"], 0)])
