"""Examples as model input: `[bos] input <eos> cot <eos> #### answer <eos>`, loss after the first <eos>.
The bos opens the prompt where the tokenizer has one (a tokenizer.json may define none), unless `bos=` says.

Works with any kpro tokenizer (`encode(text, bos=, eos=)`, `decode(ids)`, `eos_id`): the SymbolTokenizer
for the arithmetic tasks (one token per digit or operator, as the paper counts them) and the SentencePiece
`kpro.Tokenizer` for text (GSM8K). The input, the CoT and `#### answer` are encoded separately, so where
the CoT starts and ends is known exactly, whatever the tokenizer does at segment boundaries.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..tokenizer import SymbolTokenizer, special_token_in
from .data import ANSWER_MARK, CoTExample, _excerpt

IGNORE_INDEX = -100  # label of a position that takes no loss (torch's cross_entropy default)

MULTIPLICATION_SYMBOLS = tuple("0123456789") + ("*", "+", "(", ")", ANSWER_MARK)


@dataclass(frozen=True)
class TokenizedExample:
    """Token ids of one full example; the CoT is `ids[cot_start:cot_end]` and `ids[cot_end]` is the second eos."""

    ids: tuple[int, ...]
    cot_start: int
    cot_end: int

    @property
    def cot_length(self) -> int:
        return self.cot_end - self.cot_start

    @property
    def prompt(self) -> tuple[int, ...]:
        """`[bos] input <eos>`: what generation starts from."""
        return self.ids[:self.cot_start]

    @property
    def labels(self) -> list[int]:
        """Targets aligned with `ids` (the loss shifts them): IGNORE_INDEX up to the first eos, then the ids."""
        return [IGNORE_INDEX] * self.cot_start + list(self.ids[self.cot_start:])


def multiplication_tokenizer() -> SymbolTokenizer:
    """The SymbolTokenizer of the multiplication tasks: 10 digits, `*`, `+`, `(`, `)`, `####`."""
    return SymbolTokenizer(MULTIPLICATION_SYMBOLS)


def symbol_tokenizer_for(examples) -> SymbolTokenizer:
    """A SymbolTokenizer covering every symbol of `examples` (sorted, so independent of their order)."""
    examples = list(examples)
    for number, example in enumerate(examples, start=1):  # named here: the vocabulary would refuse it unnamed
        special = next((s for text in (example.input, example.cot, example.answer) for s in text.split()
                        if s in SymbolTokenizer.SPECIALS), None)
        if special is not None:
            raise ValueError(f"{example_name(example, number)} ({_excerpt(example.line())}): {special!r} is a special "
                             "token, not a symbol of the data")
    return SymbolTokenizer.from_texts((text for e in examples for text in (e.input, e.cot, e.answer)),
                                      extra=[ANSWER_MARK])


def uses_bos(tokenizer, bos: bool | None = None) -> bool:
    """Whether prompts open with a bos: `bos`, or where it is None, whether the tokenizer has one."""
    if bos is None:
        return getattr(tokenizer, "bos_id", None) is not None
    if bos and getattr(tokenizer, "bos_id", None) is None:
        raise ValueError("bos=True: the tokenizer has no bos token (bos=None opens prompts with none)")
    return bos


def prompt_ids(example: CoTExample, tokenizer, bos: bool | None = None) -> list[int]:
    """`[bos] input <eos>`."""
    return tokenizer.encode(example.input, bos=uses_bos(tokenizer, bos), eos=True)


def answer_ids(example: CoTExample, tokenizer) -> list[int]:
    """`#### answer <eos>`, the part after the second eos."""
    return tokenizer.encode(f"{ANSWER_MARK} {example.answer}", bos=False, eos=True)


def tokenize_example(example: CoTExample, tokenizer, bos: bool | None = None) -> TokenizedExample:
    """`[bos] input <eos> cot <eos> #### answer <eos>` with the CoT's token span."""
    bos = uses_bos(tokenizer, bos)
    prompt = prompt_ids(example, tokenizer, bos)
    cot = tokenizer.encode(example.cot, bos=False, eos=False) if example.cot else []
    answer = answer_ids(example, tokenizer)
    special = special_token_in(tokenizer, prompt[int(bos):-1] + cot + answer[:-1])
    if special is not None:  # it would end a segment early: the CoT span and the labels would be wrong
        raise ValueError(f"its text spells the tokenizer's {special} token; remove it from the data")
    ids = prompt + cot + [tokenizer.eos_id] + answer
    return TokenizedExample(tuple(ids), len(prompt), len(prompt) + len(cot))


def describe_tokenized(example: TokenizedExample, tokenizer=None) -> str:
    """A tokenized example for a message: its `input||cot #### answer` line decoded by `tokenizer`, shortened
    as tokenize_examples shows one; without a tokenizer, its first token ids."""
    if tokenizer is None:
        return f"token ids {[int(i) for i in example.ids[:12]]}{'...' * (len(example.ids) > 12)}"  # a tensor's too
    ids = example.ids
    # decode skips the bos and eos; the eos after the CoT (ids[cot_end]) separates it from `#### answer`
    return _excerpt(f"{tokenizer.decode(example.prompt)}||{tokenizer.decode(ids[example.cot_start:example.cot_end])} "
                    f"{tokenizer.decode(ids[example.cot_end + 1:])}")


def tokenize_examples(examples, tokenizer, bos: bool | None = None) -> list[TokenizedExample]:
    """`tokenize_example` of each; an example the tokenizer cannot encode is named by its file and line where
    read_examples read it (else by its number, from 1) and its text, which one error among 808,000 lines needs."""
    bos = uses_bos(tokenizer, bos)  # a bos=True the tokenizer cannot honour is no fault of an example
    tokenized = []
    for number, example in enumerate(examples, start=1):
        try:
            tokenized.append(tokenize_example(example, tokenizer, bos))
        except ValueError as err:
            raise ValueError(f"{example_name(example, number)} ({_excerpt(example.line())}): {err}") from None
    return tokenized


def example_name(example: CoTExample, number: int) -> str:
    """"FILE:LINE" of an example read from a file, else "example N" (its number among those given, from 1)."""
    return getattr(example, "where", None) or f"example {number}"
