"""kpro.expansion: LLaMA Pro block expansion and training only the new blocks.

    layout.py      where new blocks go and which block each copies (interleave, top, bottom)
    blocks.py      expand(model, P, position): in place, identity-initialised copies
    freezing.py    train_only(model, ids, recompute_frozen): freezing and frozen-block gradient skipping
    memory.py      saved_activation_bytes: what a forward keeps for its backward
    checkpoint.py  expand_checkpoint(src, dst, P): the same on an HF-layout directory, streamed
    posttrain.py   post-pretraining of the new blocks on a text corpus
    command.py     `python -m kpro expand` and `python -m kpro train-expanded`
"""
from .blocks import expand
from .freezing import TrainPlan, train_only
from .layout import POSITIONS, expansion_layout, new_block_indices
from .memory import saved_activation_bytes

__all__ = ["POSITIONS", "TrainPlan", "expand", "expansion_layout", "new_block_indices", "saved_activation_bytes",
           "train_only"]
