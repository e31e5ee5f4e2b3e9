"""Bitune instruction tuning: read the prompt twice, mix the two key/value caches, answer from the mix.

Each example is `prompt + answer` with prompt length P. Per layer l, with two LoRA adapters on all seven
projections of every block:
- pass 1 reads `prompt[:P-1]` with bidirectional attention and the `bidir` adapter;
- pass 2 reads the same tokens causally with the `causal` adapter (both at positions 0 … P-2);
- their post-RoPE keys and values are mixed, α = |w| / (|w| + mix_eps) with two fp32 scalars per layer:
  K = (1 − α_k)·K_causal + α_k·K_bidir, V = (1 − α_v)·V_causal + α_v·V_bidir;
- pass 3 reads `[prompt[P-1], answer…]` causally with the `causal` adapter, attending to the mixed
  cache; logits and loss (answer tokens only) come from it.

The fused path runs the three streams through the model together, layer by layer (one sequence of
stacked tokens: one base matmul per projection, each stream's own adapter, `kpro.ops.bitune_attention`
for the attention). The reference path runs the passes one after another with explicit masks and an
explicit mix; it is the ground truth in tests and runs the ablations the fused kernel does not cover.
Rows are right-padded and may all have different prompt and answer lengths.

Bitune keeps two adapters, so they cannot be merged into one set of base weights: save them with
`save_adapters` and serve with `generate`.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import adapters, lora, ops
from .checkpoint import CheckpointError
from .generation import decode
from .model import KVCache, Llama
from .rope import apply_rope

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


@dataclasses.dataclass
class Streams:
    """One batch as Bitune's token streams, right-padded: the prompt streams `prompt[:P-1]` and the
    answer stream `[prompt[P-1], answer…]`."""
    prompt_ids: torch.Tensor  # [B, Tp]
    answer_ids: torch.Tensor  # [B, Ta]
    prompt_lens: torch.Tensor  # [B] valid tokens of the prompt streams (P − 1)
    answer_lens: torch.Tensor  # [B] valid tokens of the answer stream

    @property
    def prompt_valid(self):
        return torch.arange(self.prompt_ids.shape[1], device=self.prompt_ids.device) < self.prompt_lens[:, None]

    @property
    def answer_valid(self):
        return torch.arange(self.answer_ids.shape[1], device=self.answer_ids.device) < self.answer_lens[:, None]


class Bitune(nn.Module):
    """`kpro.Bitune(model, rank=8, alpha=1.0, mix_init=0.01, mix_eps=0.01, mode="bitune")` adds the adapters
    to `model` in place (freezing its own weights) and holds the mixing scalars."""

    def __init__(self, model: Llama, rank: int = 8, alpha: float = 1.0, mix_init: float = 0.01,
                 mix_eps: float = 0.01, mode: str = "bitune", seed: int | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown Bitune mode {mode!r}; choose from {', '.join(MODES)}")
        if not mix_eps > 0:
            raise ValueError(f"mix_eps must be > 0, got {mix_eps}")
        self.model, self.mode, self.rank, self.alpha, self.mix_eps = model, mode, rank, float(alpha), float(mix_eps)
        self.adapter_names = sorted({p.adapter for p in MODES[mode].passes} | {"causal"})
        lora.add_adapters(model, self.adapter_names, rank=rank, alpha=alpha, seed=seed)
        layers = model.config.num_hidden_layers
        self.w_k = nn.Parameter(torch.full((layers,), float(mix_init), dtype=torch.float32))
        self.w_v = nn.Parameter(torch.full((layers,), float(mix_init), dtype=torch.float32))

    def _apply(self, fn, recurse=True):
        # `bt.to(torch.bfloat16)` casts the model; the mixing scalars stay fp32 (SPEC: 2·L fp32 scalars).
        super()._apply(fn, recurse)
        for param in (self.w_k, self.w_v):
            if param.dtype != torch.float32:
                param.data = param.data.float()
        return self

    # ------------------------------------------------------------------------------------- public API

    def mix_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_k, α_v), fp32 [layers]: α = |w| / (|w| + mix_eps)."""
        return (self.w_k.abs() / (self.w_k.abs() + self.mix_eps), self.w_v.abs() / (self.w_v.abs() + self.mix_eps))

    def forward(self, input_ids: torch.Tensor, prompt_lens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                *, fused: bool | None = None) -> torch.Tensor:
        """Logits of the answer stream [B, Ta, vocab]: position t predicts answer stream token t + 1.

        input_ids [B, T] are `prompt + answer`, right-padded (`attention_mask` 1 = real token); prompt_lens
        [B] is each row's P. `fused=None` takes the fused path wherever the mode has one (`bitune`,
        `shared_weights`), else the separate passes; `fused=False` forces the reference path (the same
        numbers; on the CPU the two measured level)."""
        streams = split_streams(input_ids, prompt_lens, attention_mask, need_answer=True)
        return self._answer_logits(streams, fused)

    def loss(self, input_ids: torch.Tensor, prompt_lens: torch.Tensor, attention_mask: torch.Tensor | None = None,
             *, fused: bool | None = None) -> torch.Tensor:
        """Mean cross-entropy (fp32) over the answer tokens of the batch."""
        streams = split_streams(input_ids, prompt_lens, attention_mask, need_answer=True)
        logits = self._answer_logits(streams, fused)
        targets = answer_targets(streams)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *, fused: bool | None = None,
                 **sampling) -> list[list[int]]:
        """New tokens for each prompt (token lists of any lengths): the three-stream prefill once, then
        cached decoding with the `causal` adapter. `sampling`: temperature, top_k, top_p, generator,
        eos_token_id, pad_token_id, stop_after_eos (as in kpro.generate)."""
        device = self.w_k.device
        ids, lens = right_pad([list(p) for p in prompts], pad_id=0, device=device)
        limit = self.model.config.max_position_embeddings
        if ids.shape[1] + max_new_tokens > limit:
            raise ValueError(f"the longest prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's max_position_embeddings={limit}")
        streams = split_streams(ids, lens, (torch.arange(ids.shape[1], device=device) < lens[:, None]).long(),
                               need_answer=False)
        tp = streams.prompt_ids.shape[1]
        cache = KVCache(self.model.config, ids.shape[0], tp + 1 + max_new_tokens, self.model.embed_tokens.weight.dtype, device)
        logits = self._answer_logits(streams, fused, cache=cache)[:, -1]
        mask = torch.cat((streams.prompt_valid.long(), torch.ones_like(lens)[:, None]), dim=1)
        with lora.active(self.model, "causal"):
            new = decode(self.model, cache, logits, mask, max_new_tokens, **sampling)
        return new.tolist()

    def merged(self):
        """Not meaningful for Bitune: the prompt is read with two adapters and the answer with a third
        combination (the causal adapter over a mixed cache), so no single set of merged weights computes
        the same function. Serve the adapters with `generate` instead."""
        raise NotImplementedError(self.merged.__doc__.strip())

    # -------------------------------------------------------------------------------- answer logits

    def _answer_logits(self, streams: Streams, fused: bool | None, cache: KVCache | None = None) -> torch.Tensor:
        mode = MODES[self.mode]
        if fused is None:
            fused = mode.fused
        elif fused and not mode.fused:
            raise ValueError(f"mode {self.mode!r} has no fused path (its prompt passes are not one causal and one "
                             "bidirectional); use fused=False")
        hidden = self._fused(streams, cache) if fused else self._passes(streams, cache)
        return self.model.lm_head(self.model.norm(hidden))

    # -------------------------------------------------------------------------------- the fused path

    def _fused(self, streams: Streams, cache: KVCache | None) -> torch.Tensor:
        """All three streams stacked on the time axis [prompt0 | prompt1 | answer], layer by layer."""
        model, mode = self.model, MODES[self.mode]
        tp, ta = streams.prompt_ids.shape[1], streams.answer_ids.shape[1]
        device = streams.prompt_ids.device
        ids = torch.cat((streams.prompt_ids, streams.prompt_ids, streams.answer_ids), dim=1)
        prompt_positions = torch.arange(tp, device=device).expand(ids.shape[0], tp)
        positions = torch.cat((prompt_positions, prompt_positions,
                               streams.prompt_lens[:, None] + torch.arange(ta, device=device)), dim=1)
        segments = [(0, tp, mode.passes[0].adapter), (tp, 2 * tp, mode.passes[1].adapter), (2 * tp, 2 * tp + ta, "causal")]
        alpha_k, alpha_v = self.mix_weights()
        x = model.embed_tokens(ids)
        cos, sin = model.rope(positions, x.dtype)
        for i, block in enumerate(model.layers):
            def attend(q, k, v, i=i):
                q_p, k_p, v_p = (t[:, :2 * tp].unflatten(1, (2, tp)).transpose(0, 1) for t in (q, k, v))
                q_a, k_a, v_a = q[:, 2 * tp:], k[:, 2 * tp:], v[:, 2 * tp:]
                if cache is not None:
                    k_mix = (1 - alpha_k[i]) * k_p[0] + alpha_k[i] * k_p[1]
                    v_mix = (1 - alpha_v[i]) * v_p[0] + alpha_v[i] * v_p[1]
                    _store(cache, i, k_mix, v_mix, k_a, v_a)
                o_p, o_a = ops.bitune_attention(q_p, k_p, v_p, q_a, k_a, v_a, alpha_k[i], alpha_v[i],
                                                streams.prompt_lens, streams.answer_lens)
                return torch.cat((o_p[0], o_p[1], o_a), dim=1)
            x = run_block(block, x, cos, sin, segments, attend)
        if cache is not None:
            cache.length = tp + ta
        return x[:, 2 * tp:]

    # ---------------------------------------------------------------------------- the reference path

    def _passes(self, streams: Streams, cache: KVCache | None) -> torch.Tensor:
        """The passes one after another: each prompt pass collects its per-layer keys and values, the
        caches are mixed explicitly, and the answer pass attends to [mixed cache, its own keys]."""
        model, mode = self.model, MODES[self.mode]
        batch, tp = streams.prompt_ids.shape
        ta = streams.answer_ids.shape[1]
        device = streams.prompt_ids.device
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
        alpha_k, alpha_v = self.mix_weights()
        if len(caches) == 2:
            prompt_kv = [((1 - alpha_k[i]) * k0 + alpha_k[i] * k1, (1 - alpha_v[i]) * v0 + alpha_v[i] * v1)
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

    # ------------------------------------------------------------------------------- saving, loading

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """Adapters and mixing scalars by their file names (`model.layers.{i}.self_attn.q_proj.bidir.lora_A.weight`,
        `model.layers.{i}.bitune.w_k`)."""
        tensors = adapters.lora_tensors(self.model)
        for i in range(self.model.config.num_hidden_layers):
            tensors[f"model.layers.{i}.bitune.w_k"] = self.w_k[i]
            tensors[f"model.layers.{i}.bitune.w_v"] = self.w_v[i]
        return tensors

    def config(self) -> dict:
        return {"method": "bitune", "rank": self.rank, "alpha": self.alpha, "mix_eps": self.mix_eps, "mode": self.mode,
                "adapters": self.adapter_names, "num_hidden_layers": self.model.config.num_hidden_layers}

    def save_adapters(self, directory: str | os.PathLike) -> Path:
        """Write the adapters and mixing scalars (safetensors) and a small JSON config, atomically."""
        return adapters.save_adapters(directory, self.adapter_tensors(), self.config())

    def load_adapters(self, directory: str | os.PathLike) -> None:
        """Load adapters saved by `save_adapters` into this Bitune (same rank, alpha, mode, layers)."""
        adapters.load_adapters(directory, self.adapter_tensors(), self.config())

    @classmethod
    def from_adapters(cls, model: Llama, directory: str | os.PathLike) -> "Bitune":
        """A Bitune on `model` with the set-up and weights saved in `directory`."""
        saved = adapters.read_config(directory)
        if saved.get("method") != "bitune":
            raise CheckpointError(f"{directory} holds {saved.get('method')!r} adapters, not Bitune's")
        bitune = cls(model, rank=saved["rank"], alpha=saved["alpha"], mix_eps=saved["mix_eps"], mode=saved["mode"])
        bitune.to(model.embed_tokens.weight.device)
        bitune.load_adapters(directory)
        return bitune


def split_streams(input_ids, prompt_lens, attention_mask=None, need_answer=True) -> Streams:
    """Split right-padded `prompt + answer` rows into the prompt and answer streams."""
    if input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {tuple(input_ids.shape)} {input_ids.dtype}")
    batch, length = input_ids.shape
    device = input_ids.device
    prompt_lens = torch.as_tensor(prompt_lens, device=device)
    if prompt_lens.shape != (batch,) or prompt_lens.dtype.is_floating_point:
        raise ValueError(f"prompt_lens must be an integer tensor [B={batch}], got {tuple(prompt_lens.shape)} {prompt_lens.dtype}")
    if attention_mask is None:
        lengths = torch.full((batch,), length, device=device)
    else:
        if attention_mask.shape != (batch, length):
            raise ValueError(f"attention_mask must be [B={batch}, T={length}], got {tuple(attention_mask.shape)}")
        lengths = attention_mask.long().sum(1)
        if not torch.equal(attention_mask.bool(), torch.arange(length, device=device) < lengths[:, None]):
            raise ValueError("attention_mask must be right-padded (ones, then zeros) for Bitune")
    if (prompt_lens < 1).any():
        raise ValueError(f"prompt lengths must be >= 1, got {prompt_lens.tolist()}")
    if need_answer and (prompt_lens >= lengths).any():
        raise ValueError(f"every row needs at least one answer token after its prompt: prompt_lens "
                         f"{prompt_lens.tolist()} vs sequence lengths {lengths.tolist()}")
    if not need_answer and (prompt_lens > lengths).any():
        raise ValueError(f"prompt_lens {prompt_lens.tolist()} exceed the sequence lengths {lengths.tolist()}")
    lp = prompt_lens - 1
    la = (lengths if need_answer else prompt_lens) - lp
    tp, ta = int(lp.max()), int(la.max())
    index = (lp[:, None] + torch.arange(ta, device=device)).clamp(max=length - 1)
    answer_ids = torch.gather(input_ids, 1, index).masked_fill(torch.arange(ta, device=device) >= la[:, None], 0)
    prompt_ids = input_ids[:, :tp].masked_fill(torch.arange(tp, device=device) >= lp[:, None], 0)
    return Streams(prompt_ids, answer_ids, lp, la)


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


def answer_targets(streams: Streams) -> torch.Tensor:
    """Next-token targets of the answer stream: token t + 1 where it is an answer token, else -100."""
    targets = torch.full_like(streams.answer_ids, -100)
    targets[:, :-1] = streams.answer_ids[:, 1:]
    valid = torch.arange(targets.shape[1], device=targets.device) < (streams.answer_lens - 1)[:, None]
    return targets.masked_fill(~valid, -100)


def right_pad(sequences: list[list[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T] right-padded, lengths [B])."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("need at least one sequence and no empty sequence")
    length = max(map(len, sequences))
    ids = torch.tensor([list(s) + [pad_id] * (length - len(s)) for s in sequences], dtype=torch.long, device=device)
    return ids, torch.tensor([len(s) for s in sequences], device=device)


def _store(cache: KVCache, layer: int, k_prompt, v_prompt, k_answer, v_answer) -> None:
    """Put a layer's prompt cache and answer keys/values into a decoding cache: [prompt | answer]."""
    tp, ta = k_prompt.shape[1], k_answer.shape[1]
    cache.keys[layer][:, :tp] = k_prompt
    cache.values[layer][:, :tp] = v_prompt
    cache.keys[layer][:, tp:tp + ta] = k_answer
    cache.values[layer][:, tp:tp + ta] = v_answer
