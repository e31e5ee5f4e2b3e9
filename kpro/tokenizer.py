"""Tokenizers: SentencePiece `tokenizer.model` files (LLaMA 1/2, Mistral), and a character tokenizer
for the synthetic tasks (digits, operators, letters) that needs no model file.

Both share one interface: `encode(text, bos=, eos=)`, `decode(ids)`, batch versions, `bos_id`,
`eos_id`, `pad_id`, `vocab_size`, and `pad_left(seqs)` for batched generation.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

SENTENCEPIECE_FILE = "tokenizer.model"
CHAR_TOKENIZER_FILE = "kpro_char_tokenizer.json"


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


def load_tokenizer(directory: str | os.PathLike) -> Tokenizer | CharTokenizer:
    """The tokenizer stored beside a checkpoint: `tokenizer.model` or kpro's character tokenizer."""
    directory = Path(directory)
    if (directory / SENTENCEPIECE_FILE).is_file():
        return Tokenizer(directory / SENTENCEPIECE_FILE)
    if (directory / CHAR_TOKENIZER_FILE).is_file():
        return CharTokenizer.load(directory / CHAR_TOKENIZER_FILE)
    raise FileNotFoundError(f"{directory} holds no {SENTENCEPIECE_FILE} or {CHAR_TOKENIZER_FILE}")


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
