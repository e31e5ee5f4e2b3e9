"""Training Bitune or plain LoRA adapters on (prompt, answer) pairs with the reference defaults, and the
adapter files of a finished run.
"""
from __future__ import annotations

import math
import os
from functools import partial
from pathlib import Path

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import adapters, lora, ops
from ..errors import CheckpointError
from ..model import Llama
from ..train import Batches, LossSum, Schedule, adamw, collate_prompt_answer, fit
from .streams import answer_targets, split_streams
from .wrapper import Bitune

METHODS = ("bitune", "lora")


def bitune_loss(module, batch: dict) -> LossSum:
    """fit's loss for a Bitune module: cross-entropy over the answer tokens, through the module's forward
    (so DDP/FSDP wrappers see the call), from the answer stream's hidden states and the head's weight
    (`kpro.ops.linear_cross_entropy`): no logits in memory, and no gradient for the frozen head."""
    hidden = module(batch["input_ids"], batch["prompt_lens"], batch["attention_mask"], head=False)
    targets = answer_targets(split_streams(batch["input_ids"], batch["prompt_lens"], batch["attention_mask"]))
    bitune = module.module if isinstance(module, DistributedDataParallel) else module
    # The weight is read after the forward: an FSDP model holds it unsharded only from its forward on.
    total = ops.linear_cross_entropy(hidden, bitune.model.lm_head.weight, targets, ignore_index=-100, reduction="sum")
    return LossSum(total, (targets != -100).sum())


def tune(model: Llama, pairs: list, method: str, out_dir: str | os.PathLike, *, steps: int = 3000, batch_size: int = 10,
         lr: float = 3e-4, warmup: float = 0.1, rank: int = 8, alpha: float = 1.0, mode: str = "bitune",
         seed: int = 0, pad_id: int = 0, callbacks=(), stream=None):
    """Train adapters on (prompt, answer) pairs with the reference defaults (AdamW, no weight decay, linear
    schedule with `warmup` of the steps, clipping 1.0, bf16 on GPU). Returns the tuned module: a Bitune,
    or for `method="lora"` a `lora.AdaptedModel` with one `causal` adapter; adapters are saved to
    `out_dir/adapters`, the training state (resumable) to `out_dir/run`."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    if method == "bitune":
        tuned, loss_fn = Bitune(model, rank=rank, alpha=alpha, mode=mode, seed=seed), bitune_loss
    else:
        lora.add_adapters(model, ["causal"], rank=rank, alpha=alpha, seed=seed)
        tuned, loss_fn = lora.AdaptedModel(model, "causal"), None
    tuned.to(model.embed_tokens.weight.device)
    out_dir = Path(out_dir)
    if steps > 0:
        batches = Batches(pairs, batch_size, partial(collate_prompt_answer, pad_id=pad_id), seed=seed)
        kwargs = {} if loss_fn is None else {"loss_fn": loss_fn}
        fit(tuned, batches, out_dir / "run", steps=steps, optimizer=lambda m: adamw(m, lr, weight_decay=0.0),
            schedule=Schedule("linear", warmup_steps=math.ceil(warmup * steps), total_steps=steps),
            clip_grad_norm=1.0, keep_last=1, callbacks=list(callbacks), stream=stream, **kwargs)
    save_tuned_adapters(tuned, out_dir / "adapters")
    return tuned


def save_tuned_adapters(tuned, directory) -> Path:
    if isinstance(tuned, Bitune):
        return tuned.save_adapters(directory)
    return adapters.save_adapters(directory, adapters.lora_tensors(tuned.model), lora_config(tuned.model))


def load_tuned(model: Llama, directory: str | os.PathLike):
    """The tuned module saved by `tune` (its `out_dir/adapters`): a Bitune, or for plain LoRA an
    `AdaptedModel`, with the adapters added to `model` and loaded; the set-up comes from the saved config."""
    saved = adapters.read_config(directory)
    if saved.get("method") == "bitune":
        return Bitune.from_adapters(model, directory)
    if saved.get("method") != "lora":
        raise CheckpointError(f"{directory} holds {saved.get('method')!r} adapters; kpro reads 'bitune' and 'lora'")
    lora.add_adapters(model, saved["adapters"], rank=saved["rank"], alpha=saved["alpha"])
    model.to(model.embed_tokens.weight.device)
    adapters.load_adapters(directory, adapters.lora_tensors(model), lora_config(model))
    return lora.AdaptedModel(model, "causal")


def lora_config(model: nn.Module) -> dict:
    layer = lora.lora_layers(model)[0]
    return {"method": "lora", "rank": layer.rank, "alpha": layer.alpha, "adapters": list(layer.adapters)}
