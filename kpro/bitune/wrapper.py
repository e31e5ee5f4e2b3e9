"""`kpro.Bitune`: the module that adds Bitune's two adapters and mixing scalars to a model, and computes
the answer stream's logits, the loss, generation, and the adapter files.

Each example is `prompt + answer` with prompt length P. Per layer l, with two LoRA adapters on all seven
projections of every block:
- pass 1 reads `prompt[:P-1]` with bidirectional attention and the `bidir` adapter;
- pass 2 reads the same tokens causally with the `causal` adapter (both at positions 0 … P-2);
- their post-RoPE keys and values are mixed, α = |w| / (|w| + mix_eps) with two fp32 scalars per layer:
  K = (1 − α_k)·K_causal + α_k·K_bidir, V = (1 − α_v)·V_causal + α_v·V_bidir;
- pass 3 reads `[prompt[P-1], answer…]` causally with the `causal` adapter, attending to the mixed
  cache; logits and loss (answer tokens only) come from it.

How the passes run (fused or one after another) is in `passes.py`. Bitune keeps two adapters, so they
cannot be merged into one set of base weights: save them with `save_adapters` and serve with `generate`.
"""
from __future__ import annotations

import math
import numbers
import os
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import adapters, lora, ops
from ..errors import CheckpointError
from ..generation import DECODE_OPTIONS, check_decoding, decode
from ..model import KVCache, Llama, activation_dtype, check_token_ids, head_is_its_weight
from .passes import MODES, fused_passes, separate_passes
from .streams import Streams, answer_targets, check_answers_to_predict, right_pad, split_streams, token_lists


class Bitune(nn.Module):
    """`kpro.Bitune(model, rank=8, alpha=1.0, mix_init=0.01, mix_eps=0.01, mode="bitune")` adds the adapters
    to `model` in place (freezing its own weights) and holds the mixing scalars."""

    def __init__(self, model: Llama, rank: int = 8, alpha: float = 1.0, mix_init: float = 0.01,
                 mix_eps: float = 0.01, mode: str = "bitune", seed: int | None = None):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"unknown Bitune mode {mode!r}; choose from {', '.join(MODES)}")
        if isinstance(mix_eps, bool) or not isinstance(mix_eps, numbers.Real) or not 0 < mix_eps < math.inf:
            raise ValueError(f"mix_eps must be a finite number > 0, got {mix_eps!r}")
        # α = |w| / (|w| + mix_eps): an infinite or NaN w makes it NaN, and at w = 0 |w| has no gradient, so the
        # mix would stay at α = 0 and never learn.
        if isinstance(mix_init, bool) or not isinstance(mix_init, numbers.Real) or not (
                math.isfinite(mix_init) and mix_init != 0):
            raise ValueError(f"mix_init must be a finite number other than 0 (|w| has no gradient at 0: the mix "
                             f"would never learn), got {mix_init!r}")
        rank, alpha = lora.check_rank_alpha(rank, alpha)  # Python numbers: config() is saved as JSON
        if lora.lora_layers(model):
            raise ValueError("this model has LoRA adapters already (Bitune, or LoRA, was applied to it before): "
                             "kpro.Bitune adds its own to a plain model; load the model again, or keep using the "
                             "Bitune made first")
        self.model, self.mode, self.rank, self.alpha, self.mix_eps = model, mode, rank, alpha, float(mix_eps)
        self.adapter_names = sorted({p.adapter for p in MODES[mode].passes} | {"causal"})
        lora.add_adapters(model, self.adapter_names, rank=rank, alpha=alpha, seed=seed)
        layers = model.config.num_hidden_layers
        device = model.embed_tokens.weight.device  # where the model is, as the adapters are
        self.w_k = nn.Parameter(torch.full((layers,), float(mix_init), dtype=torch.float32, device=device))
        self.w_v = nn.Parameter(torch.full((layers,), float(mix_init), dtype=torch.float32, device=device))

    def _apply(self, fn, recurse=True):
        # `bt.to(torch.bfloat16)` casts the model; the mixing scalars stay fp32 (SPEC: 2·L fp32 scalars).
        with lora.dtype_kept([(self, "w_k"), (self, "w_v")], lambda: torch.float32):
            super()._apply(fn, recurse)
        return self

    # ------------------------------------------------------------------------------------- public API

    def mix_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(α_k, α_v), fp32 [layers]: α = |w| / (|w| + mix_eps)."""
        return (self.w_k.abs() / (self.w_k.abs() + self.mix_eps), self.w_v.abs() / (self.w_v.abs() + self.mix_eps))

    def forward(self, input_ids: torch.Tensor | Streams, prompt_lens: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, *, fused: bool | None = None, head: bool = True) -> torch.Tensor:
        """Logits of the answer stream [B, Ta, vocab]: position t predicts answer stream token t + 1.
        With `head=False`, the answer stream's final-norm hidden states [B, Ta, hidden] instead (the loss
        takes them with `model.lm_head.weight`, so the logits never exist).

        input_ids [B, T] are `prompt + answer`, right-padded (`attention_mask` 1 = real token); prompt_lens
        [B] is each row's P. Or, in place of all three, the batch already split into its streams
        (`split_streams(input_ids, prompt_lens, attention_mask)`): the form `torch.compile(bitune,
        fullgraph=True)` takes, since the streams' shapes come from the lengths' values. `fused=None` takes
        the fused path wherever the mode has one (`bitune`, `shared_weights`), else the separate passes;
        `fused=False` forces the reference path (the same numbers; on the CPU the two measured level)."""
        hidden = self._answer_hidden(self._streams(input_ids, prompt_lens, attention_mask), fused)
        return self.model.lm_head(hidden) if head else hidden

    def loss(self, input_ids: torch.Tensor | Streams, prompt_lens: torch.Tensor | None = None,
             attention_mask: torch.Tensor | None = None, *, fused: bool | None = None) -> torch.Tensor:
        """Mean cross-entropy (fp32) over the answer tokens of the batch, fused with the output head
        (`kpro.ops.linear_cross_entropy`: no logits in memory, no gradient for the frozen head). A head that
        is more than its weight (a bias, hooks: `kpro.model.head_is_its_weight`) makes the logits instead, as
        `forward` does. The batch as in `forward`: ids, prompt lengths and mask, or its streams."""
        streams = self._streams(input_ids, prompt_lens, attention_mask)
        if isinstance(input_ids, Streams):  # ids are split with at least one answer token a row
            check_answers_to_predict(streams, "Bitune.loss")
        hidden = self._answer_hidden(streams, fused)
        targets = answer_targets(streams)
        if head_is_its_weight(self.model.lm_head):
            return ops.linear_cross_entropy(hidden, self.model.lm_head.weight, targets, ignore_index=-100)
        dtype = torch.promote_types(hidden.dtype, torch.float32)  # as linear_cross_entropy computes
        return F.cross_entropy(self.model.lm_head(hidden).flatten(0, 1).to(dtype), targets.flatten(), ignore_index=-100)

    @staticmethod
    def _streams(batch, prompt_lens, attention_mask) -> Streams:
        if isinstance(batch, Streams):
            if prompt_lens is not None or attention_mask is not None:
                raise ValueError("a Bitune batch given as Streams carries its lengths: pass no prompt_lens or "
                                 "attention_mask with it")
            return batch
        if prompt_lens is None:
            raise ValueError("Bitune needs prompt_lens [B] with input_ids (or the batch split into Streams)")
        return split_streams(batch, prompt_lens, attention_mask, need_answer=True)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32, *, fused: bool | None = None,
                 **sampling) -> list[list[int]]:
        """New tokens for each prompt (token lists of any lengths): the three-stream prefill once, then
        cached decoding with the `causal` adapter. `sampling`: temperature, top_k, top_p, generator,
        eos_token_id, pad_token_id, stop_after_eos (as in kpro.generate)."""
        prompts = token_lists(prompts, "prompt", "Bitune.generate", self.model.config.vocab_size)
        empty = next((i for i, p in enumerate(prompts) if not p), None)
        if empty is not None:
            raise ValueError(f"Bitune.generate: prompt {empty} is empty; the answer stream starts with the prompt's "
                             "last token (give at least one, e.g. bos)")
        # Before the prefill: a bad max_new_tokens would size the cache, and any other bad argument would be
        # refused by decode only after the prefill's work
        unknown = sorted(set(sampling) - set(DECODE_OPTIONS))
        if unknown:
            raise TypeError(f"Bitune.generate got unexpected keyword arguments {unknown} (it takes max_new_tokens, "
                            f"fused and {', '.join(DECODE_OPTIONS)})")
        max_new_tokens = check_decoding(self.model.config, max_new_tokens, **sampling)[0]
        device = self.w_k.device
        ids, lens = right_pad(prompts, pad_id=0, device=device)
        limit = self.model.config.max_position_embeddings
        if ids.shape[1] + max_new_tokens > limit:
            raise ValueError(f"the longest prompt ({ids.shape[1]}) + max_new_tokens ({max_new_tokens}) exceeds the "
                             f"model's max_position_embeddings={limit}")
        streams = split_streams(ids, lens, (torch.arange(ids.shape[1], device=device) < lens[:, None]).long(),
                               need_answer=False)
        tp = streams.prompt_ids.shape[1]
        cache = KVCache(self.model.config, ids.shape[0], tp + 1 + max_new_tokens, activation_dtype(self.model), device)
        logits = self.model.lm_head(self._answer_hidden(streams, fused, cache=cache)[:, -1])  # one position
        mask = torch.cat((streams.prompt_valid.long(), torch.ones_like(lens)[:, None]), dim=1)
        with lora.active(self.model, "causal"):
            new = decode(self.model, cache, logits, mask, max_new_tokens, **sampling)
        return new.tolist()

    def merged(self):
        """Not meaningful for Bitune: the prompt is read with two adapters and the answer with a third
        combination (the causal adapter over a mixed cache), so no single set of merged weights computes
        the same function. Serve the adapters with `generate` instead."""
        raise NotImplementedError(self.merged.__doc__.strip())

    # ------------------------------------------------------------------------------- answer stream

    def _answer_hidden(self, streams: Streams, fused: bool | None, cache: KVCache | None = None) -> torch.Tensor:
        """The answer stream's hidden states after the final norm, [B, Ta, hidden]."""
        mode = MODES[self.mode]
        if fused is None:
            fused = mode.fused
        elif fused and not mode.fused:
            raise ValueError(f"mode {self.mode!r} has no fused path (its prompt passes are not one causal and one "
                             "bidirectional); use fused=False")
        for ids in (streams.prompt_ids, streams.answer_ids):
            check_token_ids(ids, self.model.config.vocab_size)
        run = fused_passes if fused else separate_passes
        return self.model.norm(run(self.model, mode, streams, *self.mix_weights(), cache))

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
        return adapters.save_adapters(directory, self.adapter_tensors(),
                                      {**self.config(), **adapters.base_record(self.model)})

    def load_adapters(self, directory: str | os.PathLike) -> None:
        """Load adapters saved by `save_adapters` into this Bitune (same rank, alpha, mode, layers, base)."""
        adapters.check_base(directory, self.model)
        adapters.load_adapters(directory, self.adapter_tensors(), self.config())

    @classmethod
    def from_adapters(cls, model: Llama, directory: str | os.PathLike) -> "Bitune":
        """A Bitune on `model` with the set-up and weights saved in `directory`."""
        saved = adapters.read_config(directory, ("method",))
        if saved.get("method") != "bitune":
            raise CheckpointError(f"{directory} holds {saved.get('method')!r} adapters, not Bitune's")
        saved = adapters.read_config(directory, ("rank", "alpha", "mix_eps", "mode"))
        adapters.check_base(directory, model)  # before any adapter is added to it
        with lora.adapters_undone_on_error(model):  # a failed load leaves the model as it was
            bitune = cls(model, rank=saved["rank"], alpha=saved["alpha"], mix_eps=saved["mix_eps"], mode=saved["mode"])
            bitune.to(model.embed_tokens.weight.device)
            bitune.load_adapters(directory)
        return bitune
