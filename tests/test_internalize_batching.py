"""Tokenization (symbols and SentencePiece), label masking, and CoT removal on batches."""
import random
import re
from pathlib import Path

import pytest
import torch

import kpro
from kpro import train as kt
from kpro.internalize import (IGNORE_INDEX, REMOVE_ALL, CoTExample, RemovalSchedule, SymbolTokenizer, collate,
                              multiplication_tokenizer, next_token_loss, parse_line, read_examples, read_published,
                              remove_cot, symbol_tokenizer_for, tokenize_example, tokenize_examples, training_batch)

MISTRAL = Path(__file__).parent / "data" / "mistral_7b_tokenizer.model"
BOS, EOS, PAD = 1, 2, 0
# The multiplication vocabulary after the three specials: digits 3..12, '*' 13, '+' 14, '(' 15, ')' 16, '####' 17.
D = {str(d): 3 + d for d in range(10)}
TIMES, PLUS, HASH = 13, 14, 17
EXAMPLE = parse_line("2 1 * 4 3||8 4 0 + 0 6 3 0 #### 8 0 4 0")  # 12 x 34
EXAMPLE_IDS = ([BOS, D["2"], D["1"], TIMES, D["4"], D["3"], EOS]
               + [D["8"], D["4"], D["0"], PLUS, D["0"], D["6"], D["3"], D["0"]]
               + [EOS, HASH, D["8"], D["0"], D["4"], D["0"], EOS])


def test_symbol_tokenizer_one_token_per_symbol():
    tok = multiplication_tokenizer()
    assert tok.vocab_size == 18 and (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD, BOS, EOS)
    text = "1 7 4 3 3 + 0 6 ( 1 3 ) #### 9"
    ids = tok.encode(text, bos=False)
    assert len(ids) == len(text.split()) and ids[-2] == HASH
    assert tok.decode([BOS] + ids + [EOS, PAD]) == text  # specials decode to nothing
    assert tok.decode(tok.encode("  1   2\n3 ")) == "1 2 3"
    with pytest.raises(ValueError, match="symbol 'x' is not in the vocabulary"):
        tok.encode("1 x 2")


def test_symbol_tokenizer_vocabulary_checks_and_saving(tmp_path):
    for symbols, message in [([], "at least one symbol"), (["1", "1", "2"], r"repeated: \['1'\]"),
                             (["a b"], "without whitespace"), ([""], "without whitespace"), (["<eos>"], "special")]:
        with pytest.raises(ValueError, match=message):
            SymbolTokenizer(symbols)
    with pytest.raises(ValueError, match=r"example 2 \('x\|\|y <eos> #### z'\): '<eos>' is a special token"):
        symbol_tokenizer_for([EXAMPLE, CoTExample("x", "y <eos>", "z")])  # not named before: which of 808,000?
    tok = symbol_tokenizer_for([EXAMPLE, CoTExample("x y", "", "z")])
    assert tok.symbols == tuple(sorted(set("0123468*+") | {"####", "x", "y", "z"}))
    tok.save(tmp_path)
    loaded = kpro.load_tokenizer(tmp_path)
    assert isinstance(loaded, SymbolTokenizer) and loaded.symbols == tok.symbols


def test_tokenized_example_layout_and_labels():
    tokenized = tokenize_example(EXAMPLE, multiplication_tokenizer())
    assert list(tokenized.ids) == EXAMPLE_IDS
    assert (tokenized.cot_start, tokenized.cot_end, tokenized.cot_length) == (7, 15, 8)
    assert tokenized.prompt == tuple(EXAMPLE_IDS[:7])
    assert tokenized.labels == [IGNORE_INDEX] * 7 + EXAMPLE_IDS[7:]  # loss from the first CoT token on
    no_bos = tokenize_example(EXAMPLE, multiplication_tokenizer(), bos=False)
    assert list(no_bos.ids) == EXAMPLE_IDS[1:] and no_bos.cot_start == 6


def test_empty_cot():
    tokenized = tokenize_example(CoTExample("1 * 2", "", "2"), multiplication_tokenizer())
    assert list(tokenized.ids) == [BOS, D["1"], TIMES, D["2"], EOS, EOS, HASH, D["2"], EOS]
    assert tokenized.cot_start == tokenized.cot_end == 5
    assert tokenized.labels == [IGNORE_INDEX] * 5 + [EOS, HASH, D["2"], EOS]


def test_an_example_the_tokenizer_cannot_encode_is_named():
    examples = [EXAMPLE, CoTExample("1 * 2", "", "2"), CoTExample("1 x 2", "", "3")]
    with pytest.raises(ValueError, match=r"^example 3 \('1 x 2\|\| #### 3'\): symbol 'x' is not in the vocabulary"):
        tokenize_examples(examples, multiplication_tokenizer())


def test_an_example_read_from_a_file_is_named_by_its_file_and_line_not_its_number(tmp_path):
    """Blank lines are skipped: the fourth example was on line 6, and "example 4" pointed at a good line."""
    path = tmp_path / "test.txt"
    path.write_text("1 * 2||2 #### 2\n\n3 * 4||1 2 #### 1 2\n\n2 * 2||4 #### 4\n3 8 * 2||7 6 #### \u0661 6\n")
    examples = read_examples(path)
    assert examples[3] == CoTExample("3 8 * 2", "7 6", "\u0661 6")  # where takes no part in equality
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:6 \('3 8 \* 2\|\|7 6 #### \u0661 6'\): symbol "
                                         "'\u0661' is not in the vocabulary"):
        tokenize_examples(examples, multiplication_tokenizer())


def test_sentencepiece_segments_decode_back():
    tok = kpro.Tokenizer(MISTRAL)
    for example in read_published("gsm8k", "test")[:40]:
        t = tokenize_example(example, tok)
        assert t.ids[0] == tok.bos_id and t.ids[t.cot_start - 1] == t.ids[t.cot_end] == t.ids[-1] == tok.eos_id
        assert tok.decode(t.ids[1:t.cot_start - 1]) == example.input
        assert tok.decode(t.ids[t.cot_start:t.cot_end]) == example.cot
        assert tok.decode(t.ids[t.cot_end + 1:-1]) == f"#### {example.answer}"
        assert t.labels == [IGNORE_INDEX] * t.cot_start + list(t.ids[t.cot_start:])


def test_removal_on_a_hand_written_example():
    batch = collate(tokenize_examples([EXAMPLE], multiplication_tokenizer()), PAD)
    prompt, cot, tail = EXAMPLE_IDS[:7], EXAMPLE_IDS[7:15], EXAMPLE_IDS[15:]
    for count, kept in [(0, cot), (3, cot[3:]), (8, []), (50, []), (REMOVE_ALL, [])]:
        out = remove_cot(batch, count)
        assert out.input_ids[0].tolist() == prompt + kept + tail
        assert out.labels[0].tolist() == [IGNORE_INDEX] * 7 + kept + tail
        assert out.attention_mask[0].tolist() == [1] * (7 + len(kept) + len(tail))
        assert (out.cot_removed.item(), out.cot_left.item()) == (8 - len(kept), len(kept))


def mixed_examples():
    """Examples with CoTs of many lengths, one of them empty."""
    examples = read_published("4x4", "test")[:5] + read_published("5x5", "test")[:3]
    examples += [CoTExample("1 2 * 3 4", "", "3 1 4 0"), CoTExample("9 * 9", "1 8", "1 8")]
    return tokenize_examples(examples, multiplication_tokenizer())


def test_removal_keeps_separators_and_answer_and_stops_at_the_cot():
    examples = mixed_examples()
    batch = collate(examples, PAD)
    rng = random.Random(0)
    for trial in range(30):
        counts = torch.tensor([rng.choice([0, 1, 2, 5, 17, 40, 80, 200, 2**62]) for _ in examples])
        out = remove_cot(batch, counts)
        assert out.input_ids.shape[1] == max(len(e.ids) - min(int(c), e.cot_length) for e, c in zip(examples, counts))
        for row, (example, count) in enumerate(zip(examples, counts.tolist())):
            removed = min(count, example.cot_length)
            expected = list(example.ids[:example.cot_start]) + list(example.ids[example.cot_start + removed:])
            length = len(expected)
            assert out.input_ids[row, :length].tolist() == expected
            assert (out.input_ids[row, length:] == PAD).all()
            assert out.attention_mask[row].tolist() == [1] * length + [0] * (out.input_ids.shape[1] - length)
            labels = out.labels[row].tolist()
            assert labels == [IGNORE_INDEX] * example.cot_start + expected[example.cot_start:] + \
                [IGNORE_INDEX] * (out.input_ids.shape[1] - length)
            # The three eos tokens, `####` and the answer survive every cut.
            answer_part = list(example.ids[example.cot_end:])
            assert expected[-len(answer_part):] == answer_part and expected.count(EOS) == 3
            assert (out.cot_removed[row].item(), out.cot_left[row].item()) == (removed, example.cot_length - removed)


def test_training_batches_are_deterministic_per_seed_and_step():
    examples = mixed_examples()
    schedule = RemovalSchedule(steps_per_epoch=10, remove_per_epoch=8, smoothing_lambda=0.4)
    first = training_batch(examples, schedule, step=6, seed=11, pad_id=PAD)
    torch.manual_seed(5)
    state = torch.get_rng_state()
    again = training_batch(examples, schedule, step=6, seed=11, pad_id=PAD)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is not consumed
    for field in ("input_ids", "attention_mask", "labels", "cot_removed"):
        assert torch.equal(getattr(first, field), getattr(again, field))
    other = training_batch(examples, schedule, step=6, seed=12, pad_id=PAD)
    assert not torch.equal(first.cot_removed, other.cot_removed)
    counts = schedule.removal_counts(6, len(examples), seed=11)
    assert torch.equal(first.cot_removed, torch.minimum(counts, torch.tensor([e.cot_length for e in examples])))
    assert (counts >= schedule.scheduled(6)).all() and (counts > schedule.scheduled(6)).any()


def test_remove_cot_argument_errors():
    batch = collate(mixed_examples()[:2], PAD)
    for counts, message in [(-1, "non-negative int"), (1.5, "non-negative int"), (True, "non-negative int"),
                            (torch.tensor([1, -1]), ">= 0"), (torch.tensor([1.0, 2.0]), "integer tensor"),
                            (torch.tensor([1, 2, 3]), r"\[B=2\]")]:
        with pytest.raises(ValueError, match=message):
            remove_cot(batch, counts)
    with pytest.raises(ValueError, match="at least one example"):
        collate([], PAD)
    with pytest.raises(TypeError, match="TokenizedExamples"):
        collate([EXAMPLE], PAD)
    # 2.7 was cut to 2 (an eos id), -1 blamed on input_ids at the model, None failed inside torch
    for pad_id in (2.7, -1, None, True):
        with pytest.raises(ValueError, match=rf"pad_id must be a token id \(an integer >= 0\), got {pad_id!r}"):
            collate(mixed_examples()[:2], pad_id)


def test_next_token_loss_shifts_the_labels():
    batch = remove_cot(collate(mixed_examples()[:3], PAD), 4)
    vocab = multiplication_tokenizer().vocab_size
    targets = batch.labels[:, 1:].clamp(min=0)
    logits = torch.zeros(*batch.labels.shape, vocab)
    logits[:, :-1] = 30.0 * torch.nn.functional.one_hot(targets, vocab)  # position t predicts labels[t + 1]
    assert batch.loss(logits).item() < 1e-9
    unshifted = 30.0 * torch.nn.functional.one_hot(batch.labels.clamp(min=0), vocab).float()
    assert next_token_loss(unshifted, batch.labels).item() > 1.0
    uniform = next_token_loss(torch.zeros(*batch.labels.shape, vocab), batch.labels)
    assert uniform.item() == pytest.approx(torch.log(torch.tensor(float(vocab))).item())


def test_next_token_loss_keeps_float64_logits_in_float64():
    """It computed a float64 model's loss in float32 (3.8e-7 off), where kpro.train's losses keep float64."""
    batch = remove_cot(collate(mixed_examples()[:3], PAD), 4)
    logits = torch.randn(*batch.labels.shape, multiplication_tokenizer().vocab_size, dtype=torch.float64,
                         generator=torch.Generator().manual_seed(0))
    loss = batch.loss(logits)
    want = kt.causal_lm_loss(logits, batch.labels)
    assert loss.dtype == torch.float64 and abs(loss.item() - want.item()) < 1e-12
    assert batch.loss(logits.to(torch.bfloat16)).dtype == torch.float32


def test_right_padded_rows_give_the_logits_of_each_row_alone(make_model):
    batch = training_batch(mixed_examples()[::2], RemovalSchedule(10, 8), step=7, seed=0, pad_id=PAD)  # one empty CoT
    model = make_model(seed=2, vocab_size=multiplication_tokenizer().vocab_size)
    with torch.no_grad():
        masked = model(batch.input_ids, batch.attention_mask)
        unmasked = model(batch.input_ids)  # causal attention: real positions never see the padding on their right
        for row, length in enumerate(batch.attention_mask.sum(1).tolist()):
            alone = model(batch.input_ids[row:row + 1, :length])[0]
            assert torch.allclose(masked[row, :length], alone, rtol=0, atol=1e-12)
            assert torch.allclose(unmasked[row, :length], alone, rtol=0, atol=1e-12)


def test_a_special_token_in_a_files_example_is_named_by_its_file_and_line(tmp_path):
    """As tokenize_examples since 3d84332: blank lines are skipped, so 'example 3' pointed at line 3 (blank)
    while the bad example is on line 5."""
    path = tmp_path / "train.txt"
    path.write_text("1 * 2||2 #### 2\n\n3 * 4||1 2 #### 1 2\n\n2 * 2||4 <eos> #### 4\n")
    examples = read_examples(path)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}:5 \(.*\): '<eos>' is a special token"):
        symbol_tokenizer_for(examples)
    with pytest.raises(ValueError, match=r"^example 2 \(.*\): '<eos>' is a special token"):  # not from a file
        symbol_tokenizer_for([CoTExample("1 * 2", "2", "2"), CoTExample("2 * 2", "4 <eos>", "4")])
