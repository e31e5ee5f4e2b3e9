"""Cached decoding: one prefill over the (left-padded) prompts, then one token per step."""
from __future__ import annotations

import math
import numbers
import operator
import sys

import torch

from . import ops
from .lora import refuse_idle_adapters
from .model import KVCache, Llama, activation_dtype, mixed_matrix_dtypes


@torch.no_grad()
def generate(model: Llama, input_ids: torch.Tensor, max_new_tokens: int = 32, *,
             attention_mask: torch.Tensor | None = None, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             stop_after_eos: int = 1) -> torch.Tensor:
    """Prompt followed by new tokens, [B, T + n] with n <= max_new_tokens.

    Greedy unless `temperature > 0` (then sampling, optionally restricted by `top_k` / `top_p`, drawn from
    `generator` for reproducible runs). Prompts of different lengths come left-padded with an
    `attention_mask` (see `kpro.pad_left`). A row stops at its `stop_after_eos`-th generated eos token
    (the config's eos unless `eos_token_id` is given; `[]` never stops) and is filled with
    `pad_token_id` after it; decoding ends when every row has stopped.
    """
    if not all(hasattr(model, name) for name in ("config", "hidden_states", "norm", "lm_head")):  # a Llama's parts
        adapted = hasattr(model, "adapter") and isinstance(getattr(model, "model", None), Llama)
        hint = (f" (a LoRA-adapted model: `with kpro.lora.active(tuned.model, {model.adapter!r}): "
                "kpro.generate(tuned.model, ...)`)") if adapted else ""
        bitune = " (a Bitune: its own bt.generate(prompts, ...))" if hasattr(model, "mix_weights") else ""
        raise TypeError(f"generate() takes a kpro.Llama, got {type(model).__name__}{hint}{bitune}")
    # adapted in place, no adapter active: it would decode the base model
    refuse_idle_adapters(model, "generate", takes_wrappers=False)
    mixed = mixed_matrix_dtypes(model)  # its head runs outside the forward, which names them
    if mixed is not None:
        raise ValueError(mixed)
    dtensor = sys.modules.get("torch.distributed.tensor")  # never imported: nothing can be sharded
    if dtensor is not None and any(isinstance(p, dtensor.DTensor) for p in model.parameters()):
        # its forward is a collective of every process, and embedding a plain tensor with a DTensor fails
        raise ValueError("generate() takes a whole model, and this one is sharded across processes (FSDP: "
                         "parallel='fsdp', or fully_shard): generate from its checkpoint (kpro.load_pretrained), or "
                         "train with parallel='ddp', which keeps a whole model on every process")
    # every decoding argument before the prefill (decode checks them again, for its other callers)
    max_new_tokens = check_decoding(model.config, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                    generator=generator, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                    stop_after_eos=stop_after_eos)[0]
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        got = f"{tuple(input_ids.shape)} {input_ids.dtype}" if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be an integer tensor [B, T] of prompts (one prompt's ids: "
                         f"torch.tensor([ids])), got {got}")
    batch, length = input_ids.shape
    if batch == 0 or length == 0:
        raise ValueError(f"input_ids is empty ([B={batch}, T={length}]): generate needs at least one prompt of at least "
                         "one token")
    device = next(model.parameters()).device  # where activation_dtype reads the dtype
    if input_ids.device != device:  # else the cache, made on the prompts' device, is blamed
        raise ValueError(f"input_ids are on {input_ids.device} and the model on {device}: move the prompts "
                         f"(input_ids.to({str(device)!r}), and the attention_mask)")
    if length + max_new_tokens > model.config.max_position_embeddings:
        raise ValueError(f"prompt ({length}) + max_new_tokens ({max_new_tokens}) exceeds the model's "
                         f"max_position_embeddings={model.config.max_position_embeddings}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ops.check_attention_mask(attention_mask, (batch, length), "generate")  # the model's check: 1 and 0 only
    check_left_padded(attention_mask)
    cache = KVCache(model.config, batch, length + max_new_tokens, activation_dtype(model), input_ids.device)
    logits = model.lm_head(model.norm(model.hidden_states(input_ids, attention_mask, cache=cache)[:, -1]))
    new = decode(model, cache, logits, attention_mask, max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p, generator=generator, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                 stop_after_eos=stop_after_eos)
    return torch.cat((input_ids, new.to(input_ids.dtype)), dim=1)


@torch.no_grad()
def decode(model: Llama, cache: KVCache, logits: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int, *,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           generator: torch.Generator | None = None, eos_token_id: int | list[int] | None = None,
           pad_token_id: int | None = None, stop_after_eos: int = 1) -> torch.Tensor:
    """New tokens [B, n] after a prefill: `logits` [B, V] are the last position's, `cache` holds the
    prefill's keys and values and `attention_mask` [B, cache.length] marks its real positions.
    (kpro.generate prefills a plain prompt; Bitune prefills its three streams and continues here.)"""
    max_new_tokens, temperature, top_k, top_p, eos, pad, stop_after_eos = check_decoding(
        model.config, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop_after_eos=stop_after_eos)
    if logits.dim() != 2 or logits.shape[0] != cache.batch_size:  # the prefill's [B, T, V] is the easy mistake
        raise ValueError(f"logits must be the last position's [B={cache.batch_size}, V], got {tuple(logits.shape)} "
                         "(the prefill's logits[:, -1])")
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"decode needs the prefill's attention_mask [B, cache.length={cache.length}] (1 = real "
                        f"token; torch.ones for an unpadded prompt), got {type(attention_mask).__name__}")
    check_left_padded(attention_mask)  # a right-padded row would continue from its padding
    # Both before the first step, which writes into the cache; later they would fail mid-decoding with the model's
    # messages, about the cache's last position or the mask decode has extended itself.
    if tuple(attention_mask.shape) != (cache.batch_size, cache.length):
        raise ValueError(f"attention_mask must be the prefill's [B, cache.length] = [{cache.batch_size}, "
                         f"{cache.length}] (1 = real token), got {list(attention_mask.shape)}")
    free = cache.max_len - cache.length
    if max_new_tokens - 1 > free:
        raise ValueError(f"max_new_tokens={max_new_tokens} needs {max_new_tokens - 1} free cache positions (every new "
                         f"token but the last is fed back), and the cache has {free}: cache.max_len={cache.max_len}, "
                         f"cache.length={cache.length}; make the KVCache with max_len >= "
                         f"{cache.length + max_new_tokens - 1}, or ask for at most {free + 1} tokens")
    device = logits.device
    eos_ids = torch.tensor(eos, dtype=torch.long, device=device)
    eos_seen = torch.zeros(logits.shape[0], dtype=torch.long, device=device)
    finished = torch.zeros(logits.shape[0], dtype=torch.bool, device=device)
    broken = torch.zeros_like(finished)  # rows whose logits held a NaN or infinity, read at the step's one sync
    tokens = []
    for step in range(max_new_tokens):
        non_finite = ~logits.isfinite().all(dim=-1)
        broken |= non_finite & ~finished  # a finished row's token is discarded (padding): its logits do not matter
        # An unfinished such row is refused below; meanwhile no such row may trip torch.multinomial's own check.
        logits = torch.where(non_finite[:, None], torch.zeros_like(logits), logits)
        next_ids = select_next_token(logits, temperature, top_k, top_p, generator)
        next_ids = torch.where(finished, torch.full_like(next_ids, pad), next_ids)
        tokens.append(next_ids[:, None])
        eos_seen += torch.isin(next_ids, eos_ids) & ~finished
        finished |= eos_seen >= stop_after_eos
        all_finished, any_broken = torch.stack((finished.all(), broken.any())).tolist()
        if any_broken:  # argmax would pick NaN as the best token: a plausible id from a broken model
            raise ValueError(f"the model's logits are not finite (NaN or infinity) in rows "
                             f"{broken.nonzero().flatten().tolist()[:8]} at generated token {step + 1}: no token "
                             "can be chosen from them (check the weights and inputs for NaN)")
        if step == max_new_tokens - 1 or all_finished:
            break
        attention_mask = torch.cat((attention_mask, torch.ones_like(next_ids[:, None])), dim=1)
        hidden = model.hidden_states(next_ids[:, None], attention_mask, cache=cache)[:, -1]
        logits = model.lm_head(model.norm(hidden))
    return torch.cat(tokens, dim=1)


# decode's keywords after max_new_tokens: what Bitune.generate passes on as **sampling
DECODE_OPTIONS = ("temperature", "top_k", "top_p", "generator", "eos_token_id", "pad_token_id", "stop_after_eos")


def check_decoding(config, max_new_tokens, *, temperature=0.0, top_k=None, top_p=None, generator=None,
                   eos_token_id=None, pad_token_id=None, stop_after_eos=1):
    """decode's argument checks, callable before a prefill: (max_new_tokens, temperature, top_k, top_p, eos ids,
    pad id, stop_after_eos) as Python numbers, the eos and pad defaults read from `config`."""
    max_new_tokens, temperature, top_k, top_p = check_sampling(max_new_tokens, temperature, top_k, top_p)
    stop_after_eos = _positive_int("stop_after_eos", stop_after_eos)
    if stop_after_eos > torch.iinfo(torch.long).max:  # compared with an int64 count: it would wrap or overflow
        raise ValueError(f"stop_after_eos must be at most 2**63 - 1 (eos tokens are counted in int64), got "
                         f"{stop_after_eos}: any count above max_new_tokens never stops a row, as eos_token_id=[]")
    if generator is not None and not isinstance(generator, torch.Generator):  # a seed, say
        raise TypeError(f"generator must be a torch.Generator (torch.Generator().manual_seed(seed)) or None, got "
                        f"{generator!r}")
    if generator is not None and temperature == 0:  # greedy draws nothing: ignored, as top_k and top_p would be
        raise ValueError("a generator draws samples, but temperature 0 decodes greedily: give a temperature above 0 to "
                         "sample, or leave generator out")
    eos = config.eos_token_ids if eos_token_id is None else _token_ids("eos_token_id", eos_token_id, config.vocab_size)
    pad = (pad_token_id if pad_token_id is not None else config.pad_token_id if config.pad_token_id is not None
           else (eos[0] if eos else 0))
    pads = _token_ids("pad_token_id", pad, config.vocab_size)  # a finished row feeds it back to the model
    if len(pads) != 1:
        raise TypeError(f"pad_token_id must be one token id, got {pad!r}")
    return max_new_tokens, temperature, top_k, top_p, eos, pads[0], stop_after_eos


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Generation appends after the last column, so every row's last prompt position must be real (left
    padding); a right-padded row would continue from its padding and give other tokens than run alone."""
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B, T], got {tuple(attention_mask.shape)}")
    if not bool((attention_mask[:, -1] == 1).all()):
        rows = (attention_mask[:, -1] != 1).nonzero().flatten().tolist()
        raise ValueError(f"attention_mask rows {rows[:8]} end in padding: generate needs left-padded prompts "
                         "(see kpro.pad_left)")


def select_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ids [B] from logits [B, V]: argmax, or a sample at `temperature` within top-k / top-p."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    # In float64, where any positive temperature is a nonzero divisor (in float32, 1e-300 is 0: 0 / 0 for the best).
    logits = logits.double()
    # Shifted first, so that a tiny temperature sends the others to -inf instead of the best to inf (NaN).
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth_best = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth_best, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass (the best always stays).
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _token_ids(name: str, value, vocab_size: int) -> list[int]:
    """One token id or a collection of them (Python, numpy or 0-dim tensor integers), each in the vocabulary."""
    # A collection (list, tuple, set, range, 1-D array or tensor), else one value: a float is named below, not
    # iterated ("'float' object is not iterable").
    many = isinstance(value, (list, tuple, set, frozenset, range)) or (getattr(value, "ndim", 0) or 0) >= 1
    values = value if many else [value]
    ids = []
    for v in values:
        try:
            if _is_bool(v):
                raise TypeError
            ids.append(operator.index(v))
        except TypeError:
            raise TypeError(f"{name} must be a token id or a list of them, got {value!r}") from None
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{name} {bad[0]} is outside the vocabulary [0, {vocab_size})")
    return ids


def check_sampling(max_new_tokens, temperature, top_k, top_p) -> tuple[int, float, int | None, float | None]:
    """Refuse sampling arguments that are out of range, of another kind (a bool, a string, a list) or that greedy
    decoding would ignore; return them as Python numbers (numpy and 0-dim tensor numbers are taken, as token ids)."""
    max_new_tokens = _positive_int("max_new_tokens", max_new_tokens)
    temperature_ = _real(temperature)
    if temperature_ is None or not 0 <= temperature_ < math.inf:  # NaN fails 0 <= x
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    top_k = None if top_k is None else _positive_int("top_k", top_k)
    top_p_ = None if top_p is None else _real(top_p)
    if top_p is not None and (top_p_ is None or not 0 < top_p_ <= 1):
        raise ValueError(f"top_p must be a number in (0, 1], got {top_p!r}")
    if temperature_ == 0 and (top_k is not None or top_p is not None):  # greedy would ignore them
        raise ValueError("top_k and top_p restrict sampling, but temperature 0 decodes greedily: give a temperature "
                         "above 0 to sample")
    return max_new_tokens, temperature_, top_k, top_p_


def _is_bool(value) -> bool:
    return isinstance(value, bool) or str(getattr(value, "dtype", "")) in ("bool", "torch.bool")


def _positive_int(name: str, value) -> int:
    """A positive Python, numpy or 0-dim tensor integer, as an int (a bool or a float is refused)."""
    try:
        if _is_bool(value):
            raise TypeError
        number = operator.index(value)
    except TypeError:
        number = 0
    if number < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return number


def _real(value) -> float | None:
    """A Python, numpy or 0-dim tensor real number as a float; None for anything else (a bool, a str, a list)."""
    if _is_bool(value):
        return None
    if isinstance(value, torch.Tensor):
        return float(value) if value.dim() == 0 and not value.is_complex() else None
    return float(value) if isinstance(value, numbers.Real) else None
