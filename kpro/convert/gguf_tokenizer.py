"""A GGUF file's vocabulary as the tokenizer files of a Hugging Face checkpoint directory.

llama.cpp stores a tokenizer as metadata: `tokenizer.ggml.model` (its kind), the tokens, their types, the BPE
merges or SentencePiece scores, `tokenizer.ggml.pre` (how text is split before BPE), the special ids and
the chat template. Two kinds are converted:

- `gpt2`, byte-level BPE (SmolLM, LLaMA 3, ...): `tokenizer.json`, built with the `tokenizers` library.
  The pre-tokenizer follows llama.cpp's rule for the file's `pre` type (`_PRE_TOKENIZERS`); a type kpro has
  no rule for is refused by name rather than split differently from the model's training.
- `llama`, SentencePiece BPE (LLaMA 1/2, Mistral, TinyLlama): `tokenizer.model`, the SentencePiece model
  rebuilt from the pieces, scores and types (written as protobuf by `_sentencepiece_model`; no protobuf
  package needed), so kpro.Tokenizer and SentencePiece itself read it.

Both come with `tokenizer_config.json` (special tokens, whether a bos is added, the chat template), which
kpro.load_tokenizer and transformers' AutoTokenizer read.
"""
from __future__ import annotations

import json
import struct

from .gguf_file import GGUFError, GGUFFile

# llama.cpp's token types (the same numbers as SentencePiece's piece types).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# LLaMA 3's split (tiktoken's cl100k pattern), as llama.cpp applies it for `llama-bpe`.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _gpt2():
    from tokenizers import pre_tokenizers
    return pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)


def _digits_then_gpt2():
    from tokenizers import pre_tokenizers
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2()])


def _llama3():
    from tokenizers import Regex, pre_tokenizers
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False)])


# `tokenizer.ggml.pre` -> the pre-tokenizer that splits text as llama.cpp does for it:
#   gpt-2                      the GPT-2 regex
#   smollm, starcoder, refact  every digit on its own (\p{N}), then the GPT-2 regex
#   llama-bpe (LLaMA 3)        the LLaMA 3 regex, and whole words found in the vocabulary skip the merges
_PRE_TOKENIZERS = {"gpt-2": _gpt2, "smollm": _digits_then_gpt2, "starcoder": _digits_then_gpt2,
                   "refact": _digits_then_gpt2, "llama-bpe": _llama3, "llama3": _llama3, "llama-v3": _llama3}
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}
_ADD_BOS_BY_DEFAULT = {"llama-bpe", "llama3", "llama-v3"}


def tokenizer_files(file: GGUFFile, cfg) -> dict[str, str | bytes]:
    """File name -> content: the tokenizer (tokenizer.json or tokenizer.model) and tokenizer_config.json."""
    kind = file.get("tokenizer.ggml.model")
    tokens = file.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise GGUFError(f"{file.path} holds no tokenizer (tokenizer.ggml.model / tokenizer.ggml.tokens)")
    if len(tokens) != cfg.vocab_size:
        raise GGUFError(f"{file.path}: the vocabulary has {len(tokens)} tokens, the model {cfg.vocab_size} rows")
    given_types = file.get("tokenizer.ggml.token_type")
    types = list(given_types) if given_types else [NORMAL] * len(tokens)
    if len(types) != len(tokens):  # zip() would cut the vocabulary short
        raise GGUFError(f"{file.path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    # Where the key is missing, llama.cpp's defaults: a bos for SentencePiece and for the LLaMA 3 pre-tokenizer
    add_bos = _flag(file, "tokenizer.ggml.add_bos_token", kind == "llama" or file.get("tokenizer.ggml.pre") in
                    _ADD_BOS_BY_DEFAULT)
    add_eos = _flag(file, "tokenizer.ggml.add_eos_token", False)
    ids = {name: file.get(f"tokenizer.ggml.{key}_token_id")
           for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding"))}
    for name, token_id in ids.items():
        if token_id is not None and not 0 <= token_id < len(tokens):
            raise GGUFError(f"{file.path}: the {name} token id {token_id} is outside the vocabulary of {len(tokens)}")
    if kind == "llama" and not given_types and ids["unk"] is not None:
        types[ids["unk"]] = UNKNOWN  # no types given: SentencePiece still needs its unknown piece typed as one
    if kind == "gpt2":
        if ids["eos"] is None and not cfg.eos_token_ids:  # the converted tokenizer would not load
            raise GGUFError(f"{file.path}: the vocabulary names no end token (tokenizer.ggml.eos_token_id, "
                            "eot_token_id or eom_token_id) and has none llama.cpp knows by its text (<|im_end|>, "
                            "<|eot_id|>, ...); kpro's tokenizers need one")
        files = {"tokenizer.json": _byte_level_bpe(file, tokens, types, ids, add_bos, add_eos)}
        tokenizer_class = "PreTrainedTokenizerFast"
    elif kind == "llama":
        files = {"tokenizer.model": _sentencepiece_model(file, tokens, types, ids)}
        tokenizer_class = "LlamaTokenizer"
    else:
        raise GGUFError(f"{file.path}: tokenizer model {kind!r} is not supported; kpro converts 'gpt2' (byte-level "
                        "BPE) and 'llama' (SentencePiece)")
    config = {"add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
              "model_max_length": cfg.max_position_embeddings, "tokenizer_class": tokenizer_class}
    for name, token_id in ids.items():
        config[f"{name}_token"] = tokens[token_id] if token_id is not None else None
    if kind == "llama":  # llama.cpp opens the text after every special token with the leading-space piece: read as
        config["legacy"] = True  # legacy false (transformers 5's default where it is absent), it would lose it
    templates = chat_templates(file)
    if list(templates) == ["default"]:
        config["chat_template"] = templates["default"]
    elif templates:  # transformers' form of several: a list of names and templates
        config["chat_template"] = [{"name": name, "template": text} for name, text in templates.items()]
    files["tokenizer_config.json"] = json.dumps(config, indent=2, ensure_ascii=False) + "\n"
    return files


def _flag(file: GGUFFile, key: str, default: bool) -> bool:
    """A boolean metadata key; any other type is refused (bool("false") would be true), as llama.cpp refuses it."""
    value = file.get(key, default)
    if not isinstance(value, bool):
        raise GGUFError(f"{file.path}: metadata {key} must be a boolean, got {value!r}; the file is malformed")
    return value


def chat_templates(file: GGUFFile) -> dict[str, str]:
    """The chat templates by name: `tokenizer.chat_template` (the default) and each name `tokenizer.chat_templates`
    lists (or a `tokenizer.chat_template.NAME` key has: tool_use, rag, ...)."""
    prefix = "tokenizer.chat_template."
    listed = file.get("tokenizer.chat_templates") or []
    names = list(dict.fromkeys([*listed, *(key[len(prefix):] for key in file.metadata if key.startswith(prefix))]))
    templates = {}
    if file.get("tokenizer.chat_template"):
        templates["default"] = file.get("tokenizer.chat_template")
    for name in names:
        text = file.get(prefix + name)
        if not isinstance(text, str) or not text:
            raise GGUFError(f"{file.path}: tokenizer.chat_templates names a template {name!r}, but {prefix}{name} "
                            "holds no template")
        templates[name] = text
    return templates


def _vocabulary(file: GGUFFile, tokens: list[str]) -> dict[str, int]:
    vocab = {}
    for i, token in enumerate(tokens):
        if token in vocab:
            raise GGUFError(f"{file.path}: token {token!r} appears twice in the vocabulary (ids {vocab[token]} and {i})")
        vocab[token] = i
    return vocab


def _byte_level_bpe(file: GGUFFile, tokens, types, ids, add_bos: bool, add_eos: bool) -> str:
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    except ImportError:
        raise ImportError("building tokenizer.json needs the `tokenizers` package: pip install 'kpro[gguf]'") from None
    pre = file.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise GGUFError(f"{file.path}: pre-tokenizer {pre!r} is not supported (kpro splits text like llama.cpp for "
                        f"{', '.join(sorted(_PRE_TOKENIZERS))})")
    merges = file.get("tokenizer.ggml.merges")
    if not merges:
        raise GGUFError(f"{file.path}: a byte-level BPE vocabulary without merges (tokenizer.ggml.merges)")
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFError(f"{file.path}: merge {merge!r} is not two tokens separated by one space")
        pairs.append((parts[0], parts[1]))
    model = models.BPE(vocab=_vocabulary(file, tokens), merges=pairs, fuse_unk=False, byte_fallback=False,
                       ignore_merges=pre in _IGNORE_MERGES)
    tok = Tokenizer(model)
    tok.pre_tokenizer = _PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>, <|eot_id|>, ...) are special: matched whole in text, skipped when decoding
    # with skip_special_tokens; user-defined ones are matched whole and decoded.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    tok.post_processor = _post_processor(tokens, ids, add_bos, add_eos, processors)
    return tok.to_str(pretty=True)


def _post_processor(tokens, ids, add_bos: bool, add_eos: bool, processors):
    marks, specials = [], []
    for wanted, key in ((add_bos, "bos"), (add_eos, "eos")):
        if wanted:
            if ids[key] is None:
                raise GGUFError(f"the tokenizer adds a {key} token but defines no {key} id")
            marks.append(tokens[ids[key]])
            specials.append((tokens[ids[key]], ids[key]))
    if not marks:
        return processors.ByteLevel(trim_offsets=False)
    bos = [tokens[ids["bos"]]] if add_bos else []
    eos = [tokens[ids["eos"]]] if add_eos else []
    single = " ".join(bos + ["$A"] + eos)
    pair = " ".join(bos + ["$A"] + eos + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=list(dict.fromkeys(specials)))


# ------------------------------------------------------------------------------ SentencePiece model

def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are written as 64-bit two's complement
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(int(value))


def _bytes(field: int, value: bytes | str) -> bytes:
    value = value.encode() if isinstance(value, str) else value
    return _varint(field << 3 | 2) + _varint(len(value)) + value


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _sentencepiece_model(file: GGUFFile, tokens, types, ids) -> bytes:
    """A SentencePiece BPE ModelProto holding the file's pieces (piece = 1, score = 2, type = 3), with the
    normalizer LLaMA's tokenizer.model uses (identity, a dummy-prefix space, whitespace as U+2581)."""
    scores = file.get("tokenizer.ggml.scores")
    if not scores or len(scores) != len(tokens):
        raise GGUFError(f"{file.path}: a SentencePiece vocabulary needs one score per token (tokenizer.ggml.scores)")
    _vocabulary(file, tokens)
    unknown = [t for t in types if t not in (NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE)]
    if unknown:
        raise GGUFError(f"{file.path}: token type {unknown[0]} is not a SentencePiece piece type")
    if ids["eos"] is None or ids["unk"] is None:
        raise GGUFError(f"{file.path}: a SentencePiece vocabulary needs eos and unknown token ids")
    if types[ids["unk"]] != UNKNOWN:  # SentencePiece refuses such a model ("unk is not defined") when it is loaded
        raise GGUFError(f"{file.path}: the unknown token {tokens[ids['unk']]!r} (id {ids['unk']}) has token type "
                        f"{types[ids['unk']]}, not UNKNOWN ({UNKNOWN})")
    pieces = b"".join(_bytes(1, _bytes(1, t) + _float(2, s) + _int(3, k)) for t, s, k in zip(tokens, scores, types))
    special = {}
    for name, field_id, field_piece in (("unk", 40, 45), ("bos", 41, 46), ("eos", 42, 47), ("pad", 43, 48)):
        token_id = ids[name]
        usable = token_id is not None and (name in ("unk", "eos", "bos") or types[token_id] == CONTROL)
        special[name] = (field_id, token_id if usable else -1, field_piece, tokens[token_id] if usable else None)
    trainer = _int(3, 2) + _int(4, len(tokens)) + _int(35, any(k == BYTE for k in types))  # model_type BPE
    for field_id, token_id, field_piece, piece in special.values():
        trainer += _int(field_id, token_id) + (_bytes(field_piece, piece) if piece is not None else b"")
    add_prefix = _flag(file, "tokenizer.ggml.add_space_prefix", True)
    normalizer = _bytes(1, "identity") + _int(3, add_prefix) + _int(4, False) + _int(5, True)
    return pieces + _bytes(2, trainer) + _bytes(3, normalizer)
