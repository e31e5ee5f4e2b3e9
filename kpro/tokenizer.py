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
        Path(directory, SENTENCEPIECE_FILE).write_bytes(self.path.read_bytes())


class CharTokenizer(_TokenizerBase):
    """One token per character of a fixed alphabet, after three specials: <pad>=0, <bos>=1, <eos>=2."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, alphabet: str):
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError(f"alphabet must be non-empty with no repeated characters, got {alphabet!r}")
        self.alphabet = alphabet
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = len(self.SPECIALS) + len(alphabet)
        self._ids = {char: i + len(self.SPECIALS) for i, char in enumerate(alphabet)}

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        try:
            ids = [self._ids[char] for char in text]
        except KeyError as err:
            raise ValueError(f"character {err.args[0]!r} is not in the alphabet {self.alphabet!r}") from None
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        n = len(self.SPECIALS)
        return "".join(self.alphabet[int(i) - n] for i in ids if n <= int(i) < self.vocab_size)

    def save(self, directory: str | os.PathLike) -> None:
        Path(directory, CHAR_TOKENIZER_FILE).write_text(json.dumps({"type": "char", "alphabet": self.alphabet}) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "CharTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / CHAR_TOKENIZER_FILE
        data = json.loads(path.read_text())
        if data.get("type") != "char" or not isinstance(data.get("alphabet"), str):
            raise ValueError(f"{path} is not a kpro character tokenizer file")
        return cls(data["alphabet"])


class SymbolTokenizer(_TokenizerBase):
    """One token per space-separated symbol of a fixed vocabulary, after <pad>=0, <bos>=1, <eos>=2.

    For text written with spaces between its symbols, like the multiplication data of the ICoT papers
    (`9 1 7 3 * 9 4 3 3||1 7 4 3 3 + ... #### 1 3 9 4 5 4 2 1`): every digit, operator and `####` is one
    token, so sequence lengths count symbols the way those papers count GPT-2 tokens (a character
    tokenizer would also spend a token on every space). `decode` joins symbols with single spaces.
    """

    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, symbols):
        symbols = list(symbols)
        if not symbols:
            raise ValueError("a SymbolTokenizer needs at least one symbol")
        for symbol in symbols:
            if not isinstance(symbol, str) or not symbol or symbol.split() != [symbol]:
                raise ValueError(f"symbols must be non-empty strings without whitespace, got {symbol!r}")
            if symbol in self.SPECIALS:
                raise ValueError(f"{symbol!r} is a special token, not a symbol")
        repeated = sorted(symbol for symbol, count in Counter(symbols).items() if count > 1)
        if repeated:
            raise ValueError(f"symbols are repeated: {repeated}")
        self.symbols = tuple(symbols)
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2
        self.vocab_size = len(self.SPECIALS) + len(symbols)
        self._ids = {symbol: i + len(self.SPECIALS) for i, symbol in enumerate(symbols)}

    @classmethod
    def from_texts(cls, texts, extra=()) -> "SymbolTokenizer":
        """The vocabulary of every symbol in `texts` (and `extra`), sorted so that it never depends on order."""
        return cls(sorted({symbol for text in texts for symbol in text.split()} | set(extra)))

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        try:
            ids = [self._ids[symbol] for symbol in text.split()]
        except KeyError as err:
            raise ValueError(f"symbol {err.args[0]!r} is not in the vocabulary of {len(self.symbols)} "
                             f"symbols {list(self.symbols)[:20]}{' ...' if len(self.symbols) > 20 else ''}") from None
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        n = len(self.SPECIALS)
        return " ".join(self.symbols[int(i) - n] for i in ids if n <= int(i) < self.vocab_size)

    def save(self, directory: str | os.PathLike) -> None:
        Path(directory, SYMBOL_TOKENIZER_FILE).write_text(
            json.dumps({"type": "symbol", "symbols": list(self.symbols)}) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> "SymbolTokenizer":
        path = Path(path)
        if path.is_dir():
            path = path / SYMBOL_TOKENIZER_FILE
        data = json.loads(path.read_text())
        if data.get("type") != "symbol" or not isinstance(data.get("symbols"), list):
            raise ValueError(f"{path} is not a kpro symbol tokenizer file")
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
