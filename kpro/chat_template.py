"""Hugging Face chat templates rendered as transformers renders them (jinja2, in a sandbox), and the
apply_chat_template options of transformers that kpro refuses. kpro.tokenizer reads a checkpoint's templates and
re-exports `render_chat_template` and `ChatTemplateError`."""
from __future__ import annotations

import datetime
import functools
import json
import math

# transformers' apply_chat_template options that kpro does not implement: each with the values that ask for what kpro
# does, and what to do instead. Any other value is refused: taken as a template variable, it would change nothing.
_TRANSFORMERS_CHAT_OPTIONS = {
    "continue_final_message": ((False,), "kpro renders the final message closed, as the template writes it; to "
                               "prefill a reply, render the messages before it (add_generation_prompt=True, "
                               "tokenize=False), append the reply's start and encode that with "
                               "encode_with_special_tokens"),
    "return_tensors": ((None,), "it returns a list of ids: torch.tensor([ids]), or pad_left for several"),
    "return_dict": ((False,), "it returns the list of ids alone (transformers' input_ids)"),
    "return_assistant_tokens_mask": ((False,), "kpro renders {% generation %} blocks without marking their tokens"),
    "padding": ((False,), "it renders one conversation, unpadded: pad_left pads several"),
    "truncation": ((False,), "it returns every id: cut them yourself"),
    "max_length": ((None,), "it returns every id: cut them yourself"),
    "tokenizer_kwargs": ((None, {}), "it encodes the text with encode_with_special_tokens, which takes no options"),
    "sanitize_control_tokens": ((False,), "special tokens written in the messages become their ids, as "
                                "transformers does by default"),
}


def without_transformers_options(variables: dict) -> dict:
    """`variables` less transformers' call options given with a value that asks for what kpro does; any other
    value of one is refused, naming it."""
    for name in variables.keys() & _TRANSFORMERS_CHAT_OPTIONS:
        accepted, instead = _TRANSFORMERS_CHAT_OPTIONS[name]
        if not any(type(variables[name]) is type(value) and variables[name] == value for value in accepted):
            raise ValueError(f"apply_chat_template does not implement transformers' {name}={variables[name]!r}: "
                             f"{instead}")
    return {name: value for name, value in variables.items() if name not in _TRANSFORMERS_CHAT_OPTIONS}


class ChatTemplateError(ValueError):
    """The template refused the conversation (its raise_exception), or could not be rendered."""


@functools.cache
def _generation_block():
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlock(Extension):
        """`{% generation %} ... {% endgeneration %}` (templates of assistant-only training, which transformers
        reads to mark the assistant's tokens): rendered as its body."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body, lineno=lineno)

    return GenerationBlock


def _raise_exception(message):
    raise ChatTemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# A template comes with a downloaded checkpoint: its `*` and `**` operators are bounded, so that `'a' * 10**12` or
# `2 ** (10**9)` is refused at once instead of taking the memory or the CPU (jinja's sandbox bounds range() only).
# Only these two operators: a template can still build a huge string by other means (str.ljust, the center and
# indent filters, `%` formatting, join, loops), as under transformers, so a checkpoint's template is code to trust.
MAX_REPEATED_ITEMS = 1_000_000
MAX_POWER_BITS = 100_000


def _size(n: int) -> str:
    """An integer for a message: its digits, or, past what int-to-str converts quickly, its size in bits."""
    return f"{n:,}" if abs(n) < 10**30 else f"a number of {abs(n).bit_length():,} bits"


@functools.cache
def _bounded_sandbox():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset(["*", "**"])

        def call_binop(self, context, operator, left, right):
            if operator == "*":
                for sequence, count in ((left, right), (right, left)):
                    if (isinstance(sequence, (str, list, tuple)) and isinstance(count, int)
                            and len(sequence) * count > MAX_REPEATED_ITEMS):
                        items = len(sequence)
                        raise ChatTemplateError(f"the chat template repeats a {type(sequence).__name__} of {items:,} "
                                                f"item{'' if items == 1 else 's'} {_size(count)} times: more than "
                                                f"{MAX_REPEATED_ITEMS:,} items")
            elif (isinstance(left, int) and isinstance(right, int) and abs(left) > 1  # the result has about
                  and (right > MAX_POWER_BITS or right * math.log2(abs(left)) + 1 > MAX_POWER_BITS)):  # these bits
                raise ChatTemplateError(f"the chat template raises {_size(left)} to the power {_size(right)}: a "
                                        f"number of more than {MAX_POWER_BITS:,} bits")
            return super().call_binop(context, operator, left, right)

    return BoundedSandbox


@functools.lru_cache(maxsize=16)
def _compiled_template(template: str):
    _GenerationBlock = _generation_block()
    # Hugging Face renders templates in a sandbox with these settings and helpers; templates are written for them.
    env = _bounded_sandbox()(trim_blocks=True, lstrip_blocks=True,
                             extensions=["jinja2.ext.loopcontrols", _GenerationBlock])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat_template(template: str, messages: list[dict], *, add_generation_prompt: bool = True, **variables) -> str:
    """A conversation rendered with a Hugging Face chat template (jinja2, in a sandbox)."""
    if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise ValueError("messages must be a list of {\"role\": ..., \"content\": ...} dicts")
    if not messages:  # rendered, it was a bare generation prompt; transformers refuses it too
        raise ValueError("messages is empty: a chat template renders a conversation of at least one message")
    import jinja2

    # transformers passes tools and documents as None when not given: `tools is not none` must be false
    variables = {"tools": None, "documents": None, **variables}
    try:
        return _compiled_template(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                   **variables)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"the chat template failed: {err}") from None
    except Exception as err:  # a TypeError from a filter (tojson of an undefined value), say
        raise ChatTemplateError(f"the chat template failed: {type(err).__name__}: {err}") from None
