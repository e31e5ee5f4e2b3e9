"""The three streams through the model: prompt passes (causal and bidirectional, each with its adapter),
the per-layer mix of their keys and values, and the answer pass over the mixed cache.

`fused_passes` runs the three streams together, layer by layer, as one sequence of stacked tokens: one
base matmul per projection, each stream's own adapter, `kpro.ops.bitune_attention` for the attention.
`separate_passes` runs them one after another with explicit masks and an explicit mix. Both return the
answer stream's hidden states and, given a decoding cache, fill it with [mixed prompt cache | answer].
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .. import ops
from ..model import KVCache, Llama
from ..ops.bitune_attention import check_bitune_values, mix_kv, mixed_prompt_cache
from ..rope import apply_rope
from .streams import Streams


@dataclasses.dataclass(frozen=True)
class PromptPass:
    adapter: str
    causal: bool


@dataclasses.dataclass(frozen=True)
class Mode:
    passes: tuple[PromptPass, ...]  # one pass: its cache is used as is; two: they are mixed
    fused: bool  # the dual-pass kernel covers it (stream 0 causal, stream 1 bidirectional)


MODES = {
    "bitune": Mode((PromptPass("causal", True), PromptPass("bidir", False)), fused=True),
    "naive_bidir": Mode((PromptPass("causal", False),), fused=False),  # one bidirectional pass, causal adapter
    "no_mix": Mode((PromptPass("bidir", False),), fused=False),  # one bidirectional pass, bidir adapter
    "only_causal": Mode((PromptPass("causal", True), PromptPass("bidir", True)), fused=False),
    "shared_weights": Mode((PromptPass("causal", True), PromptPass("causal", False)), fused=True),
}


def fused_passes(model: Llama, mode: Mode, streams: Streams, alpha_k: torch.Tensor, alpha_v: torch.Tensor,
                 cache: KVCache | None = None) -> torch.Tensor:
    """All three streams stacked on the time axis [prompt0 | prompt1 | answer], layer by layer; returns the
    answer stream's last hidden states [B, Ta, d] (before the final norm)."""
    tp, ta = streams.prompt_ids.shape[1], streams.answer_ids.shape[1]
    device = streams.prompt_ids.device
    ids = torch.cat((streams.prompt_ids, streams.prompt_ids, streams.answer_ids), dim=1)
    prompt_positions = torch.arange(tp, device=device).expand(ids.shape[0], tp)
    positions = torch.cat((prompt_positions, prompt_positions,
                           streams.prompt_lens[:, None] + torch.arange(ta, device=device)), dim=1)
    segments = [(0, tp, mode.passes[0].adapter), (tp, 2 * tp, mode.passes[1].adapter), (2 * tp, 2 * tp + ta, "causal")]
    x = model.embed_tokens(ids)
    cos, sin = model.rope(positions, x.dtype)
    check_bitune_values(alpha_k, alpha_v, streams.prompt_lens, streams.answer_lens, tp, ta)  # once, not per layer
    for i, block in enumerate(model.layers):
        def attend(q, k, v, i=i):
            q_p, k_p, v_p = (t[:, :2 * tp].unflatten(1, (2, tp)).transpose(0, 1) for t in (q, k, v))
            q_a, k_a, v_a = q[:, 2 * tp:], k[:, 2 * tp:], v[:, 2 * tp:]
            if cache is not None:
                # The mix bitune_attention reads below, bit for bit: decoding sees the same keys and values.
                _store(cache, i, *mixed_prompt_cache(k_p, v_p, alpha_k[i], alpha_v[i], q_a), k_a, v_a)
            o_p, o_a = ops.bitune_attention(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k[i], alpha_v[i],
                                            streams.prompt_lens, streams.answer_lens, check_values=False)
            return torch.cat((o_p[0], o_p[1], o_a), dim=1)
        x = run_block(block, x, cos, sin, segments, attend)
    if cache is not None:
        cache.length = tp + ta
    return x[:, 2 * tp:]

def separate_passes(model: Llama, mode: Mode, streams: Streams, alpha_k: torch.Tensor, alpha_v: torch.Tensor,
                    cache: KVCache | None = None) -> torch.Tensor:
    """The passes one after another: each prompt pass collects its per-layer keys and values, the
    caches are mixed explicitly, and the answer pass attends to [mixed cache, its own keys]. The ground
    truth in tests, and the path of the ablations the fused kernel does not cover."""
    batch, tp = streams.prompt_ids.shape
    ta = streams.answer_ids.shape[1]
    device = streams.prompt_ids.device
    check_bitune_values(alpha_k, alpha_v, streams.prompt_lens, streams.answer_lens, tp, ta)
    prompt_valid = streams.prompt_valid
    caches = []
    for prompt_pass in mode.passes:
        kv = []
        x = model.embed_tokens(streams.prompt_ids)
        cos, sin = model.rope(torch.arange(tp, device=device).expand(batch, tp), x.dtype)
        for block in model.layers:
            def attend(q, k, v, kv=kv, causal=prompt_pass.causal):
                kv.append((k, v))
                return ops.attention(q, k, v, causal=causal, attention_mask=prompt_valid)
            x = run_block(block, x, cos, sin, prompt_pass.adapter, attend)
        caches.append(kv)
    if len(caches) == 2:
        prompt_kv = [(mix_kv(k0, k1, alpha_k[i]), mix_kv(v0, v1, alpha_v[i]))  # in fp32, cast back
                     for i, ((k0, v0), (k1, v1)) in enumerate(zip(*caches))]
    else:
        prompt_kv = caches[0]
    keys_valid = torch.cat((prompt_valid, streams.answer_valid), dim=1)
    x = model.embed_tokens(streams.answer_ids)
    cos, sin = model.rope(streams.prompt_lens[:, None] + torch.arange(ta, device=device), x.dtype)
    for i, block in enumerate(model.layers):
        def attend(q, k, v, i=i):
            if cache is not None:
                _store(cache, i, *prompt_kv[i], k, v)
            return ops.attention(q, torch.cat((prompt_kv[i][0], k), 1), torch.cat((prompt_kv[i][1], v), 1),
                                 causal=True, attention_mask=keys_valid)
        x = run_block(block, x, cos, sin, "causal", attend)
    if cache is not None:
        cache.length = tp + ta
    return x


def run_block(block, x, cos, sin, adapter, attend: Callable) -> torch.Tensor:
    """One pre-norm block with LoRA adapters chosen per call and a pluggable attention:
    h = x + o_proj(attend(q, k, v)); out = h + down(swiglu(gate(h'), up(h')))."""
    attn, mlp = block.self_attn, block.mlp
    batch, length, _ = x.shape
    h = block.input_layernorm(x)
    q = attn.q_proj(h, adapter).view(batch, length, attn.num_heads, attn.head_dim)
    k = attn.k_proj(h, adapter).view(batch, length, attn.num_kv_heads, attn.head_dim)
    v = attn.v_proj(h, adapter).view(batch, length, attn.num_kv_heads, attn.head_dim)
    o = attend(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v)
    x = x + attn.o_proj(o.reshape(batch, length, attn.num_heads * attn.head_dim), adapter)
    h = block.post_attention_layernorm(x)
    return x + mlp.down_proj(ops.swiglu(mlp.gate_proj(h, adapter), mlp.up_proj(h, adapter)), adapter)


def _store(cache: KVCache, layer: int, k_prompt, v_prompt, k_answer, v_answer) -> None:
    """Put a layer's prompt cache and answer keys/values into a decoding cache: [prompt | answer]."""
    tp, ta = k_prompt.shape[1], k_answer.shape[1]
    cache.keys[layer][:, :tp] = k_prompt
    cache.values[layer][:, :tp] = v_prompt
    cache.keys[layer][:, tp:tp + ta] = k_answer
    cache.values[layer][:, tp:tp + ta] = v_answer
