"""Tokenizers on real SentencePiece models (see tests/data/README.md) and the character tokenizer."""
import json
import re
from pathlib import Path

import pytest
import torch

import kpro

DATA = Path(__file__).parent / "data"
MISTRAL = DATA / "mistral_7b_tokenizer.model"


def test_llama_style_bpe_with_byte_fallback():
    tok = kpro.Tokenizer(MISTRAL)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
    assert tok.encode("Hello world") == [1, 22557, 1526]  # ids as published for Mistral 7B
    assert tok.encode("Hello world", bos=False, eos=True) == [22557, 1526, 2]
    ids = tok.encode("日本語 🦙", bos=False)
    assert [tok.id_to_piece(i) for i in ids[-4:]] == ["<0xF0>", "<0x9F>", "<0xA6>", "<0x99>"]  # the llama, as bytes
    # no tokenizer_config.json: as LlamaTokenizer, a bos and no eos where the caller leaves it to the tokenizer
    assert tok.add_bos and not tok.add_eos and tok.encode("Hello world", bos=None, eos=None) == [1, 22557, 1526]


@pytest.mark.parametrize("text", ["Hello world", " 3719 × 3349 = 12454831", "日本語 🦙\nsecond line", "  leading spaces"])
def test_round_trip(text):
    tok = kpro.Tokenizer(MISTRAL)
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text  # specials decode to nothing


def test_unigram_model_and_directory_loading(tmp_path):
    tok = kpro.Tokenizer(DATA / "sentencepiece_test_model.model")
    assert tok.vocab_size == 1000
    assert tok.encode("I saw a girl with a telescope.", bos=False)[:4] == [9, 459, 11, 939]
    tok.save(tmp_path)
    assert kpro.load_tokenizer(tmp_path).encode("a telescope") == tok.encode("a telescope")


def test_batches_and_left_padding():
    tok = kpro.Tokenizer(MISTRAL)
    batch = tok.encode_batch(["Hello world", "Hi"])
    assert batch[0] == tok.encode("Hello world")
    ids, mask = tok.pad_left(batch)
    assert ids.shape == mask.shape == (2, 3)
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]] and ids[1, 0] == tok.pad_id
    assert tok.decode_batch(ids.tolist()) == ["Hello world", "Hi"]


def test_bad_model_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        kpro.Tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="mistral_7b_tokenizer.model is a file; load_tokenizer takes the directory"):
        kpro.load_tokenizer(MISTRAL)  # "holds no tokenizer.model" before
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        kpro.Tokenizer(tmp_path)


def test_char_tokenizer(tmp_path):
    tok = kpro.CharTokenizer("0123456789+= ")
    assert tok.vocab_size == 16
    ids = tok.encode("12+3=15", bos=True, eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id and len(ids) == 9
    assert tok.decode(ids) == "12+3=15"
    tok.save(tmp_path)
    again = kpro.load_tokenizer(tmp_path)
    assert isinstance(again, kpro.CharTokenizer) and again.encode("9 9") == tok.encode("9 9")
    with pytest.raises(ValueError, match="'x' is not in the alphabet"):
        tok.encode("1x")
    with pytest.raises(ValueError, match="repeated"):
        kpro.CharTokenizer("aa")


@pytest.mark.parametrize("tok, text", [(kpro.CharTokenizer("ab"), "ab"), (kpro.SymbolTokenizer(["a", "b"]), "a b")])
def test_char_and_symbol_tokenizers_take_none_as_their_default_as_the_others_do(tok, text):
    """encode(text, bos=None) added no bos though add_bos is True (SentencePiece and JSON tokenizers take None as
    their own default); they had no add_eos."""
    assert tok.add_bos is True and tok.add_eos is False
    assert tok.encode(text, bos=None, eos=None) == tok.encode(text) == [tok.bos_id, 3, 4]
    assert tok.encode_batch([text], bos=None) == [tok.encode(text)]


def test_pad_left_rejects_empty():
    with pytest.raises(ValueError):
        kpro.pad_left([[1], []], 0)
    ids, mask = kpro.pad_left([[5, 6, 7], [8]], pad_id=0)
    assert torch.equal(ids, torch.tensor([[5, 6, 7], [0, 0, 8]])) and mask.sum() == 4
    tok = kpro.CharTokenizer("abc")  # a tokenizer's pad_left checks its vocabulary, as decode does (6 ids)
    with pytest.raises(ValueError, match=r"sequences\[0\]\[1\] = 99 is outside the vocabulary \[0, 6\)"):
        tok.pad_left([[1, 99]])


def test_chat_templates_see_tools_and_documents_as_none_and_every_failure_is_named():
    """transformers renders with tools=None: a template testing `tools is not none` added an empty tool block
    in kpro (undefined is not none), and `tools | tojson` leaked a bare TypeError."""
    pytest.importorskip("jinja2")
    from kpro.tokenizer import ChatTemplateError, render_chat_template
    mistral = ("{% if tools is not none %}[AVAILABLE_TOOLS] {{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
               "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    messages = [{"role": "user", "content": "hi"}]
    assert render_chat_template(mistral, messages) == "[INST] hi [/INST]"
    assert render_chat_template(mistral, messages, tools=[{"name": "f"}]) == \
        '[AVAILABLE_TOOLS] [{"name": "f"}][/AVAILABLE_TOOLS][INST] hi [/INST]'
    with pytest.raises(ChatTemplateError, match="the chat template failed: TypeError: .*not JSON serializable"):
        render_chat_template("{{ undefined_name | tojson }}", messages)


def test_a_template_cannot_build_a_huge_value_in_one_operation():
    """A checkpoint's template is downloaded text: `'a' * 10**12` took the memory, `2 ** (10**9)` the CPU, in
    jinja's sandbox as in transformers'. Both operators are bounded, refused at once naming the operation (numbers
    past int-to-str's limit by their bits); ordinary repetition and powers render as before. (Only these two: str
    methods, filters and join can still build huge strings, as kpro/chat_template.py and docs/model.md say.)"""
    pytest.importorskip("jinja2")
    from kpro.tokenizer import ChatTemplateError, render_chat_template
    messages = [{"role": "user", "content": "hi"}]
    for template, message in (("{{ 'a' * 10**12 }}", "repeats a str of 1 item 1,000,000,000,000 times"),
                              ("{{ 10**12 * 'ab' }}", "repeats a str of 2 items 1,000,000,000,000 times"),
                              ("{% set x = [1, 2] %}{{ x * 500001 }}", "repeats a list of 2 items 500,001 times"),
                              ("{{ 2 ** (10**9) }}", "raises 2 to the power 1,000,000,000: a number of more than "
                                                     "100,000 bits"),
                              ("{{ 3 ** 63093 }}", "raises 3 to the power 63,093"),  # 100,000.3 bits
                              ("{{ (10**30) ** 4000 }}", "raises a number of 100 bits to the power 4,000"),
                              ("{{ 2 ** (10**400) }}", "raises 2 to the power a number of 1,329 bits"),  # no float
                              ("{{ 'a' * (10**4400) }}", "repeats a str of 1 item a number of 14,617 bits times")):
        with pytest.raises(ChatTemplateError, match=re.escape(message)):
            render_chat_template(template, messages)
    assert render_chat_template("{{ '-' * 3 }}{{ 2 * 'ab' }}{{ [0] * 2 }}{{ ('x' * 1000000) | length }}", messages) == \
        "---abab[0, 0]1000000"
    assert render_chat_template("{{ 2 ** 100 }} {{ (-3) ** 3 }} {{ 1 ** (10**9) }} {{ 3 ** 63092 > 0 }} {{ 2.5 * 2 }}",
                                messages) == f"{2 ** 100} -27 1 True 5.0"


def test_chat_templates_with_generation_blocks_render_their_body():
    """Templates of assistant-only training mark the assistant's text with {% generation %}: kpro refused them."""
    pytest.importorskip("jinja2")
    from kpro.tokenizer import render_chat_template
    template = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<a>{% generation %}{{ m['content'] }}"
                "{% endgeneration %}{% else %}<u>{{ m['content'] }}{% endif %}{% endfor %}")
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render_chat_template(template, messages) == "<u>hi<a>hello"


def test_a_saved_sentencepiece_tokenizer_keeps_a_chat_template_from_its_own_file(tmp_path):
    """Tokenizer.save wrote tokenizer_config.json only where there was one, and without chat_template.jinja's template."""
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tokenizer.model").write_bytes(MISTRAL.read_bytes())
    (tmp_path / "src" / "chat_template.jinja").write_text("{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}")
    (tmp_path / "out").mkdir()
    kpro.Tokenizer(tmp_path / "src").save(tmp_path / "out")
    again = kpro.load_tokenizer(tmp_path / "out")
    assert again.chat_template == (tmp_path / "src" / "chat_template.jinja").read_text()


def test_a_sentencepiece_tokenizer_without_a_config_removes_a_stale_one_when_saved(tmp_path):
    """Tokenizer.save of a tokenizer without tokenizer_config.json left the one the directory held (an earlier
    model's): the reloaded tokenizer added no bos, had its chat template and another pad."""
    tok = kpro.Tokenizer(MISTRAL)
    stale = {"add_bos_token": False, "chat_template": "{{ messages[0]['content'] }}", "pad_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(stale))
    tok.save(tmp_path)
    again = kpro.load_tokenizer(tmp_path)
    assert (again.add_bos, again.chat_template, again.pad_id) == (True, None, tok.pad_id)
    assert again.encode("hi") == tok.encode("hi") and sorted(p.name for p in tmp_path.iterdir()) == ["tokenizer.model"]


@pytest.mark.parametrize("name", ["tokenizer_config.json", "added_tokens.json", "chat_template.jinja",
                                  "additional_chat_templates/rag.jinja"])
def test_a_tokenizer_file_that_is_not_utf8_is_named(tmp_path, name):
    """A tokenizer_config.json in Latin-1 gave a bare UnicodeDecodeError naming no file (and so did the others)."""
    (tmp_path / "tokenizer.model").write_bytes(MISTRAL.read_bytes())
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_bytes('{"eos_token": "\u00e9"}'.encode("latin-1"))
    with pytest.raises(ValueError, match=f"{tmp_path / name} is not UTF-8 text"):
        kpro.load_tokenizer(tmp_path)


@pytest.mark.parametrize("tok", [kpro.CharTokenizer("ab"), kpro.SymbolTokenizer(["a"]), kpro.Tokenizer(MISTRAL)],
                         ids=["char", "symbol", "sentencepiece"])
def test_saving_into_a_directory_that_does_not_exist_names_it(tmp_path, tok):
    """save raised FileNotFoundError naming 'nonexist/dir/.kpro_char_tokenizer.json.tmp-4763', a temporary."""
    with pytest.raises(FileNotFoundError, match=f"cannot save the tokenizer into {tmp_path / 'no' / 'dir'}: it does "
                                                "not exist; create it first"):
        tok.save(tmp_path / "no" / "dir")
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError, match=f"cannot save the tokenizer into {tmp_path / 'file'}: it is a file"):
        tok.save(tmp_path / "file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


@pytest.mark.parametrize("pad_id", [None, 1.5, -1, 32000, True])
def test_pad_left_refuses_a_pad_that_is_no_token_id(pad_id):
    """1.5 was read as 1; None failed inside torch.full; 32000 was named later as an id outside the vocabulary."""
    with pytest.raises(ValueError, match=r"pad_id must be a token id \(an integer in \[0, 32000\)\), got"):
        kpro.pad_left([[5, 6], [7]], pad_id, vocab_size=32000)


def test_symbol_tokenizer_from_texts_refuses_one_str():
    """from_texts("12 * 34") took the str as texts, character by character: a vocabulary of '1', '2', '*', ...
    that then refused '12' in the very text it was built from."""
    with pytest.raises(TypeError, match="from_texts takes a list of texts as texts, got one str"):
        kpro.SymbolTokenizer.from_texts("12 * 34 #### 408")
    assert kpro.SymbolTokenizer.from_texts(["12 * 34 #### 408"]).symbols == ("####", "*", "12", "34", "408")
    with pytest.raises(TypeError, match="from_texts takes a list of symbols as extra, got one str '####'"):
        kpro.SymbolTokenizer.from_texts(["1 2"], extra="####")


def test_an_empty_conversation_is_refused():
    """apply_chat_template([]) rendered a bare generation prompt (transformers refuses an empty conversation)."""
    pytest.importorskip("jinja2")
    from kpro.tokenizer import render_chat_template
    template = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    for messages in ([], ()):
        with pytest.raises(ValueError, match="messages is empty: a chat template renders a conversation of at least "
                                             "one message"):
            render_chat_template(template, messages)


def test_save_writes_the_model_that_was_loaded(tmp_path):
    """Tokenizer.save read tokenizer.model again from where it was loaded: replaced since, it saved the other model
    under this tokenizer's config; gone (a temporary download), a bare FileNotFoundError on the old path."""
    (tmp_path / "src").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "src" / "tokenizer.model").write_bytes(MISTRAL.read_bytes())
    tok = kpro.Tokenizer(tmp_path / "src")
    (tmp_path / "src" / "tokenizer.model").write_bytes((DATA / "sentencepiece_test_model.model").read_bytes())
    tok.save(tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.model").read_bytes() == MISTRAL.read_bytes()
    (tmp_path / "src" / "tokenizer.model").unlink()
    (tmp_path / "src").rmdir()
    tok.save(tmp_path / "out")
    assert kpro.load_tokenizer(tmp_path / "out").encode("Hello world") == [1, 22557, 1526]


# ------------------------------------------------------------- legacy: a leading-space piece after a control piece

# Text around control pieces: at the start, in the middle, at the end, several in a row, empty stretches between
CONTROL_TEXTS = ["<s>[INST] Hi [/INST]", "Hello <s>.", "a</s>b", "x<s>", "hi</s>", "<s></s>", "</s></s>x",
                 "<s></s><s>[INST] 2 + 2 [/INST]", "</s>\nUser: été", "<s>[INST] 🦙 [/INST]</s>"]
# Stretches after a control piece that open with a space or ▁. Under legacy true SentencePiece writes its leading-space
# piece before them (" x": ▁ ▁x), transformers 5's Metaspace none where the text already opens with one (▁x)
SPACED = [("<s>", " x"), ("<s>", "▁x"), ("</s>", "  two spaces"), ("<s>", " ")]  # (control piece, stretch)
MISTRAL_CHAT = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def mistral_tokenizer_json(tmp_path_factory):
    """Mistral 7B's vocabulary as a tokenizer.json written by transformers' own LlamaTokenizer. transformers 5 reads
    a bare tokenizer.model only with the protobuf package (not a kpro dependency, not installed here); from a
    tokenizer.json it takes the vocabulary and merges, and builds its pre-tokenizer from `legacy`."""
    pytest.importorskip("transformers")
    import sentencepiece
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    sp = sentencepiece.SentencePieceProcessor(model_file=str(MISTRAL))
    vocab = {sp.IdToPiece(i): i for i in range(sp.GetPieceSize())}
    merged = {sp.IdToPiece(i): sp.GetScore(i) for i in range(sp.GetPieceSize())  # SentencePiece merges by score
              if not (sp.IsControl(i) or sp.IsUnknown(i) or sp.IsByte(i) or sp.IsUnused(i))}
    path = tmp_path_factory.mktemp("mistral") / "tokenizer.json"
    LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, merged)).backend_tokenizer.save(str(path))
    return path


def mistral_folder(directory: Path, tokenizer_json: Path, **config) -> Path:
    """tokenizer.model, tokenizer.json and a tokenizer_config.json holding `config`, as Mistral 7B ships them."""
    directory.mkdir()
    (directory / "tokenizer.model").write_bytes(MISTRAL.read_bytes())
    (directory / "tokenizer.json").write_bytes(tokenizer_json.read_bytes())
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "chat_template": MISTRAL_CHAT, **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("legacy", [True, False])
def test_text_after_a_control_piece_is_encoded_as_transformers_does_for_legacy(tmp_path, mistral_tokenizer_json, legacy):
    """kpro read no `legacy`: under `legacy: false` it still wrote SentencePiece's leading-space piece after every
    control piece, where transformers writes none (Mistral 7B's <s>[INST]: ▁[ 733 against [ 28792)."""
    import sentencepiece
    from transformers import AutoTokenizer

    folder = mistral_folder(tmp_path / "mistral", mistral_tokenizer_json, legacy=legacy)
    ours, theirs = kpro.Tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    assert theirs.legacy is legacy
    spaced = [control + stretch for control, stretch in SPACED]
    for text in CONTROL_TEXTS + ([] if legacy else spaced):
        assert ours.encode_with_special_tokens(text) == theirs.encode(text, add_special_tokens=False), repr(text)
    assert ours.encode_with_special_tokens("<s>[INST]")[1] == (733 if legacy else 28792)  # ▁[ or [
    assert ours.legacy is legacy
    sp = sentencepiece.SentencePieceProcessor(model_file=str(MISTRAL))
    if legacy:  # kpro follows SentencePiece, as Meta's reference code encodes each stretch (docs/model.md)
        for control, stretch in SPACED:
            assert ours.encode_with_special_tokens(control + stretch) == [sp.PieceToId(control)] + \
                sp.EncodeAsIds(stretch), repr(control + stretch)
    # the first stretch is the text's opening, in both: SentencePiece's ▁ ▁Hello for " Hello" (transformers 5: ▁Hello)
    assert ours.encode_with_special_tokens(" Hello</s>")[:-1] == sp.EncodeAsIds(" Hello") == [28705, 22557]


@pytest.mark.parametrize("legacy", [True, False])
def test_a_chat_template_renders_the_ids_transformers_renders_for_legacy(tmp_path, mistral_tokenizer_json, legacy):
    """apply_chat_template encodes with encode_with_special_tokens: under `legacy: false` its ids differed from
    transformers' after every <s> and </s> of the conversation."""
    from transformers import AutoTokenizer

    folder = mistral_folder(tmp_path / "mistral", mistral_tokenizer_json, legacy=legacy)
    ours, theirs = kpro.Tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    messages = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4"},
                {"role": "user", "content": "And 3 + 3?"}]
    assert ours.apply_chat_template(messages, tokenize=False) == theirs.apply_chat_template(messages, tokenize=False)
    assert ours.apply_chat_template(messages) == theirs.apply_chat_template(messages)["input_ids"]


@pytest.mark.parametrize("legacy", [True, False])
def test_the_unknown_piece_written_in_text_is_its_id_as_in_transformers(tmp_path, mistral_tokenizer_json, legacy):
    """`<unk>` in a chat text was spelled out as text (▁< unk >); transformers splits every special token out of
    the text, the unknown piece too, as it does the control pieces <s> and </s>."""
    from transformers import AutoTokenizer

    folder = mistral_folder(tmp_path / "mistral", mistral_tokenizer_json, legacy=legacy)
    ours, theirs = kpro.Tokenizer(folder), AutoTokenizer.from_pretrained(str(folder))
    # " y" after it: transformers 5 writes ▁y, SentencePiece ▁ ▁y under legacy true (SPACED above)
    for text in ("a<unk>b", "<unk>", "<s><unk></s>", "x<unk>", *([] if legacy else ["x <unk> y"])):
        assert ours.encode_with_special_tokens(text) == theirs.encode(text, add_special_tokens=False), repr(text)
    assert ours.encode_with_special_tokens("a<unk>b")[1] == 0


@pytest.mark.parametrize("file_legacy", [True, False])
def test_a_tokenizer_json_whose_legacy_contradicts_the_config_is_refused(tmp_path, mistral_tokenizer_json, file_legacy):
    """A tokenizer.json alone, of a LlamaTokenizer: transformers 5 rebuilds its pre-tokenizer from the config's
    `legacy`, the file says otherwise where they disagree, and kpro's JsonTokenizer followed the file without a
    word (its ids differed from transformers 5's after every special token). Where they agree both give
    transformers' ids; without the key, the file is followed."""
    from transformers import AutoTokenizer, LlamaTokenizer

    built = LlamaTokenizer.from_pretrained(str(mistral_tokenizer_json.parent), legacy=file_legacy)
    for config_legacy in (True, False, None):
        folder = tmp_path / f"{file_legacy}-{config_legacy}"
        folder.mkdir()
        built.backend_tokenizer.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        (folder / "tokenizer_config.json").write_text(json.dumps(
            config if config_legacy is None else {**config, "legacy": config_legacy}))
        if config_legacy is None:  # the file's: ▁x after </s> or not
            assert kpro.load_tokenizer(folder).encode_with_special_tokens("</s>x")[1] == (1318 if file_legacy else 28744)
        elif config_legacy != file_legacy:
            with pytest.raises(ValueError, match=f"says legacy {json.dumps(config_legacy)}, but .*tokenizer.json "
                                                 f"writes {'the' if file_legacy else 'no'} leading-space piece"):
                kpro.load_tokenizer(folder)
        else:
            theirs = AutoTokenizer.from_pretrained(str(folder))
            for text in CONTROL_TEXTS:
                assert kpro.load_tokenizer(folder).encode_with_special_tokens(text) == \
                    theirs.encode(text, add_special_tokens=False), repr(text)


def test_legacy_is_kept_by_save_and_written_where_it_was_absent(tmp_path, mistral_tokenizer_json):
    """Tokenizer.save wrote tokenizer_config.json as it was read: a tokenizer set to `legacy: false` came back as
    true, and a file without the key stayed without it, which transformers 5's LlamaTokenizer reads as false."""
    from transformers import AutoTokenizer

    absent = mistral_folder(tmp_path / "absent", mistral_tokenizer_json)
    tok = kpro.Tokenizer(absent)
    assert tok.legacy is True  # where the key is absent, as transformers 4 read it and kpro did (docs/model.md)
    (tmp_path / "saved").mkdir()  # with the tokenizer.json save keeps (transformers reads no bare tokenizer.model)
    (tmp_path / "saved" / "tokenizer.json").write_bytes(mistral_tokenizer_json.read_bytes())
    tok.save(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["legacy"] is True
    assert AutoTokenizer.from_pretrained(str(tmp_path / "saved")).legacy is True  # transformers now agrees
    tok.legacy = False
    tok.save(tmp_path / "saved")
    again = kpro.Tokenizer(tmp_path / "saved")
    assert again.legacy is False and again.encode_with_special_tokens("<s>[INST]") == [1, 28792, 16289, 28793]
    bare = kpro.Tokenizer(MISTRAL)  # no tokenizer_config.json at all: one is written to hold legacy false
    bare.legacy = False
    (tmp_path / "bare").mkdir()
    bare.save(tmp_path / "bare")
    assert kpro.Tokenizer(tmp_path / "bare").legacy is False


@pytest.mark.parametrize("value", ["false", 0, [False]])
def test_a_legacy_that_is_not_a_bool_is_refused(tmp_path, value):
    """tokenizer_config.json's `legacy` was not read: "false" (a string) passed without a word."""
    (tmp_path / "tokenizer.model").write_bytes(MISTRAL.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": value}))
    with pytest.raises(ValueError, match=r"tokenizer_config.json: \"legacy\" must be true or false, got "
                                         + re.escape(json.dumps(value))):
        kpro.Tokenizer(tmp_path)


def test_a_null_legacy_is_read_as_an_absent_one(tmp_path):
    """transformers 4 wrote `"legacy": null` for a tokenizer whose legacy was never set, and read it as true."""
    (tmp_path / "tokenizer.model").write_bytes(MISTRAL.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": None}))
    tok = kpro.Tokenizer(tmp_path)
    assert tok.legacy is True and tok.encode_with_special_tokens("<s>[INST]")[1] == 733  # ▁[


def test_add_prefix_space_false_is_refused(tmp_path):
    """`add_prefix_space: false` (no leading-space piece before a text) was ignored: kpro wrote one anyway."""
    (tmp_path / "tokenizer.model").write_bytes(MISTRAL.read_bytes())
    for value in (True, None):  # what kpro does: taken
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_prefix_space": value}))
        assert kpro.Tokenizer(tmp_path).encode("hi", bos=False) == [12014]  # ▁hi
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"add_prefix_space": False}))
    with pytest.raises(ValueError, match=r"\"add_prefix_space\" false is not implemented by kpro's SentencePiece"):
        kpro.Tokenizer(tmp_path)


def test_legacy_false_is_refused_for_a_model_that_drops_the_spaces_opening_a_text(tmp_path):
    """A model whose normalizer removes leading spaces (sentencepiece's test model) would lose the space of
    `<s> hi` without its dummy prefix; kpro encoded it with the prefix, ignoring `legacy: false`."""
    (tmp_path / "tokenizer.model").write_bytes((DATA / "sentencepiece_test_model.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": False}))
    with pytest.raises(ValueError, match="legacy false .* needs a model that keeps the spaces opening a text"):
        kpro.Tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": True}))
    assert kpro.Tokenizer(tmp_path).encode_with_special_tokens("<s> hi")[0] == 1


def test_writing_the_unknown_piece_leaves_the_special_ids_as_they_were():
    """encode_with_special_tokens added the unknown piece to the cached control pieces it splits out: from the first
    chat text on, `special_ids` (what decoding and the ICoT evaluation take for special) held <unk> too."""
    tok = kpro.Tokenizer(MISTRAL)
    before = tok.special_ids
    assert tok.encode_with_special_tokens("a<unk>b") == [264, 0, 287]
    assert tok.special_ids == before == {1, 2}
    assert tok.encode_with_special_tokens("a<unk>b<s>") == [264, 0, 287, 1]
