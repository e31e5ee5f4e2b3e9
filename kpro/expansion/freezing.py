"""`kpro.train_only`: train some blocks, freeze everything else, and skip the gradient work frozen blocks
do not need.

With trainable blocks `ids` and L = min(ids), each block of the model runs one of four ways
(`Llama.hidden_states` calls `model.block_runners[i]` for block i):

    trainable              a plain call: every gradient
    frozen, below L        under torch.no_grad(): no autograd graph, nothing saved, no backward at all
                           (nothing below L needs a gradient; if something does after all, such as
                           embeddings unfrozen after train_only, the block runs like one above L, recomputed
                           too under recompute_frozen=True)
    frozen, above L        a plain call with frozen weights: autograd computes only the input gradient.
                           kpro's ops make that cheap: RMSNorm saves x and its rstd and skips the dW reduction,
                           SwiGLU saves gate and up only, attention saves q, k, v, out and the log-sum-exp,
                           and a frozen projection saves nothing of its input (only dX = dY·W is needed)
    frozen, above L, with  only the block's input is saved; backward re-runs the block from it and takes the
    recompute_frozen=True  input gradient (no weight gradients: the block is frozen)
"""
from __future__ import annotations

import contextlib
import dataclasses
import operator
from typing import Iterable

import torch

from ..lora import LoRALinear
from ..model import Llama, run_block
from ..ops.backend import backends_forced, forced_backends


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """How `train_only` set the model up; block indices in each role."""

    trainable: tuple[int, ...]
    no_graph: tuple[int, ...]  # frozen blocks below the lowest trainable one
    input_grad_only: tuple[int, ...]  # frozen blocks above it
    recompute_frozen: bool

    @property
    def full_training(self) -> bool:
        return not self.no_graph and not self.input_grad_only

    def describe(self) -> str:
        if self.full_training:
            return "full training: every parameter trains"
        above = "recomputed in backward" if self.recompute_frozen else "input gradient only"
        return (f"training blocks {_ranges(self.trainable)}; frozen: {_ranges(self.no_graph) or 'none'} without "
                f"autograd, {_ranges(self.input_grad_only) or 'none'} {above}; embeddings, final norm, head frozen")


def train_only(model: Llama, block_ids: Iterable[int] | None, recompute_frozen: bool = False) -> TrainPlan:
    """Make only blocks `block_ids` trainable and switch on frozen-block gradient skipping.

    Everything else (embeddings, final norm, lm_head, other blocks) gets requires_grad=False. `None`, or
    every block, returns to full training: all parameters train and blocks run plainly again. Call it
    before building the optimizer (`kpro.train.adamw` takes only trainable parameters); the parameters it
    freezes lose any gradient they held, so that no optimizer steps them. A model with LoRA adapters is
    refused: training whole blocks would unfreeze their base weights.
    """
    if not isinstance(model, Llama):
        raise TypeError(f"train_only() takes a kpro.Llama, got {type(model).__name__}")
    adapted = [name for name, module in model.named_modules() if isinstance(module, LoRALinear)]
    if adapted:
        raise ValueError(f"the model has LoRA adapters ({len(adapted)} layers, first: {adapted[0]}): train_only trains "
                         "whole blocks and would unfreeze their base weights; add_adapters already leaves only the "
                         "adapters trainable")
    _check_recompute_flag(recompute_frozen)
    num_blocks = len(model.layers)
    ids = _check_block_ids(block_ids, num_blocks)
    if ids is None or len(ids) == num_blocks:
        model.requires_grad_(True)
        model.block_runners = None
        return TrainPlan(tuple(range(num_blocks)), (), (), False)
    freeze_all_but(model, [model.layers[i] for i in ids])
    lowest = ids[0]
    frozen_above = run_recomputed if recompute_frozen else run_input_grad_only
    frozen_below = run_without_graph_or_recomputed if recompute_frozen else run_without_graph
    model.block_runners = tuple(run_block if i in ids else frozen_below if i < lowest else frozen_above
                                for i in range(num_blocks))
    for i, block in enumerate(model.layers):
        block._train_only_path = f"layers.{i}"  # for _check_frozen's message: every block has an mlp.up_proj
    frozen = [i for i in range(num_blocks) if i not in ids]
    return TrainPlan(ids, tuple(i for i in frozen if i < lowest), tuple(i for i in frozen if i > lowest),
                     bool(recompute_frozen))


def freeze_all_but(model: torch.nn.Module, trainable) -> None:
    """requires_grad=False on every parameter outside the `trainable` modules, and their gradients dropped:
    an optimizer built before (or a loop's zero_grad(set_to_none=False)) would otherwise step on them."""
    model.requires_grad_(False)
    for module in trainable:
        module.requires_grad_(True)
    for param in model.parameters():
        if not param.requires_grad:
            param.grad = None


def _check_recompute_flag(recompute_frozen) -> None:
    if not isinstance(recompute_frozen, bool):  # "False" would turn recompute on
        raise TypeError(f"recompute_frozen must be True or False, got {recompute_frozen!r}")


def _check_block_ids(block_ids, num_blocks: int) -> tuple[int, ...] | None:
    if block_ids is None:
        return None
    # A bare index (Python, numpy or 0-dim tensor integer) or a string is not a collection of them.
    if isinstance(block_ids, (int, str, bytes)) or (hasattr(block_ids, "__index__") and getattr(block_ids, "ndim", 0) == 0):
        raise TypeError(f"block_ids must be a collection of block indices (or None), got {block_ids!r}")
    ids = [_block_index(i) for i in block_ids]
    for i in ids:
        if not 0 <= i < num_blocks:
            raise ValueError(f"block index {i} is out of range: the model has {num_blocks} blocks (0 ... {num_blocks - 1})")
    if not ids:
        raise ValueError("no block to train: pass the indices of at least one block, or None for full training")
    return tuple(sorted(set(ids)))


def _block_index(i) -> int:
    """A block index from a Python, numpy or 0-dim tensor integer (not a bool)."""
    if not isinstance(i, bool) and str(getattr(i, "dtype", "")) not in ("bool", "torch.bool"):
        try:
            return operator.index(i)
        except TypeError:
            pass
    raise TypeError(f"block indices must be integers, got {i!r}")


# ------------------------------------------------------------------------------------------ block runners

def run_without_graph(block, x, cos, sin, attention_mask, kv):
    """A frozen block below every trainable one: no gradient can be needed, so build no graph. Unless its
    input needs one (a parameter below was unfrozen after train_only, e.g. the embeddings to train new
    tokens): then a plain call, so that the gradient reaches it; the frozen weights still get none."""
    _check_frozen(block)
    if x.requires_grad and torch.is_grad_enabled():
        return block(x, cos, sin, attention_mask, kv)
    with torch.no_grad():
        return block(x, cos, sin, attention_mask, kv)


def run_without_graph_or_recomputed(block, x, cos, sin, attention_mask, kv):
    """run_without_graph under recompute_frozen=True: where its input needs a gradient after all (the embeddings
    unfrozen), the block is recomputed as those above L are, rather than keeping its activations."""
    if x.requires_grad and torch.is_grad_enabled():
        return run_recomputed(block, x, cos, sin, attention_mask, kv)
    return run_without_graph(block, x, cos, sin, attention_mask, kv)


def run_input_grad_only(block, x, cos, sin, attention_mask, kv):
    """A frozen block above a trainable one: a plain call, whose frozen weights autograd gives no gradient
    (it computes dX only)."""
    _check_frozen(block)
    return block(x, cos, sin, attention_mask, kv)


def run_recomputed(block, x, cos, sin, attention_mask, kv):
    """A frozen block above a trainable one: save its input only, recompute it in the backward."""
    _check_frozen(block)
    if kv is not None or not torch.is_grad_enabled() or not x.requires_grad:
        return block(x, cos, sin, attention_mask, kv)  # decoding or evaluation: nothing to save anyway
    if torch.compiler.is_compiling():
        return _checkpointed(block, x, cos, sin, attention_mask, None)
    # kpro's blocks draw no random numbers (LlamaConfig refuses attention dropout; there is no other): no RNG state
    # to keep for the recomputation, unlike the transformers layers of kpro.integrations.hf.
    return RecomputedFrozenBlock.apply(x, cos, sin, attention_mask, block, _ForwardContext.capture(x.device))


def _checkpointed(function, *args, **kwargs):
    """The recomputation under torch.compile: Dynamo cannot trace the backward of RecomputedFrozenBlock (which
    swaps the forced backends and calls torch.autograd.grad), but traces non-reentrant checkpointing, which has
    the same intent: the frozen module's ops are tagged to be recomputed in the backward, not saved. Autocast,
    backends and RNG are those of the traced forward, the same ops run again."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, **kwargs)


def _check_frozen(block) -> None:
    # These runners drop weight gradients by design: refuse if someone unfroze the block after train_only.
    for name, p in block.named_parameters():
        if p.requires_grad:
            raise RuntimeError(f"a block that train_only froze has a trainable parameter again "
                               f"({frozen_parameter_name(block, name)}); call kpro.train_only again after changing "
                               "which parameters train")


def frozen_parameter_name(block, name: str) -> str:
    """A frozen block's parameter by its name in the model, as train_only stamped the block's path."""
    path = getattr(block, "_train_only_path", None)
    return f"{path}.{name}" if path else name


@dataclasses.dataclass(frozen=True)
class _ForwardContext:
    """What the forward ran under that the backward does not: autocast, forced kpro backends, and with rng=True
    the RNG states (CPU, and `device`'s), so that a recomputation draws the forward's dropout masks again, as
    torch.utils.checkpoint does. Copying them costs: ask for it only where the module draws (in training)."""

    device_type: str
    autocast: bool
    autocast_dtype: torch.dtype
    backends: tuple
    rng: tuple | None = None  # (device index or None for a CPU device, CPU state, the device's state or None)

    @classmethod
    def capture(cls, device: torch.device, rng: bool = False) -> "_ForwardContext":
        kind = device.type
        states = None
        if rng and kind in ("cpu", "meta"):
            states = (None, torch.get_rng_state(), None)
        elif rng:
            module = torch.get_device_module(kind)
            index = module.current_device() if device.index is None else device.index
            states = (index, torch.get_rng_state(), module.get_rng_state(index))
        return cls(kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind), forced_backends(), states)

    @contextlib.contextmanager
    def replayed(self):
        """Run a recomputation as the forward ran: with gradients, its autocast, backends and RNG states (those
        outside are restored afterwards: the backward draws nothing from the caller's sequence)."""
        with torch.enable_grad(), torch.autocast(self.device_type, self.autocast_dtype, self.autocast), \
                backends_forced(self.backends), contextlib.ExitStack() as stack:
            if self.rng is not None:
                index, cpu_state, device_state = self.rng
                if index is None:
                    stack.enter_context(torch.random.fork_rng(devices=[]))
                else:
                    stack.enter_context(torch.random.fork_rng(devices=[index], device_type=self.device_type))
                    torch.get_device_module(self.device_type).set_rng_state(device_state, index)
                torch.set_rng_state(cpu_state)
            yield


class RecomputedFrozenBlock(torch.autograd.Function):
    """y = block(x) saving only x (cos, sin are shared by all blocks, the mask is [B, T] integers); the
    backward re-runs the block with autograd on and returns dL/dx. The block must be frozen: no weight
    gradient is computed."""

    @staticmethod
    def forward(ctx, x, cos, sin, attention_mask, block, context):
        ctx.block, ctx.context = block, context
        ctx.save_for_backward(x, cos, sin, attention_mask)
        return block(x, cos, sin, attention_mask, None)  # autograd.Function.forward runs without a graph

    @staticmethod
    def backward(ctx, dy):
        x, cos, sin, attention_mask = ctx.saved_tensors
        x = x.detach().requires_grad_(True)
        with ctx.context.replayed():
            y = ctx.block(x, cos, sin, attention_mask, None)
        (dx,) = torch.autograd.grad(y, x, dy)
        return dx, None, None, None, None, None


def _ranges(ids) -> str:
    """(0, 1, 2, 4, 9) -> '0-2, 4, 9'."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and i == runs[-1][-1] + 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return ", ".join(str(r[0]) if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs)
