"""Evaluation: decoding until the second eos, answer parsing, exact-match counting, batching, errors."""
import importlib.util
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_config

import kpro
from kpro.internalize import (CoTExample, evaluate, multiplication_tokenizer, parse_line, read_prediction,
                              read_published, tokenize_example)

MISTRAL = Path(__file__).parent / "data" / "mistral_7b_tokenizer.model"


class ScriptedModel(torch.nn.Module):
    """Stands in for a Llama inside kpro.generate: greedy decoding continues each known prompt (its real,
    unpadded tokens) with a fixed script, then repeats `filler`. An unknown prompt is a KeyError, so a
    prompt built or padded wrongly fails the test."""

    def __init__(self, scripts, vocab_size, filler):
        super().__init__()
        self.config = tiny_config(vocab_size=vocab_size, max_position_embeddings=512)
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # generate reads the dtype from the parameters
        self.norm, self.lm_head = torch.nn.Identity(), torch.nn.Identity()
        self.scripts, self.filler, self.vocab_size = scripts, filler, vocab_size
        self.cache, self.batches = None, []

    def hidden_states(self, input_ids, attention_mask=None, *, cache=None):
        if cache is not self.cache:  # a new generate call: input_ids are the left-padded prompts
            self.cache, self.step = cache, 0
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            assert all(m.tolist() == sorted(m.tolist()) for m in mask), "prompts must be left-padded"
            self.rows = [self.scripts[tuple(ids[m.bool()].tolist())] for ids, m in zip(input_ids, mask)]
            self.batches.append(len(self.rows))
        next_ids = [row[self.step] if self.step < len(row) else self.filler for row in self.rows]
        self.step += 1
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab_size)
        logits[:, -1] = torch.nn.functional.one_hot(torch.tensor(next_ids), self.vocab_size).float()
        cache.length += input_ids.shape[1]  # as a Llama's forward does: decode checks the mask against it
        return logits


def scripted(tokenizer, cases, filler, bos=None, model_class=ScriptedModel):
    """cases: (example, what the model writes after `input <eos>`, with '<eos>' for the eos token); the prompts
    tokenized with `bos` (None: where the tokenizer has one)."""
    def encode(text):
        ids = []
        for i, part in enumerate(text.split("<eos>")):
            ids += ([tokenizer.eos_id] if i else []) + tokenizer.encode(part, bos=False)
        return ids
    scripts = {tokenize_example(example, tokenizer, bos).prompt: encode(output) for example, output in cases}
    return model_class(scripts, max(tokenizer.vocab_size, 32), filler)


MULT = [parse_line(line) for line in [
    "2 1 * 4 3||8 4 0 + 0 6 3 0 #### 8 0 4 0",
    "3 2 1 * 6 5 4||8 3 7 0 + 0 5 1 6 0 ( 8 8 8 6 0 ) + 0 0 2 9 4 0 #### 8 8 0 6 5 0",
    "7 * 8||6 5 #### 6 5",
    "9 * 9||1 8 #### 1 8",
    "5 * 5||5 2 #### 5 2",
    "1 1 * 1 1||1 1 0 + 0 1 1 0 #### 1 2 1 0",
    "6 * 6||6 3 #### 6 3",
]]


def test_exact_match_counting_and_answer_parsing(monkeypatch):
    tok = multiplication_tokenizer()
    # A scripted clock: decoding starts at 100.0 s and ends at 102.5 s, so examples/s is 7 / 2.5 exactly.
    from kpro.internalize import evaluation
    clock = iter([100.0, 102.5])
    monkeypatch.setattr(evaluation, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    cases = [
        (MULT[0], "8 4 0 + 0 6 3 0 <eos> #### 8 0 4 0 <eos>"),                     # explicit CoT, right
        (MULT[1], "8 3 7 0 + 0 5 1 6 0 <eos> #### 8 8 0 6 5 1 <eos>"),             # partial CoT, wrong answer
        (MULT[2], "<eos> #### 6 5 <eos>"),                                         # no CoT, right
        (MULT[3], "<eos> 1 8 <eos>"),                                              # no '####': wrong
        (MULT[4], "5 2 <eos> #### 5 2"),                                           # never ends: wrong
        (MULT[5], "<eos> #### 1 2 1 <eos>"),                                       # a digit short: wrong
        (MULT[6], "<eos> #### 6 3 <eos> #### 6 4 <eos>"),                          # stops at the 2nd eos: right
    ]
    model = scripted(tok, cases, filler=tok.bos_id)  # decodes to nothing: row 4's text stays "5 2"
    result = evaluate(model, tok, MULT, batch_size=3, max_new_tokens=20)
    assert model.batches == [3, 3, 1]
    assert (result.correct, result.total) == (3, 7) and result.accuracy == pytest.approx(3 / 7)
    assert [p.correct for p in result.predictions] == [True, False, True, False, False, False, True]
    assert [p.answer for p in result.predictions] == ["8 0 4 0", "8 8 0 6 5 1", "6 5", None, "5 2", "1 2 1", "6 3"]
    assert [p.cot for p in result.predictions][:3] == ["8 4 0 + 0 6 3 0", "8 3 7 0 + 0 5 1 6 0", ""]
    assert [p.finished for p in result.predictions] == [True, True, True, True, False, True, True]
    assert len(result.predictions[4].ids) == 20 and result.predictions[6].ids[-1] == tok.eos_id
    assert tok.decode(result.predictions[6].ids) == "#### 6 3"
    assert (result.seconds, result.examples_per_second) == (2.5, 7 / 2.5)


def test_evaluate_reports_the_examples_decoded_after_each_batch():
    """It decoded a whole set without a word (a published set of 1,000: minutes on a CPU): `progress(examples
    decoded, examples)` now follows it, batch by batch, with the same predictions."""
    tok = multiplication_tokenizer()
    model = kpro.Llama(tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=64))
    calls = []
    result = evaluate(model, tok, MULT, batch_size=3, max_new_tokens=4,
                      progress=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 7), (6, 7), (7, 7)]
    assert result.predictions == evaluate(model, tok, MULT, batch_size=3, max_new_tokens=4).predictions


def test_prompts_of_different_lengths_and_sentencepiece_answers():
    tok = kpro.Tokenizer(MISTRAL)
    questions = [CoTExample("How many legs do 2 cats have?", "<<2*4=8>>", "8"),
                 CoTExample("Sum?", "", "1,450,000"),
                 CoTExample("A longer question about 1,000 apples and 3 pears, in total?", "<<1000+3=1003>>", "1,003")]
    cases = [(questions[0], "<<2*4=8>><eos>#### 8<eos>"), (questions[1], "<eos>#### 1450000<eos>"),
             (questions[2], "<<1000+3=1003>><eos>#### 1,004<eos>")]
    model = scripted(tok, cases, filler=tok.encode("0", bos=False)[-1])
    result = evaluate(model, tok, questions, batch_size=8)  # default max_new_tokens
    assert [p.answer for p in result.predictions] == ["8", "1450000", "1,004"]
    assert [p.correct for p in result.predictions] == [True, True, False]  # commas do not count
    assert result.predictions[0].cot == "<<2*4=8>>" and result.accuracy == pytest.approx(2 / 3)


def test_read_prediction_without_any_eos():
    tok = multiplication_tokenizer()
    prediction = read_prediction(tok.encode("1 2 3", bos=False), "1 2 3", tok)
    assert (prediction.cot, prediction.answer, prediction.finished, prediction.correct) == ("1 2 3", None, False, False)


def test_special_tokens_inside_the_answer_make_it_wrong():
    """decode drops them: `1 3 <pad> <bos> 9 4` read as the answer `1 3 9 4`, and was scored right."""
    tok = multiplication_tokenizer()
    ids = lambda *middle: [tok.eos_id] + tok.encode("#### 1 3", bos=False) + list(middle) + tok.encode("9 4", bos=False) \
        + [tok.eos_id]
    assert read_prediction(ids(), "1 3 9 4", tok).correct
    for special in (tok.pad_id, tok.bos_id):
        prediction = read_prediction(ids(special), "1 3 9 4", tok)
        assert prediction.answer == "1 3 9 4" and not prediction.correct


def test_any_token_decoding_drops_inside_the_answer_makes_it_wrong(tmp_path):
    """Only <pad> and <bos> counted: a tokenizer.json's other special tokens (which decode skips) and a
    SentencePiece model's control pieces (which it writes as nothing) read `#### 1 <|extra|> 8` as `1 8`, right."""
    import sentencepiece
    model = tmp_path / "sp" / "tokenizer.model"
    model.parent.mkdir()
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(["#### 1 2 3 4 5 6 7 8 9 0"] * 20),
                                             model_prefix=str(model.with_suffix("")), model_type="char", vocab_size=16,
                                             control_symbols=["[INST]"], minloglevel=2)
    sp = kpro.Tokenizer(model)
    tokenizers = [(sp, sp.sp.PieceToId("[INST]"))]
    if importlib.util.find_spec("tokenizers"):
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
        tokens = ["<pad>", "<s>", "</s>", "<|extra|>", "[UNK]", "####", *"0123456789"]
        vocab = {token: i for i, token in enumerate(tokens)}
        raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
        raw.pre_tokenizer, raw.decoder = pre_tokenizers.WhitespaceSplit(), decoders.WordPiece(cleanup=False)
        raw.add_special_tokens([AddedToken(token, special=True) for token in ["<pad>", "<s>", "</s>", "<|extra|>"]])
        (tmp_path / "json").mkdir()
        raw.save(str(tmp_path / "json" / "tokenizer.json"))
        (tmp_path / "json" / "tokenizer_config.json").write_text('{"bos_token": "<s>", "eos_token": "</s>"}')
        tokenizers.append((kpro.JsonTokenizer(tmp_path / "json"), 3))
    for tok, special in tokenizers:
        ids = lambda *middle: [tok.eos_id, *tok.encode("#### 1", bos=False), *middle, *tok.encode("8", bos=False),
                               tok.eos_id]
        assert read_prediction(ids(), "1 8", tok).correct
        prediction = read_prediction(ids(special), "1 8", tok)
        assert prediction.answer == "1 8" and not prediction.correct, type(tok).__name__
        assert special in tok.special_ids and not set(tok.encode("#### 1 8", bos=False)) & tok.special_ids


def test_a_token_outside_the_tokenizer_is_a_wrong_answer_not_a_crash():
    """A model with more embeddings than its tokenizer has tokens can write one of the others."""
    tok = multiplication_tokenizer()
    ids = tok.encode("8", bos=False) + [tok.eos_id] + tok.encode("#### 8", bos=False) + [tok.vocab_size + 3, tok.eos_id]
    prediction = read_prediction(ids, "8", tok)
    assert prediction.correct is False and prediction.finished and prediction.answer is None
    assert prediction.cot == f"<token {tok.vocab_size + 3}, outside the tokenizer's {tok.vocab_size}>"


def test_a_real_model_gives_the_same_predictions_in_any_batch(make_model):
    tok = multiplication_tokenizer()
    model = make_model(seed=3, dtype=torch.float64, vocab_size=tok.vocab_size)
    examples = MULT[:2] + read_published("4x4", "test")[:3]
    # A random model rarely writes eos: give eos 1.5 times the output row of the token it writes most, so
    # that it often writes eos instead and rows stop at different steps.
    free = evaluate(model, tok, examples, max_new_tokens=10)
    most_written = Counter(token for p in free.predictions for token in p.ids).most_common(1)[0][0]
    with torch.no_grad():
        model.lm_head.weight[tok.eos_id] = 1.5 * model.lm_head.weight[most_written]
    one_batch = evaluate(model, tok, examples, batch_size=len(examples), max_new_tokens=10)
    one_by_one = evaluate(model, tok, examples, batch_size=1, max_new_tokens=10)
    assert [p.ids for p in one_batch.predictions] == [p.ids for p in one_by_one.predictions]
    for example, prediction in zip(examples, one_batch.predictions):
        prompt = torch.tensor([tokenize_example(example, tok).prompt])
        alone = kpro.generate(model, prompt, 10, eos_token_id=tok.eos_id, pad_token_id=tok.pad_id, stop_after_eos=2)
        assert list(prediction.ids) == alone[0, prompt.shape[1]:].tolist()
        eos_count = prediction.ids.count(tok.eos_id)
        assert (eos_count == 2 and prediction.ids[-1] == tok.eos_id) if prediction.finished else eos_count < 2
    assert {len(p.ids) for p in one_batch.predictions if p.finished} - {10}  # some rows stopped early
    assert one_batch.accuracy == 0.0


def test_an_adapted_model_is_evaluated_with_its_adapter_and_an_idle_one_refused(make_model):
    """An AdaptedModel failed with "'AdaptedModel' object has no attribute 'config'"; the model it wraps,
    passed itself, was evaluated as its base."""
    tok = multiplication_tokenizer()
    model = make_model(seed=3, dtype=torch.float64, vocab_size=tok.vocab_size)
    kpro.lora.add_adapters(model, ["a"], rank=2, seed=0)
    with torch.no_grad():
        for layer in kpro.lora.lora_layers(model):
            layer.adapters["a"].lora_B.weight.normal_()
    examples = MULT[:3]
    adapted = evaluate(kpro.lora.AdaptedModel(model, "a"), tok, examples, max_new_tokens=6)
    with kpro.lora.active(model, "a"):
        assert [p.ids for p in adapted.predictions] == [p.ids for p in evaluate(model, tok, examples,
                                                                                 max_new_tokens=6).predictions]
    with pytest.raises(ValueError, match=r"evaluate: the model has LoRA adapters \(a\) and none is active or merged"):
        evaluate(model, tok, examples, max_new_tokens=6)


def test_bad_inputs_are_refused(make_model):
    tok = multiplication_tokenizer()
    model = make_model(vocab_size=tok.vocab_size)
    with pytest.raises(ValueError, match="at least one example"):
        evaluate(model, tok, [])
    with pytest.raises(TypeError, match="CoTExamples"):
        evaluate(model, tok, ["2 1 * 4 3||8 4 0 #### 8 0 4 0"])
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        evaluate(model, tok, MULT, batch_size=0)
    with pytest.raises(ValueError, match="the tokenizer has 18 tokens but the model only 10 embeddings"):
        evaluate(make_model(vocab_size=10), tok, MULT)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        evaluate(model, tok, MULT, max_new_tokens=500)
    for bad in ("5", 0, 2.5, True):  # "5": a bare TypeError from the position check before (int + str)
        with pytest.raises(ValueError, match=f"^max_new_tokens must be a positive integer, got {bad!r}$"):
            evaluate(model, tok, MULT, max_new_tokens=bad)
    with pytest.raises(ValueError, match="symbol 'x' is not in the vocabulary"):
        evaluate(model, tok, [CoTExample("1 x 2", "", "3")])


def test_the_docs_give_evaluates_signature():
    """docs/internalization.md showed `evaluate(model, tokenizer, examples, batch_size=64, max_new_tokens=None)`:
    batch_size positional, and no bos."""
    import inspect
    parameters = [p.replace(annotation=inspect.Parameter.empty) for p in inspect.signature(evaluate).parameters.values()]
    signature = f"`evaluate{inspect.Signature(parameters)}`"  # as the docs write it, without annotations
    assert signature in (Path(__file__).parents[1] / "docs" / "internalization.md").read_text(), signature


class WidthRecordingModel(ScriptedModel):
    """Records each batch's padded prompt width and its rows' real prompt lengths."""

    def hidden_states(self, input_ids, attention_mask=None, *, cache=None):
        if cache is not self.cache:
            mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
            self.widths = getattr(self, "widths", []) + [(input_ids.shape[1], sorted(mask.sum(1).tolist()))]
        return super().hidden_states(input_ids, attention_mask, cache=cache)


def test_evaluate_batches_prompts_of_similar_lengths():
    """The docstring's 'batches of similar prompt lengths': batching in file order padded the short prompts
    to the long ones (here 2 extra tokens on each short row); the predictions come back in the examples' order."""
    tok = multiplication_tokenizer()
    examples = [MULT[0], MULT[2], MULT[1], MULT[3]]  # prompt lengths 7, 5, 9, 5 ([bos] input <eos>)
    answers = ["8 4 0 + 0 6 3 0 <eos> #### 8 0 4 0 <eos>", "<eos> #### 6 5 <eos>",
               "<eos> #### 8 8 0 6 5 0 <eos>", "<eos> #### 1 8 <eos>"]
    model = scripted(tok, list(zip(examples, answers)), tok.bos_id, model_class=WidthRecordingModel)
    result = evaluate(model, tok, examples, batch_size=2, max_new_tokens=20)
    lengths = sorted(len(tokenize_example(e, tok).prompt) for e in examples)
    assert model.widths == [(lengths[1], lengths[:2]), (lengths[3], lengths[2:])]  # [(5, [5, 5]), (9, [7, 9])]
    assert [p.correct for p in result.predictions] == [True, True, True, True]
    assert [p.answer for p in result.predictions] == ["8 0 4 0", "6 5", "8 8 0 6 5 0", "1 8"]


@pytest.mark.parametrize("bos", [False, True])
def test_evaluate_prompts_open_with_a_bos_as_asked(bos):
    """bos=False was ignored (prompts kept the tokenizer's bos): ScriptedModel knows only the prompts
    tokenize_example(example, tok, bos) writes, and fails with a KeyError on any other."""
    tok = multiplication_tokenizer()
    cases = [(MULT[2], "<eos> #### 6 5 <eos>"), (MULT[3], "<eos> #### 1 8 <eos>")]
    model = scripted(tok, cases, tok.bos_id, bos=bos)
    result = evaluate(model, tok, [MULT[2], MULT[3]], batch_size=2, max_new_tokens=8, bos=bos)
    assert result.correct == 2
