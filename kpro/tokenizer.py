"""Tokenizers: SentencePiece `tokenizer.model` files (LLaMA 1/2, Mistral), a character tokenizer for the
synthetic tasks (digits, operators, letters), and a symbol tokenizer for tasks written as space-separated
symbols (`9 1 7 3 * 9 4 3 3`); the last two need no model file.

All three share one interface: `encode(text, bos=, eos=)`, `decode(ids)`, batch versions, `bos_id`,
`eos_id`, `pad_id`, `vocab_size`, and `pad_left(seqs)` for batched generation.
"""
from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch

from ._files import write_atomic

SENTENCEPIECE_FILE = "tokenizer.model"
CHAR_TOKENIZER_FILE = "kpro_char_tokenizer.json"
SYMBOL_TOKENIZER_FILE = "kpro_symbol_tokenizer.json"


class _TokenizerBase:
    bos_id: int
    eos_id: int
    pad_id: int
    vocab_size: int

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        raise NotImplementedError

    def decode(self, ids) -> str:
        raise NotImplementedError

    def encode_batch(self, texts: list[str], bos: bool = True, eos: bool = False) -> list[list[int]]:
        return [self.encode(text, bos=bos, eos=eos) for text in texts]

    def decode_batch(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def pad_left(self, sequences: list[list[int]], device=None) -> tuple[torch.Tensor, torch.Tensor]:
        return pad_left(sequences, self.pad_id, device=device)


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
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as err:
            raise ValueError(f"{path} is not a SentencePiece model: {err}") from None
        self.vocab_size = self.sp.GetPieceSize()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        if self.bos_id < 0 or self.eos_id < 0:
            raise ValueError(f"{path} defines no bos/eos pieces; kpro needs both")
        # LLaMA and Mistral models define no pad piece; padding positions are masked, any id will do.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else self.eos_id

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        ids = self.sp.EncodeAsIds(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.DecodeIds([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        return self.sp.IdToPiece(int(token_id))

    def save(self, directory: str | os.PathLike) -> None:
        write_atomic(Path(directory, SENTENCEPIECE_FILE), self.path.read_bytes())


class _FixedVocabulary(_TokenizerBase):
    """One token per unit of a fixed vocabulary (characters, or space-separated symbols), after three
    specials: <pad>=0, <bos>=1, <eos>=2. Subclasses say how text splits into units and units join back."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")
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

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        try:
            ids = [self._ids[unit] for unit in self.split(text)]
        except KeyError as err:
            shown = self.JOIN.join(self.units[:40]) + (" ..." if len(self.units) > 40 else "")
            raise ValueError(f"{self.NOUN} {err.args[0]!r} is not in the {self.VOCABULARY} ({shown!r})") from None
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        n = len(self.SPECIALS)
        return self.JOIN.join(self.units[int(i) - n] for i in ids if n <= int(i) < self.vocab_size)

    def _vocabulary_json(self) -> dict:
        raise NotImplementedError

    def save(self, directory: str | os.PathLike) -> None:
        write_atomic(Path(directory, self.FILE), json.dumps({"type": self.KIND, **self._vocabulary_json()}) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike):
        path = Path(path)
        if path.is_dir():
            path = path / cls.FILE
        data = json.loads(path.read_text())
        if data.get("type") != cls.KIND:
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


TOKENIZER_FILES = (SENTENCEPIECE_FILE, CHAR_TOKENIZER_FILE, SYMBOL_TOKENIZER_FILE)


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer | CharTokenizer | SymbolTokenizer:
    """The tokenizer stored beside a checkpoint: `tokenizer.model`, or kpro's character or symbol tokenizer."""
    directory = Path(directory)
    if (directory / SENTENCEPIECE_FILE).is_file():
        return Tokenizer(directory / SENTENCEPIECE_FILE)
    if (directory / CHAR_TOKENIZER_FILE).is_file():
        return CharTokenizer.load(directory / CHAR_TOKENIZER_FILE)
    if (directory / SYMBOL_TOKENIZER_FILE).is_file():
        return SymbolTokenizer.load(directory / SYMBOL_TOKENIZER_FILE)
    raise FileNotFoundError(f"{directory} holds no {', '.join(TOKENIZER_FILES[:-1])} or {TOKENIZER_FILES[-1]}")


def pad_left(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad token lists to one length: (input_ids [B, T], attention_mask [B, T] with 1 = real)."""
    if not sequences or any(len(seq) == 0 for seq in sequences):
        raise ValueError("pad_left needs at least one sequence and no empty sequence")
    length = max(len(seq) for seq in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), length), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, length - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[row, length - len(seq):] = 1
    return ids.to(device), mask.to(device)
