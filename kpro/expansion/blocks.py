"""`kpro.expand`: grow a trained model in place by identity-initialised copies of its blocks (LLaMA Pro)."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..model import Block, Llama
from .layout import expansion_layout


def expand(model: Llama, num_new_blocks: int, position: str = "interleave") -> list[int]:
    """Insert `num_new_blocks` blocks into `model` (in place) and return their indices.

    Each new block is a copy of the block it follows (see `kpro.expansion.layout`) with `o_proj` and
    `down_proj` zeroed: both residual branches add exactly zero, so the expanded model computes the same
    logits as before. New blocks are trainable (requires_grad=True) even if their source was frozen;
    the original parameters keep their flags. `model.config` becomes a new config with the new
    `num_hidden_layers`.

    Refused for a model that is being trained (in `train_only` mode, or holding gradients: an optimizer
    built before would miss the new blocks), sharded, or carrying LoRA adapters: expand first.
    """
    if not isinstance(model, Llama):
        raise TypeError(f"expand() takes a kpro.Llama, got {type(model).__name__}")
    check_not_training(model)
    layout = expansion_layout(len(model.layers), num_new_blocks, position)
    blocks = []
    for source, new in layout:
        block = model.layers[source]
        if new:
            block = copy.deepcopy(block)
            with torch.no_grad():
                block.self_attn.o_proj.weight.zero_()
                block.mlp.down_proj.weight.zero_()
            # A copy of a block frozen by hand would stay frozen, and an optimizer over the trainable
            # parameters would silently skip the blocks made to be trained.
            block.requires_grad_(True)
        blocks.append(block)
    model.layers = nn.ModuleList(blocks)
    model.config = model.config.replace(num_hidden_layers=len(blocks))
    return [i for i, (_, new) in enumerate(layout) if new]


def check_not_training(model: Llama) -> None:
    """What "being trained" means for expand: a train_only plan is set, or a parameter holds a gradient
    (a step in progress, or gradients kept by zero_grad(set_to_none=False)); also refuse blocks that are
    no longer plain kpro blocks of plain linear layers (FSDP-sharded, LoRA adapters)."""
    if getattr(model, "block_runners", None) is not None:
        raise ValueError("the model is in train_only mode (it is being trained); call kpro.train_only(model, None) "
                         "before expanding, and build the optimizer after")
    with_grad = [name for name, p in model.named_parameters() if p.grad is not None]
    if with_grad:
        raise ValueError(f"the model is being trained: {len(with_grad)} parameter(s) hold gradients (first: "
                         f"{with_grad[0]}); finish the step and clear them (optimizer.zero_grad(set_to_none=True)) "
                         "before expanding, and build the optimizer after")
    for i, block in enumerate(model.layers):
        if type(block) is not Block:
            raise ValueError(f"layers.{i} is a {type(block).__name__}, not a plain kpro Block (sharded?); expand "
                             "the model before sharding it")
        for name, module in block.named_modules():
            if name.endswith("_proj") and type(module) is not nn.Linear:
                raise ValueError(f"layers.{i}.{name} is a {type(module).__name__}, not nn.Linear; expand the model "
                                 "before adding adapters")
