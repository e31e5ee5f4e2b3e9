"""Tokenizers: SentencePiece `tokenizer.model` files (LLaMA 1/2, Mistral), Hugging Face `tokenizer.json` files
(byte-level BPE: SmolLM, LLaMA 3, ...; built on the `tokenizers` library, an optional extra), a character
tokenizer for the synthetic tasks (digits, operators, letters), and a symbol tokenizer for tasks written as
space-separated symbols (`9 1 7 3 * 9 4 3 3`); the last two need no model file.

All share one interface: `encode(text, bos=, eos=)`, `decode(ids)`, batch versions, `bos_id`, `eos_id`,
`pad_id`, `special_ids`, `vocab_size`, `add_bos`, `pad_left(seqs)` for batched generation, `save(directory)`, and
`apply_chat_template(messages)` where the checkpoint has a chat template (rendered with jinja2, as Hugging
Face renders it).
"""
from __future__ import annotations

import functools
import json
import numbers
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from ._files import write_atomic
# ChatTemplateError and render_chat_template are this module's names too
from .chat_template import ChatTemplateError, render_chat_template, without_transformers_options  # noqa: F401
from .errors import listed

if TYPE_CHECKING:  # torch only where tensors are made (pad_left): `kpro tokenize`'s workers never import it
    import torch

SENTENCEPIECE_FILE = "tokenizer.model"
TOKENIZER_JSON_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"  # transformers' NAME.jinja files of a checkpoint's other templates
CHAT_TEMPLATE_FILES = (CHAT_TEMPLATE_FILE, CHAT_TEMPLATE_DIR)  # read before tokenizer_config.json's templates
CHAR_TOKENIZER_FILE = "kpro_char_tokenizer.json"
SYMBOL_TOKENIZER_FILE = "kpro_symbol_tokenizer.json"
ADDED_TOKENS_FILE = "added_tokens.json"  # transformers' tokens added to a vocabulary
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"  # transformers' older record of the special tokens
# The classes whose pre-tokenizer transformers 5 builds from tokenizer_config.json's `legacy`, not tokenizer.json's
LLAMA_TOKENIZER_CLASSES = ("LlamaTokenizer", "LlamaTokenizerFast")
# A SentencePiece NormalizerSpec (a ModelProto's field 3) holding add_dummy_prefix (its field 3) = false. Protobuf
# merges a message field that occurs twice, so appended to a model it turns off that one setting and keeps the rest
NO_DUMMY_PREFIX = bytes([3 << 3 | 2, 2, 3 << 3 | 0, 0])


def checked_text(text, what: str = "text") -> str:
    """`text` if it is a str of Unicode text: a list given to `encode` (or a str to `encode_batch`) would be
    taken apart item by item, or character by character, instead of refused."""
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}" +
                        (" (encode_batch takes a list of texts)" if isinstance(text, (list, tuple)) else ""))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # JSON's "\ud800": the tokenizers' C++ fails with an error naming nothing
        raise ValueError(f"{what} holds a lone surrogate ({text[err.start]!r} at character {err.start}), which is "
                         "not Unicode text") from None
    return text


def checked_texts(texts) -> list[str]:
    if isinstance(texts, str):
        raise TypeError("encode_batch takes a list of texts, got one str (which would be encoded character by "
                        "character); use encode for one text")
    return [checked_text(text, f"texts[{i}]") for i, text in enumerate(texts)]


def checked_ids(ids, vocab_size: int | None, what: str = "ids") -> list[int]:
    """Token ids as a list of ints, each in [0, vocab_size) (or >= 0 without a vocabulary). Floats and bools
    (truncated or taken as 0/1 otherwise) and ids outside the vocabulary (dropped or misread otherwise) are
    refused, naming the first."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__len__") and not hasattr(ids, "tolist"):
        raise TypeError(f"{what} must be a sequence of token ids, got {type(ids).__name__}")
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors and arrays: Python numbers
    if not isinstance(values, list):
        raise TypeError(f"{what} must be a sequence of token ids, got a single value {values!r}")
    for i, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{what}[{i}] is {value!r}: token ids are integers")
        if value < 0 or (vocab_size is not None and value >= vocab_size):
            raise ValueError(f"{what}[{i}] = {value} is outside the vocabulary [0, {vocab_size or 'inf'})")
    return [int(value) for value in values]


def special_token_in(tok, ids) -> str | None:
    """Which of the tokenizer's bos and eos ids is among `ids` ("eos (id 2)"), or None: text that spells a
    special token (`</s>`, `<|im_end|>`) encodes to it with a tokenizer.json, and data holding one would end
    or restart its sequence where it stands. (Padding is masked by length, so a pad id in text is only text.)"""
    special = {getattr(tok, f"{name}_id", None): name for name in ("bos", "eos")}
    found = next((i for i in ids if i in special and i is not None), None)
    return None if found is None else f"{special[found]} (id {found})"


def document_bos_id(tok) -> int | None:
    """The bos opening each document of a pretraining stream: the tokenizer's where `encode(text)` adds one,
    else none (SmolLM2's bos `<|im_start|>` marks a chat turn, and its documents open with none)."""
    return tok.bos_id if tok.add_bos else None


class _TokenizerBase:
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int
    chat_template: str | None = None

    chat_templates: Mapping[str, str] = MappingProxyType({})  # every template by name, the default as "default"

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, *, tokenize: bool = True,
                            chat_template: str | None = None, **variables):
        """The conversation `messages` ([{"role": "user", "content": "..."}, ...]) rendered with the
        checkpoint's chat template: token ids (the template writes its own bos and special tokens), or the
        text with `tokenize=False`. `variables` reach the template too (`tools=`, `date_string=`, ...), except
        transformers' call options kpro does not implement (`continue_final_message`, `return_tensors`,
        `return_dict`, ...), refused unless given as what kpro does (`return_dict=False`).
        `chat_template`: the name of one of the checkpoint's templates, or a template's text; by default, as
        transformers chooses, its "tool_use" template where `tools` are given and it has one, else its default."""
        variables = without_transformers_options(variables)
        template = self._chosen_template(chat_template, variables.get("tools"))
        text = render_chat_template(template, messages, add_generation_prompt=add_generation_prompt,
                                    **{**self.special_tokens(), **variables})
        return self.encode_with_special_tokens(text) if tokenize else text

    def _templates(self) -> dict[str, str]:
        """chat_templates, with `chat_template` (which a user may have set) as the default."""
        templates = {name: text for name, text in self.chat_templates.items() if name != "default"}
        return {"default": self.chat_template, **templates} if self.chat_template else templates

    def _chosen_template(self, chat_template: str | None, tools) -> str:
        templates = self._templates()
        if chat_template is not None:
            if not isinstance(chat_template, str):
                raise TypeError(f"chat_template must be a template's name or text, got {type(chat_template).__name__}")
            if chat_template in templates:
                return templates[chat_template]
            if "{{" in chat_template or "{%" in chat_template:
                return chat_template
            raise ValueError(f"no chat template named {chat_template!r} (this {type(self).__name__} has "
                             f"{', '.join(map(repr, templates)) or 'none'}); a template's own text is taken too")
        if tools is not None and "tool_use" in templates:
            return templates["tool_use"]
        if "default" in templates:
            return templates["default"]
        if templates:
            raise ValueError(f"this {type(self).__name__} has chat templates {', '.join(map(repr, templates))} and "
                             "no default: pass chat_template= one of them")
        raise ValueError(f"this {type(self).__name__} has no chat template (a checkpoint keeps it in "
                         f"{TOKENIZER_CONFIG_FILE} as \"chat_template\", or in {CHAT_TEMPLATE_FILE})")

    def special_tokens(self) -> dict[str, str | None]:
        """bos_token, eos_token, ... as text, for chat templates."""
        return {}

    @property
    def special_ids(self) -> frozenset[int]:
        """The ids of the special tokens: bos, eos, pad, and any other that `decode` writes as nothing (a
        SentencePiece model's control pieces, a tokenizer.json's special added tokens)."""
        return frozenset(i for i in (self.bos_id, self.eos_id, self.pad_id) if i is not None)

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """`text` as ids, special tokens written in it (`<|im_start|>`, `<s>`) becoming their ids; no bos added."""
        return self.encode(text, bos=False, eos=False)

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = False) -> list[int]:
        """Ids of `text`; `bos`, `eos` None: as the tokenizer does (`add_bos`, `add_eos`)."""
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], bos: bool | None = None, eos: bool | None = False) -> list[list[int]]:
        return [self.encode(text, bos=bos, eos=eos) for text in checked_texts(texts)]

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def pad_left(self, sequences: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_left(sequences, self.pad_id, device=device, vocab_size=self.vocab_size)


class TokensNotInSentencePiece(ValueError):
    """A directory's tokenizer.model lacks tokens its tokenizer uses (Tokenizer._check_added_tokens)."""


class NotSentencePiece(ValueError):
    """A tokenizer.model that SentencePiece cannot read (LLaMA 3's tiktoken BPE file has that name too)."""


class Tokenizer(_TokenizerBase):
    """A SentencePiece model: `Tokenizer("dir/tokenizer.model")` or `Tokenizer("dir")`."""

    def __init__(self, path: str | os.PathLike):
        import sentencepiece

        path = Path(path)
        if path.is_dir():
            path = path / SENTENCEPIECE_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no SentencePiece model at {path}")
        self.path = path
        self.sp = sentencepiece.SentencePieceProcessor()
        self._model = path.read_bytes()  # what save writes: the file may be replaced or gone by then
        try:
            self.sp.LoadFromSerializedProto(self._model)
        except (OSError, RuntimeError) as err:
            raise NotSentencePiece(f"{path} is not a SentencePiece model: {err}") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.config = read_tokenizer_config(path.parent)
        added = path.parent / ADDED_TOKENS_FILE  # part of the tokenizer (transformers' LlamaTokenizer reads it): saved
        self._added_tokens = added.read_bytes() if added.is_file() else None
        self._check_added_tokens()
        # tokenizer_config.json's special tokens where it names them (a fine-tune's eos <|im_end|>), else the model's
        self.bos_id = self._special_id("bos", self.sp.bos_id())
        self.eos_id = self._special_id("eos", self.sp.eos_id())
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path} defines no bos/eos pieces; kpro needs both")
        # LLaMA and Mistral models define no pad piece; padding positions are masked, any id will do.
        self.pad_id = self._special_id("pad", self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id)
        self.chat_templates = chat_templates_of(path.parent, self.config)
        self.chat_template = self.chat_templates.get("default")
        # As transformers' LlamaTokenizer: a bos unless tokenizer_config.json says otherwise (a GGUF's
        # add_bos_token false, converted, is written there)
        add_bos = (self.config or {}).get("add_bos_token")
        self.add_bos = add_bos if isinstance(add_bos, bool) else True
        add_eos = (self.config or {}).get("add_eos_token")  # as LlamaTokenizer: an eos only where it says so
        self.add_eos = add_eos if isinstance(add_eos, bool) else False
        self.legacy = legacy_setting(self.config, path.parent)
        if not self.legacy:
            self._unprefixed  # a model it cannot apply to is refused now, not at the first chat template

    def _check_added_tokens(self) -> None:
        """Refuse a directory whose tokenizer.model lacks tokens that matter: the bos or eos tokenizer_config.json
        names, or a token added beside it (tokenizer_config.json's added_tokens_decoder, added_tokens.json) that
        the chat template writes (a ChatML fine-tune's <|im_start|> = 32001, which this class would spell out
        as text). Other added tokens (an unused <pad> = 32000) are left out, as the model never needs them."""
        config = self.config or {}
        added = {}  # token -> (id, the file that adds it)
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            added.update({entry.get("content"): (key, TOKENIZER_CONFIG_FILE) for key, entry in decoder.items()
                          if isinstance(entry, dict) and isinstance(entry.get("content"), str)})
        added_file = _read_json(self.path.parent / ADDED_TOKENS_FILE)
        if isinstance(added_file, dict):
            added.update({token: (key, ADDED_TOKENS_FILE) for token, key in added_file.items()})
        template = "\n".join(chat_templates_of(self.path.parent, config).values())
        lacking = [f"{token!r} (id {key}, from {source}, in the chat template)"
                   for token, (key, source) in added.items()
                   if token in template and str(self._piece_id(token)) != str(key)]
        for name in ("bos", "eos"):
            token = special_token_text(config, name)
            if token is not None and self._piece_id(token) is None:
                lacking.append(f"{token!r} (the {name}_token of {TOKENIZER_CONFIG_FILE})")
        if lacking:
            json_file = self.path.parent / TOKENIZER_JSON_FILE
            raise TokensNotInSentencePiece(
                f"{self.path.parent}: the SentencePiece model {self.path.name} lacks token(s) this tokenizer uses: "
                f"{listed(lacking, 6, ' ...')}; kpro's SentencePiece Tokenizer would "
                "spell them out as text or stop at another eos. " + (
                    f"Open {json_file.name} with kpro.JsonTokenizer (kpro.load_tokenizer does)" if json_file.is_file()
                    else "Save the tokenizer with transformers (tokenizer.save_pretrained writes a tokenizer.json "
                         "holding them), and load it with kpro.JsonTokenizer"))

    def _piece_id(self, token: str) -> int | None:
        token_id = self.sp.PieceToId(token)
        return token_id if 0 <= token_id < self.vocab_size and self.sp.IdToPiece(token_id) == token else None

    def _special_id(self, name: str, default: int) -> int:
        """The id of the `name`_token tokenizer_config.json names among the pieces (a lacking bos or eos was
        refused; a lacking pad, which only masked positions hold, leaves the default)."""
        token = special_token_text(self.config or {}, name)
        found = self._piece_id(token) if token is not None else None
        return default if found is None else found

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = False) -> list[int]:
        """Ids of `text`; no eos unless asked; `bos`, `eos` None: as the config says (`add_bos`, `add_eos`)."""
        ids = self.sp.EncodeAsIds(checked_text(text))
        bos = self.add_bos if bos is None else bos
        eos = self.add_eos if eos is None else eos
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], bos: bool | None = None, eos: bool | None = False) -> list[list[int]]:
        return [self.encode(text, bos=bos, eos=eos) for text in checked_texts(texts)]

    def decode(self, ids) -> str:
        return self.sp.DecodeIds(checked_ids(ids, self.vocab_size))

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(int(token_id))

    def special_tokens(self) -> dict[str, str | None]:
        return {"bos_token": self.sp.IdToPiece(self.bos_id), "eos_token": self.sp.IdToPiece(self.eos_id),
                "unk_token": self.sp.IdToPiece(self.sp.unk_id()), "pad_token": self.sp.IdToPiece(self.pad_id)}

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """SentencePiece reads `<s>` as text: split at the control pieces and the unknown piece first, as
        transformers does, and encode each stretch between them as text of its own. The first stretch opens with
        SentencePiece's leading-space piece, as any text does; a stretch after a control piece does too with
        `legacy: true` in tokenizer_config.json (and where the key is absent), as in Meta's and Mistral's
        reference code, and does not with `legacy: false`, as in transformers (`<s>[INST]`: `▁[` against `[`;
        docs/model.md)."""
        text = checked_text(text)
        controls = dict(self._control_pieces)  # a copy: the unknown piece is split out here, not a control piece
        if self.sp.unk_id() >= 0:  # split out too, as transformers splits out every special token
            controls[self.sp.IdToPiece(self.sp.unk_id())] = self.sp.unk_id()
        if not controls:
            return self.encode(text, bos=False, eos=False)
        pattern = "(" + "|".join(map(re.escape, sorted(controls, key=len, reverse=True))) + ")"
        ids = []
        for i, stretch in enumerate(re.split(pattern, text)):  # text, control, text, control, ..., text
            if i % 2:
                ids.append(controls[stretch])
            elif stretch:  # the first stretch opens the text, the others follow a control piece
                sp = self.sp if i == 0 or self.legacy else self._unprefixed
                ids += sp.EncodeAsIds(stretch)
        return ids

    @functools.cached_property
    def _unprefixed(self):
        """This model without SentencePiece's dummy prefix (the leading-space piece it writes before a text): how
        a stretch after a control piece is encoded with `legacy: false`. A model whose normalizer drops the spaces
        that open a text is refused: a space written after a control piece would be lost."""
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        sp.LoadFromSerializedProto(self._model + NO_DUMMY_PREFIX)
        if not "".join(sp.EncodeAsPieces(" a")).startswith("▁"):
            raise ValueError(
                f"legacy false ({self.path.parent / TOKENIZER_CONFIG_FILE}'s \"legacy\") needs a model that keeps the "
                f"spaces opening a text, and the normalizer of {self.path} removes them: a space written after a "
                "control piece (<s> hi) would be lost. Set \"legacy\" to true (each stretch between control pieces "
                "then opens with the leading-space piece), or remove it")
        return sp

    @property
    def special_ids(self) -> frozenset[int]:
        return super().special_ids | frozenset(self._control_pieces.values())  # decoded as nothing

    @functools.cached_property
    def _control_pieces(self) -> dict[str, int]:
        return {self.sp.IdToPiece(i): i for i in range(self.vocab_size) if self.sp.IsControl(i)}

    def save(self, directory: str | os.PathLike) -> None:
        """tokenizer.model, its added_tokens.json and tokenizer_config.json (with the chat template) into an existing
        directory, where no other tokenizer's files stay."""
        _check_save_directory(directory)
        write_atomic(Path(directory, SENTENCEPIECE_FILE), self._model)
        if self._added_tokens is not None:
            write_atomic(Path(directory, ADDED_TOKENS_FILE), self._added_tokens)
        if self.config is not None or self._templates() or not self.legacy:
            # legacy written even where the file had none: transformers 5 would read its absence as false
            _save_config(directory, {**(self.config or {}), "legacy": self.legacy}, self._templates())
        else:  # as it was read, without one: a config or template left there (an earlier model's) would be read
            Path(directory, TOKENIZER_CONFIG_FILE).unlink(missing_ok=True)
            _remove_chat_template_files(directory)
        own = [SENTENCEPIECE_FILE] + ([ADDED_TOKENS_FILE] if self._added_tokens is not None else [])
        if self._is_fast_form(Path(directory, TOKENIZER_JSON_FILE)):
            # Llama and Mistral checkpoints ship this tokenizer twice, tokenizer.json being transformers' fast form
            # of it (load_tokenizer reads tokenizer.model first): the same tokenizer's files, kept
            own += [TOKENIZER_JSON_FILE, SPECIAL_TOKENS_MAP_FILE]
        _remove_other_tokenizers(directory, keep=tuple(own))

    def _is_fast_form(self, path: Path) -> bool:
        """Whether the tokenizer.json at `path` has this model's vocabulary, piece for piece (a BPE's {piece: id}
        or a Unigram's [[piece, score], ...]); anything else there is another tokenizer's, or unreadable."""
        try:
            vocab = json.loads(path.read_text(encoding="utf-8"))["model"]["vocab"]
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            return False
        if isinstance(vocab, list):
            vocab = {entry[0]: i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry}
        return isinstance(vocab, dict) and len(vocab) == self.vocab_size and \
            all(vocab.get(self.sp.IdToPiece(i)) == i for i in range(self.vocab_size))


class JsonTokenizer(_TokenizerBase):
    """A Hugging Face `tokenizer.json` (byte-level BPE and the rest), read with the `tokenizers` library:
    `JsonTokenizer("dir")` or `JsonTokenizer("dir/tokenizer.json")`.

    The special tokens and the chat template come from `tokenizer_config.json` beside it (missing ids from
    `config.json`). `encode(text)` adds a bos where the file's post-processor does (`bos=None`, the default;
    LLaMA 3 adds one, SmolLM2 none), and an eos only with `eos=True`, or with `eos=None` where the post-processor
    adds one (`add_eos`), as transformers' `tokenizer(text)` does; an `add_bos_token` or `add_eos_token` in
    `tokenizer_config.json` that contradicts the post-processor is refused, and so is a post-processor that adds
    another token than that bos and eos (one `tokenizer_config.json` does not name). Special tokens written in the text
    (`<|im_start|>`) become their ids. `decode` is the exact inverse on any text without special tokens, whatever
    its Unicode; special tokens are left out unless `skip_special_tokens=False`.
    """

    def __init__(self, path: str | os.PathLike):
        try:
            from tokenizers import Tokenizer as RustTokenizer
        except ImportError:
            raise ImportError("tokenizer.json files need the `tokenizers` package: pip install 'kpro[gguf]' "
                              "(or pip install tokenizers)") from None
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_JSON_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_JSON_FILE} at {path}")
        self.path = path
        try:
            self.tok = RustTokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a plain Exception
            raise ValueError(f"{path} is not a tokenizer.json file: {err}") from None
        self.config = read_tokenizer_config(path.parent) or {}
        model_config = _read_json(path.parent / "config.json") or {}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._special_id("bos", model_config)
        self.eos_id = self._special_id("eos", model_config)
        if self.eos_id is None:
            raise ValueError(f"{path}: no eos token (tokenizer_config.json eos_token or config.json eos_token_id)")
        pad = self._special_id("pad", model_config)
        self.pad_id = self.eos_id if pad is None else pad
        self._pad_named = pad is not None  # else eos stands in: save names no pad the files did not
        # as transformers 5 reads a tokenizer.json: its post-processor says, not tokenizer_config.json
        self.add_bos, self.add_eos = self._post_processor_adds()
        self._check_config_agrees_with_post_processor()
        self._check_legacy_agrees_with_file()
        self.chat_templates = chat_templates_of(path.parent, self.config)
        self.chat_template = self.chat_templates.get("default")

    def _special_id(self, name: str, model_config: dict) -> int | None:
        token = special_token_text(self.config, name)
        if token is not None:
            token_id = self.tok.token_to_id(token)
            if token_id is None:
                raise ValueError(f"{self.path}: {name}_token {token!r} is not in the vocabulary")
            return token_id
        token_id = model_config.get(f"{name}_token_id")
        if isinstance(token_id, list):
            token_id = token_id[0] if token_id else None
        return token_id if isinstance(token_id, int) and 0 <= token_id < self.vocab_size else None

    def _post_processor_adds(self) -> tuple[bool, bool]:
        """(a bos, an eos): what the file's post-processor puts around a text. Anything else it adds (another
        token than the bos or eos, or more than one) is refused, naming it: transformers adds it, kpro could not."""
        plain = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        start = next((i for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), None)
        if start is None:
            raise ValueError(f"{self.path}: its post-processor changes the ids of the text itself ({plain} becomes "
                             f"{full}); kpro's tokenizers only add a bos and an eos around them")
        for name, added, own, side in (("bos", full[:start], self.bos_id, "before"),
                                       ("eos", full[start + len(plain):], self.eos_id, "after")):
            if added and added != [own]:
                ours = self._named(own) if own is not None else \
                    f"{TOKENIZER_CONFIG_FILE} names no {name}_token, config.json no {name}_token_id"
                text = self.tok.id_to_token(added[0])
                fix = (f"If {text!r} is the model's {name}, name it in {TOKENIZER_CONFIG_FILE} "
                       f"({json.dumps({f'{name}_token': text})[1:-1]})" if len(added) == 1 else
                       f"kpro adds one {name} at most")
                raise ValueError(f"{self.path}: its post-processor adds {', '.join(map(self._named, added))} {side} "
                                 f"each text, which is not its {name} ({ours}): transformers' tokenizer(text) adds "
                                 f"it, kpro's encode would not. {fix}; else correct the post-processor")
        return start > 0, start + len(plain) < len(full)

    def _named(self, token_id: int) -> str:
        return f"{self.tok.id_to_token(token_id)!r} (id {token_id})"

    def _check_config_agrees_with_post_processor(self) -> None:
        """Refuse an add_bos_token or add_eos_token in tokenizer_config.json that contradicts the post-processor:
        transformers 5 follows the post-processor, other readers the config, and which of the two the model was
        trained with cannot be told."""
        for name, adds in (("bos", self.add_bos), ("eos", self.add_eos)):
            said = self.config.get(f"add_{name}_token")
            if isinstance(said, bool) and said != adds:
                raise ValueError(
                    f"{self.path.parent / TOKENIZER_CONFIG_FILE} says add_{name}_token {json.dumps(said)}, but the "
                    f"post-processor of {self.path} adds {'a' if adds else 'no'} {name} token: which one the model "
                    f"was trained with cannot be told; correct the file that is wrong (or remove add_{name}_token "
                    "from the config, to follow the post-processor)")

    def _check_legacy_agrees_with_file(self) -> None:
        """Refuse a LlamaTokenizer's `legacy` in tokenizer_config.json that contradicts what the file writes after a
        special token: transformers 5 rebuilds a LlamaTokenizer's pre-tokenizer from `legacy` (true: SentencePiece's
        leading-space piece before every stretch of text, false: before the first only), transformers 4 and the
        tokenizers library follow the file, and which the model was trained with cannot be told. Where the key is
        absent the file is followed, as transformers 4 did (and kpro's SentencePiece Tokenizer reads it as true)."""
        legacy = self.config.get("legacy")
        if not isinstance(legacy, bool) or self.config.get("tokenizer_class") not in LLAMA_TOKENIZER_CLASSES:
            return
        special = self.tok.id_to_token(self.eos_id)
        if self.tok.encode(special, add_special_tokens=False).ids != [self.eos_id]:
            return  # written in text, the eos is text: no special token to probe with
        after_special = self.tok.encode(special + "x", add_special_tokens=False).ids[1:]
        prefixed = after_special == self.tok.encode("x", add_special_tokens=False).ids  # ▁x both times
        if prefixed != legacy:
            raise ValueError(
                f"{self.path.parent / TOKENIZER_CONFIG_FILE} says legacy {json.dumps(legacy)}, but {self.path} writes "
                f"{'the' if prefixed else 'no'} leading-space piece before the text after a special token (as legacy "
                f"{json.dumps(prefixed)} does): transformers 5 rebuilds a {self.config['tokenizer_class']} from "
                "legacy, transformers 4 followed the file, and which one the model was trained with cannot be told; "
                "correct the file that is wrong (or remove legacy from the config, to follow the file)")

    def _wrap(self, ids: list[int], bos, eos) -> list[int]:
        bos = self.add_bos if bos is None else bos
        eos = self.add_eos if eos is None else eos
        if bos and self.bos_id is None:
            raise ValueError(f"{self.path}: no bos token to add")
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = False) -> list[int]:
        return self._wrap(self.tok.encode(checked_text(text), add_special_tokens=False).ids, bos, eos)

    def encode_batch(self, texts: list[str], bos: bool | None = None, eos: bool | None = False) -> list[list[int]]:
        return [self._wrap(e.ids, bos, eos) for e in self.tok.encode_batch(checked_texts(texts), add_special_tokens=False)]

    def encode_with_special_tokens(self, text: str) -> list[int]:
        return self.tok.encode(checked_text(text), add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tok.decode(checked_ids(ids, self.vocab_size), skip_special_tokens=skip_special_tokens)

    def decode_batch(self, batch, skip_special_tokens: bool = True) -> list[str]:
        return self.tok.decode_batch([checked_ids(ids, self.vocab_size, f"batch[{i}]") for i, ids in enumerate(batch)],
                                     skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, token_id: int) -> str:
        return self.tok.id_to_token(int(token_id))

    @property
    def special_ids(self) -> frozenset[int]:  # the added tokens marked special, which decode skips
        return super().special_ids | frozenset(i for i, token in self.tok.get_added_tokens_decoder().items()
                                               if token.special)

    def special_tokens(self) -> dict[str, str | None]:
        def text(token_id):
            return None if token_id is None else self.tok.id_to_token(token_id)
        out = {"bos_token": text(self.bos_id), "eos_token": text(self.eos_id), "pad_token": text(self.pad_id)}
        out["unk_token"] = special_token_text(self.config, "unk")
        return out

    def save(self, directory: str | os.PathLike) -> None:
        """tokenizer.json and tokenizer_config.json (with the chat template and the special tokens in use) into an
        existing directory, where no other tokenizer's files stay."""
        _check_save_directory(directory)
        write_atomic(Path(directory, TOKENIZER_JSON_FILE), self.tok.to_str(pretty=True))
        # ids taken from config.json are named too: the directory may have another config.json, or none
        config = dict(self.config)
        pad = self.pad_id if self._pad_named else None
        for name, token_id in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", pad)):
            text = None if token_id is None else self.tok.id_to_token(token_id)
            if text is not None and special_token_text(config, name) != text:  # an equal {"content": ...} stays
                config[f"{name}_token"] = text
        _save_config(directory, config, self._templates())
        _remove_other_tokenizers(directory, keep=(TOKENIZER_JSON_FILE,))


def _check_save_directory(directory) -> None:
    """Refuse, naming it, a directory a save cannot write into (the write named its temporary file instead)."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"cannot save the tokenizer into {directory}: it is a file, not a directory")
    if not directory.is_dir():
        raise FileNotFoundError(f"cannot save the tokenizer into {directory}: it does not exist; create it first "
                                "(save writes into an existing directory, a checkpoint's typically)")


def _remove_other_tokenizers(directory, keep: tuple[str, ...]) -> None:
    """Remove the files of another tokenizer than the one just saved (but `keep`): load_tokenizer would read a
    tokenizer.model before the saved tokenizer.json, say, and transformers a stale tokenizer.json,
    added_tokens.json or special_tokens_map.json with it. Called after the save: one cut short leaves the old files."""
    for name in (*TOKENIZER_FILES, ADDED_TOKENS_FILE, SPECIAL_TOKENS_MAP_FILE):
        if name not in keep:
            Path(directory, name).unlink(missing_ok=True)


def _save_config(directory, config: dict, chat_templates: dict[str, str]) -> None:
    """tokenizer_config.json with the chat templates in use (they may have come from chat_template.jinja and
    additional_chat_templates/): the default alone as a string, several as transformers' list of names. The
    template files `directory` held are removed once it is written: read first, they would override it."""
    config = {key: value for key, value in config.items() if key != "chat_template"}  # one no longer in use
    if list(chat_templates) == ["default"]:
        config["chat_template"] = chat_templates["default"]
    elif chat_templates:
        config["chat_template"] = [{"name": name, "template": text} for name, text in chat_templates.items()]
    write_atomic(Path(directory, TOKENIZER_CONFIG_FILE), json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    _remove_chat_template_files(directory)  # after: a save cut short leaves the old templates, not a mixture


def _remove_chat_template_files(directory) -> None:
    """chat_template.jinja and additional_chat_templates/*.jinja, which kpro and transformers read before
    tokenizer_config.json (an earlier save_pretrained's, a copied checkpoint's); the folder goes if left empty."""
    Path(directory, CHAT_TEMPLATE_FILE).unlink(missing_ok=True)
    folder = Path(directory, CHAT_TEMPLATE_DIR)
    if folder.is_dir():
        for path in folder.glob("*.jinja"):
            path.unlink()
        if not any(folder.iterdir()):
            folder.rmdir()


class _FixedVocabulary(_TokenizerBase):
    """One token per unit of a fixed vocabulary (characters, or space-separated symbols), after three
    specials: <pad>=0, <bos>=1, <eos>=2. Subclasses say how text splits into units and units join back."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")
    add_bos, add_eos = True, False  # `encode(text)` adds a bos, no eos
    KIND: str  # the "type" in its file
    FILE: str
    JOIN: str  # between decoded units
    NOUN: str  # what a unit is called in errors
    VOCABULARY: str  # what the vocabulary is called in errors

    def __init__(self, units):
        units = list(units)
        if not units:
            raise ValueError(f"a {type(self).__name__} needs at least one {self.NOUN}")
        for unit in units:
            self._check_unit(unit)
            if unit in self.SPECIALS:
                raise ValueError(f"{unit!r} is a special token, not a vocabulary entry")
        repeated = sorted(unit for unit, count in Counter(units).items() if count > 1)
        if repeated:
            raise ValueError(f"{self.NOUN}s are repeated: {repeated}")
        self.units = tuple(units)
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = len(self.SPECIALS) + len(units)
        self._ids = {unit: i + len(self.SPECIALS) for i, unit in enumerate(units)}

    def split(self, text: str) -> list[str]:
        raise NotImplementedError

    def _check_unit(self, unit) -> None:
        raise NotImplementedError

    def encode(self, text: str, bos: bool | None = None, eos: bool | None = False) -> list[int]:
        bos = self.add_bos if bos is None else bos
        eos = self.add_eos if eos is None else eos
        try:
            ids = [self._ids[unit] for unit in self.split(checked_text(text))]
        except KeyError as err:
            shown = self.JOIN.join(self.units[:40]) + (" ..." if len(self.units) > 40 else "")
            raise ValueError(f"{self.NOUN} {err.args[0]!r} is not in the {self.VOCABULARY} ({shown!r})") from None
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """The units of `ids`; the special tokens (pad, bos, eos) write nothing."""
        n = len(self.SPECIALS)
        return self.JOIN.join(self.units[i - n] for i in checked_ids(ids, self.vocab_size) if i >= n)

    def _vocabulary_json(self) -> dict:
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> None:
        """Its file into an existing directory, where no other tokenizer's files stay."""
        _check_save_directory(directory)
        write_atomic(Path(directory, self.FILE), json.dumps({"type": self.KIND, **self._vocabulary_json()}) + "\n")
        _remove_other_tokenizers(directory, keep=(self.FILE,))

    @classmethod
    def load(cls, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            path = path / cls.FILE
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{path} is not valid JSON ({err}): a kpro {cls.KIND} tokenizer file") from None
        if not isinstance(data, dict) or data.get("type") != cls.KIND:
            raise ValueError(f"{path} is not a kpro {cls.KIND} tokenizer file")
        return cls._from_json(data, path)


class CharTokenizer(_FixedVocabulary):
    """One token per character of a fixed alphabet, after <pad>=0, <bos>=1, <eos>=2."""

    KIND, FILE, JOIN, NOUN, VOCABULARY = "char", CHAR_TOKENIZER_FILE, "", "character", "alphabet"

    def __init__(self, alphabet: str):
        if not isinstance(alphabet, str):
            raise ValueError(f"alphabet must be a string, got {alphabet!r}")
        super().__init__(alphabet)
        self.alphabet = alphabet

    def split(self, text: str) -> list[str]:
        return list(text)

    def _check_unit(self, unit) -> None:
        pass  # every character of a string is one

    def _vocabulary_json(self) -> dict:
        return {"alphabet": self.alphabet}

    @classmethod
    def _from_json(cls, data: dict, path) -> "CharTokenizer":
        if not isinstance(data.get("alphabet"), str):
            raise ValueError(f"{path} is not a kpro char tokenizer file (no alphabet)")
        return cls(data["alphabet"])


class SymbolTokenizer(_FixedVocabulary):
    """One token per space-separated symbol of a fixed vocabulary, after <pad>=0, <bos>=1, <eos>=2.

    For text written with spaces between its symbols, like the multiplication data of the ICoT papers
    (`9 1 7 3 * 9 4 3 3||1 7 4 3 3 + ... #### 1 3 9 4 5 4 2 1`): every digit, operator and `####` is one
    token, so sequence lengths count symbols the way those papers count GPT-2 tokens (a character
    tokenizer would also spend a token on every space). `decode` joins symbols with single spaces.
    """

    KIND, FILE, JOIN, NOUN, VOCABULARY = "symbol", SYMBOL_TOKENIZER_FILE, " ", "symbol", "vocabulary"

    def __init__(self, symbols):
        super().__init__(symbols)
        self.symbols = self.units

    @classmethod
    def from_texts(cls, texts, extra=()) -> "SymbolTokenizer":
        """The vocabulary of every symbol in `texts` (and `extra`), sorted so that it never depends on order."""
        for name, value in (("texts", texts), ("extra", extra)):
            if isinstance(value, str):  # else taken apart character by character: a vocabulary of its characters
                raise TypeError(f"from_texts takes a list of {'texts' if name == 'texts' else 'symbols'} as {name}, "
                                f"got one str {value[:40]!r}; wrap it in a list")
        return cls(sorted({symbol for text in texts for symbol in text.split()} | set(extra)))

    def split(self, text: str) -> list[str]:
        return text.split()

    def _check_unit(self, unit) -> None:
        if not isinstance(unit, str) or not unit or unit.split() != [unit]:
            raise ValueError(f"symbols must be non-empty strings without whitespace, got {unit!r}")

    def _vocabulary_json(self) -> dict:
        return {"symbols": list(self.symbols)}

    @classmethod
    def _from_json(cls, data: dict, path) -> "SymbolTokenizer":
        if not isinstance(data.get("symbols"), list):
            raise ValueError(f"{path} is not a kpro symbol tokenizer file (no symbols)")
        return cls(data["symbols"])


TOKENIZER_FILES = (SENTENCEPIECE_FILE, TOKENIZER_JSON_FILE, CHAR_TOKENIZER_FILE, SYMBOL_TOKENIZER_FILE)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer | JsonTokenizer | CharTokenizer | SymbolTokenizer:
    """The tokenizer stored beside a checkpoint, the first of: `tokenizer.model` (SentencePiece),
    `tokenizer.json` (Hugging Face), kpro's character or symbol tokenizer. A `tokenizer.model` that lacks
    tokens the tokenizer uses (the bos or eos tokenizer_config.json names, an added token its chat template
    writes: a ChatML fine-tune's <|im_start|>), or that is no SentencePiece model at all (LLaMA 3's tiktoken file),
    gives way to `tokenizer.json`."""
    directory = Path(directory)
    if directory.is_file():
        raise FileNotFoundError(f"{directory} is a file; load_tokenizer takes the directory that holds it "
                                f"({directory.parent}), or open the file with kpro.Tokenizer or kpro.JsonTokenizer")
    if not directory.exists():
        raise FileNotFoundError(f"tokenizer directory {directory} does not exist")
    if (directory / SENTENCEPIECE_FILE).is_file():
        try:
            return Tokenizer(directory / SENTENCEPIECE_FILE)
        except TokensNotInSentencePiece:
            if not (directory / TOKENIZER_JSON_FILE).is_file():
                raise  # else tokenizer.json holds the added tokens, as transformers' fast tokenizer reads them
        except NotSentencePiece as err:  # read as transformers reads such a directory: its tokenizer.json
            if not (directory / TOKENIZER_JSON_FILE).is_file():
                raise NotSentencePiece(f"{err}; {directory} holds no {TOKENIZER_JSON_FILE} to read instead (LLaMA 3's "
                                       f"tiktoken {SENTENCEPIECE_FILE} comes with one: add the {TOKENIZER_JSON_FILE} "
                                       "of the model's release)") from None
    if (directory / TOKENIZER_JSON_FILE).is_file():
        return JsonTokenizer(directory / TOKENIZER_JSON_FILE)
    if (directory / CHAR_TOKENIZER_FILE).is_file():
        return CharTokenizer.load(directory / CHAR_TOKENIZER_FILE)
    if (directory / SYMBOL_TOKENIZER_FILE).is_file():
        return SymbolTokenizer.load(directory / SYMBOL_TOKENIZER_FILE)
    # save_pretrained and fit's checkpoints write weights only: the model's tokenizer is saved beside them apart
    raise FileNotFoundError(f"{directory} holds no {', '.join(TOKENIZER_FILES[:-1])} or {TOKENIZER_FILES[-1]}: "
                            "save_pretrained and fit's checkpoints hold the weights only; copy the tokenizer of the "
                            f"model it came from: kpro.load_tokenizer(BASE).save({str(directory)!r})")


def pad_left(sequences: list[list[int]], pad_id: int, device=None,
             vocab_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one length: (input_ids [B, T], attention_mask [B, T] with 1 = real); ids
    outside [0, vocab_size) are refused where it is given (a tokenizer's method gives its own)."""
    import torch

    sequences = [checked_ids(seq, vocab_size, f"sequences[{i}]") for i, seq in enumerate(sequences)]
    if isinstance(pad_id, bool) or not isinstance(pad_id, numbers.Integral) or pad_id < 0 or \
            (vocab_size is not None and pad_id >= vocab_size):  # 1.5 would be read as 1, None fail in torch.full
        raise ValueError(f"pad_id must be a token id (an integer in [0, {vocab_size or 'vocab_size'})), got {pad_id!r}")
    if not sequences or any(len(seq) == 0 for seq in sequences):
        raise ValueError("pad_left needs at least one sequence and no empty sequence")
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, length - len(seq):] = 1
    return ids.to(device), mask.to(device)


# ----------------------------------------------------------------------------------------- tokenizer files

def _read_text(path: Path) -> str:
    """A tokenizer file's text, in UTF-8 (as transformers writes and reads them), or a ValueError naming it."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err}); tokenizer files are UTF-8") from None


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    return data if isinstance(data, dict) else None


def special_token_text(config: dict, name: str) -> str | None:
    """The text of tokenizer_config.json's `name`_token (older files: {"content": "<s>", "lstrip": false, ...})."""
    token = config.get(f"{name}_token")
    token = token.get("content") if isinstance(token, dict) else token
    return token if isinstance(token, str) else None


def legacy_setting(config: dict | None, directory: Path) -> bool:
    """tokenizer_config.json's `legacy`, true where it is absent or null: whether a stretch of text after a control
    piece opens with SentencePiece's leading-space piece (Tokenizer.encode_with_special_tokens). transformers 4
    wrote null for a tokenizer whose legacy was never set, and read it as true, as an absent key."""
    file = Path(directory) / TOKENIZER_CONFIG_FILE
    legacy = (config or {}).get("legacy")
    if legacy is not None and not isinstance(legacy, bool):
        raise ValueError(f"{file}: \"legacy\" must be true or false, got {json.dumps(legacy)}; correct the file, or "
                         "remove the key (read as true)")
    if (config or {}).get("add_prefix_space") is False:  # every text opens with the leading-space piece in kpro
        raise ValueError(f"{file}: \"add_prefix_space\" false is not implemented by kpro's SentencePiece tokenizer, "
                         "which opens every text with SentencePiece's leading-space piece (and transformers' versions "
                         "read it differently); remove the key to tokenize as SentencePiece does")
    return True if legacy is None else legacy


def read_tokenizer_config(directory: Path) -> dict | None:
    """tokenizer_config.json of a checkpoint directory, or None."""
    return _read_json(Path(directory) / TOKENIZER_CONFIG_FILE)


def chat_templates_of(directory: Path, config: dict | None) -> dict[str, str]:
    """A checkpoint's chat templates by name, as transformers reads them: tokenizer_config.json's "chat_template"
    (a string, the default one, or a list of {"name", "template"}), unless chat_template.jinja (the default) or
    additional_chat_templates/NAME.jinja files are there, which take precedence over all of it."""
    directory = Path(directory)
    files = {}
    if (directory / CHAT_TEMPLATE_FILE).is_file():
        files["default"] = _read_text(directory / CHAT_TEMPLATE_FILE)
    if (directory / CHAT_TEMPLATE_DIR).is_dir():
        files.update({path.name.removesuffix(".jinja"): _read_text(path)
                      for path in sorted((directory / CHAT_TEMPLATE_DIR).glob("*.jinja"))})
    if files:
        return files
    template = (config or {}).get("chat_template")
    if isinstance(template, list):
        return {entry["name"]: entry["template"] for entry in template if isinstance(entry, dict)
                and isinstance(entry.get("name"), str) and isinstance(entry.get("template"), str) and entry["template"]}
    return {"default": template} if isinstance(template, str) and template else {}
