"""LoRA with several named adapters per linear layer, the adapter chosen per call.

    y = x·Wᵀ + (alpha / r)·(x·Aᵀ)·Bᵀ,   A [r, in] random (Kaiming-uniform), B [out, r] zero,

so a fresh adapter changes nothing. The base weight stays the layer's own `weight` parameter, frozen, so
checkpoint names do not change; adapter weights are named `<layer>.<adapter>.lora_A.weight` and
`<layer>.<adapter>.lora_B.weight`.

Which adapter runs: `layer(x, adapter="name")`, or a list of `(start, end, name)` token segments that tile
the sequence dimension (Bitune runs three streams stacked in one call: one base matmul for all of them,
each segment's low-rank update with its own adapter), or, when the caller passes nothing (a plain model
forward), the layer's `active` adapter, set for a whole model with `with kpro.lora.active(model, name):`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import numbers
from typing import Callable, Iterable, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ._numbers import is_integer

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
Segments = Sequence[tuple[int, int, str | None]]
# A merged layer's buffer (state-dict key `<layer>.merged_adapter`): the merged adapter's name, as a uint8 tensor
# of its UTF-8 bytes. An unmerged layer has none, so an unmerged model's state_dict is as it was before the mark.
MERGE_MARK = "merged_adapter"
# Beside it (`<layer>.merged_scale`): the scale (alpha / rank) the update was merged at, as a uint8 tensor of its
# decimal text (`repr`, exact, and left alone by a cast of the model as a float tensor would not be), so that a model
# built with another alpha refuses the merged weight rather than unmerge it to another base. A mark written before
# the scale was recorded has none: loaded, the layer's own scale is taken.
MERGE_SCALE = "merged_scale"


def is_lora_key(name: str) -> bool:
    """Whether a state-dict key is LoRA's own (an adapter's A or B, or a merge mark or scale), not the base
    model's."""
    return ".lora_A." in name or ".lora_B." in name or any(name == key or name.endswith("." + key)
                                                           for key in (MERGE_MARK, MERGE_SCALE))


def _mark(name: str, device) -> torch.Tensor:
    return torch.tensor(list(name.encode()), dtype=torch.uint8, device=device)


def _marked_scale(scale) -> float | None:
    """The scale a merge-scale tensor holds, or None where it is none."""
    if not (isinstance(scale, torch.Tensor) and scale.dtype == torch.uint8 and scale.dim() == 1):
        return None
    try:
        return float(bytes(scale.tolist()).decode())
    except (UnicodeDecodeError, ValueError):
        return None


def _marked_name(mark) -> str | None:
    """The adapter name a merge mark holds, or None where it is no mark."""
    if not (isinstance(mark, torch.Tensor) and mark.dtype == torch.uint8 and mark.dim() == 1):
        return None
    try:
        name = bytes(mark.tolist()).decode()
    except UnicodeDecodeError:
        return None
    return name if name.isidentifier() else None


def adapter_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """Adapters of a half-precision model are kept in fp32 (as PEFT does): AdamW's small updates to a bf16
    weight would round away. Under autocast they still run in bf16."""
    return torch.promote_types(weight_dtype, torch.float32)


@contextlib.contextmanager
def dtype_kept(params: Sequence[tuple[nn.Module, str]], dtype: Callable[[], torch.dtype]):
    """Around a module's `_apply` (`.to(torch.bfloat16)`, `.half()`): each parameter `getattr(owner, name)` of
    `params` ends in `dtype()` (read after the cast), converted from its own values and gradient rather than
    rounded through the cast's dtype on the way. A parameter that torch.nn.utils.parametrize computes is kept
    through the original(s) it is computed from (setting the computed tensor's .data would not reach them)."""
    params = [held for owner, name in params for held in _held_at(owner, name)]
    saved = [(owner, name, getattr(owner, name).data, getattr(owner, name).grad) for owner, name in params]
    saved = [(owner, name, data, None if grad is None else grad.data) for owner, name, data, grad in saved]
    yield  # (the cast swaps the .data of a parameter and of its gradient: these references keep the old values)
    want = dtype()
    for owner, name, data, grad in saved:
        param = getattr(owner, name)
        if param.dtype != want and param.is_floating_point():
            param.data = data.to(param.device, want)
            if grad is not None and param.grad is not None:
                param.grad.data = grad.to(param.grad.device, want)


def _held_at(owner: nn.Module, name: str) -> list[tuple[nn.Module, str]]:
    """Where parameter `owner.name` is held: on `owner`, or, for a parametrized one, the parameters it is
    computed from (`owner.parametrizations[name].original`, or `original0`, `original1`... for several)."""
    if not parametrize.is_parametrized(owner, name):
        return [(owner, name)]
    originals = owner.parametrizations[name]
    return [(originals, attr) for attr, _ in originals.named_parameters(recurse=False)]


class Adapter(nn.Module):
    def __init__(self, in_features: int, out_features: int, rank: int, dtype, device, generator=None):
        super().__init__()
        self.lora_A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        with torch.no_grad():
            bound = 1 / math.sqrt(in_features)  # nn.Linear's Kaiming-uniform bound for A
            self.lora_A.weight.copy_(torch.empty_like(self.lora_A.weight, device="cpu").uniform_(-bound, bound, generator=generator))
            self.lora_B.weight.zero_()

    def forward(self, x):
        return self.lora_B(self.lora_A(x))


_CHANGED = -1  # in a merge record's versions: no tensor's version, so the tensor counts as changed since the merge


@dataclasses.dataclass(frozen=True)
class _MergeRecord:
    """What LoRALinear.merge folded into the weight: the adapter's A and B, its requires_grad flags, and
    (to notice later in-place changes) the version counters of the watched tensors, the weight, A and B, after
    the merge (_CHANGED: changed in a copy's original). The methods take the watched tensors in that order."""

    factors: tuple[torch.Tensor, torch.Tensor]
    requires_grad: tuple[bool, bool]
    versions: tuple[int, int, int]

    def unchanged(self, watched: Sequence[torch.Tensor]) -> tuple[bool, bool, bool]:
        """Which of the weight, A and B are unchanged since the merge."""
        return tuple(t._version == then for t, then in zip(watched, self.versions))

    def versions_match(self, watched: Sequence[torch.Tensor]) -> bool:
        return all(self.unchanged(watched))

    def weight_changed(self, weight: torch.Tensor) -> bool:
        return weight._version != self.versions[0]

    def watching(self, watched: Sequence[torch.Tensor],
                 unchanged: Sequence[bool] = (True, True, True)) -> _MergeRecord:
        """This record with the watched tensors' versions now, taken as unchanged (marked changed where
        `unchanged` says not)."""
        versions = tuple(t._version if same else _CHANGED for t, same in zip(watched, unchanged))
        return dataclasses.replace(self, versions=versions)

    def for_copy(self, watched: Sequence[torch.Tensor]) -> _MergeRecord:
        """The record a merged layer's copy takes over (LoRALinear.__getstate__): the tensors changed since the
        merge marked _CHANGED."""
        return self.watching(watched, self.unchanged(watched))

    def in_copy(self, watched: Sequence[torch.Tensor]) -> _MergeRecord:
        """`for_copy`'s record in the copy (LoRALinear.__setstate__), watching the copy's own tensors."""
        return self.watching(watched, tuple(then != _CHANGED for then in self.versions))


class MergeState(NamedTuple):
    """A layer's merge as `LoRALinear.merge_state()` gives it, for another copy of the model to take over."""

    adapter: str  # the merged adapter's name
    requires_grad: tuple[bool, bool]  # its A's and B's flags before the merge
    unchanged: tuple[bool, bool, bool]  # whether the weight, A and B are unchanged since the merge


def check_rank_alpha(rank, alpha) -> tuple[int, float]:
    """`rank` and `alpha` checked, as Python numbers: they go into the scale and the saved set-up (JSON, which
    refuses a NumPy number)."""
    # numbers, not just int and float: a NumPy integer or float32 (a swept hyperparameter) is a rank or alpha
    if not is_integer(rank) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha == 0:
        raise ValueError(f"LoRA alpha must be a finite number other than 0 (0 makes every adapter a no-op that "
                         f"learns nothing), got {alpha!r}")
    return int(rank), float(alpha)


class LoRALinear(nn.Module):
    """A frozen linear layer (its `weight` kept as is) plus named low-rank adapters."""

    def __init__(self, base: nn.Linear, names: Iterable[str], rank: int, alpha: float, generator=None):
        super().__init__()
        if base.bias is not None:
            raise ValueError("LoRALinear wraps bias-free linear layers (LLaMA has none)")
        if parametrize.is_parametrized(base):  # its weight is computed: the parameter behind it would not be frozen
            raise ValueError("LoRALinear wraps plain weights, and this layer's is parametrized: remove the "
                             "parametrization first (torch.nn.utils.parametrize.remove_parametrizations)")
        rank, alpha = check_rank_alpha(rank, alpha)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.adapters: dict[str, Adapter] = {}  # also registered as submodules, named as the adapters
        # set before the adapters, whose names must not take these attributes' ("active" replaced by None)
        self.active: str | None = None
        self.base_asked = False  # within lora.active(model, None): the base model on purpose
        self.merged: str | None = None
        self._merge_record: _MergeRecord | None = None
        self._loading = None  # set by _load_from_state_dict for _record_loaded_merge
        self.register_load_state_dict_post_hook(_record_loaded_merge)
        for name in names:
            self.add_adapter(name, generator)
        self.weight.requires_grad_(False)  # after the names were taken: a refused one leaves the base as it was

    def add_adapter(self, name: str, generator=None) -> None:
        if (not isinstance(name, str) or not name.isidentifier() or hasattr(self, name)
                or name in (MERGE_MARK, MERGE_SCALE)):
            raise ValueError(f"adapter name {name!r} is taken or not an identifier")
        adapter = Adapter(self.in_features, self.out_features, self.rank, adapter_dtype(self.weight.dtype),
                          self.weight.device, generator)
        self.add_module(name, adapter)  # state-dict names <layer>.<name>.lora_A.weight
        self.adapters[name] = adapter

    def forward(self, x: torch.Tensor, adapter: str | Segments | None = None) -> torch.Tensor:
        """x·Wᵀ plus the update of `adapter` (a name, or token segments; None: the layer's `active` one).

        While an adapter is merged into W, the layer runs with it: asking for another adapter (alone or in a
        segment) or for the base (`lora.active(model, None)`, a segment's adapter None) is an error, since W no
        longer is the base weight.
        """
        base_asked = adapter is None and self.active is None and self.base_asked
        if adapter is None:
            adapter = self.active
        elif isinstance(adapter, str):
            self._check_names([adapter])
        else:
            self._check_segments(adapter, x.shape)
        out = F.linear(x, self.weight)
        if self.merged is not None:
            self._check_merged_unchanged()
            segments = not (adapter is None or isinstance(adapter, str))
            asked = {name for _, _, name in adapter} if segments else {adapter}
            others = sorted(str(name) for name in asked - {None, self.merged})
            wanted = [f"adapter(s) {', '.join(others)}"] if others else []
            if base_asked or (segments and None in asked):  # (None alone, not asked for: the merged model)
                wanted.append("the base model (lora.active(model, None), or a segment's adapter None)")
            if wanted:
                raise ValueError(f"adapter {self.merged!r} is merged into the weight; unmerge() it before running "
                                 f"{' and '.join(wanted)}")
            return out
        if adapter is None:
            return out
        xa = self._adapter_input(x)
        if isinstance(adapter, str):
            return out + (self.scale * self.adapters[adapter](xa)).to(out.dtype)
        return out + (self.scale * self._segment_update(xa, adapter)).to(out.dtype)

    def _check_names(self, names) -> None:
        unknown = sorted({name for name in names if name is not None and name not in self.adapters})
        if unknown:
            raise ValueError(f"no adapter named {', '.join(map(repr, unknown))} (this layer's adapters: "
                             f"{', '.join(self.adapters)})")

    def _check_segments(self, segments: Segments, shape: torch.Size) -> None:
        """Segments must tile the tokens [0, length) of x's dimension -2 in order: a gap would silently run tokens
        without their adapter, an overlap with two. Python ints only, so no device sync."""
        if not isinstance(segments, (list, tuple)) or not all(
                isinstance(segment, (list, tuple)) and len(segment) == 3 for segment in segments):
            raise ValueError(f"adapter must be an adapter's name, None, or a list of (start, end, adapter) token "
                             f"segments; got {segments!r}")
        if len(shape) < 2:
            raise ValueError(f"token segments need an input with a token dimension ([..., tokens, "
                             f"{self.in_features}]), got one of shape {list(shape)}: pass an adapter's name instead")
        length = shape[-2]
        starts, ends = [start for start, _, _ in segments], [end for _, end, _ in segments]
        # (a float bound would pass the tiling check, 2.0 == 2, and fail slicing; a SymInt is a traced shape's)
        if not all(is_integer(bound) or isinstance(bound, torch.SymInt) for bound in starts + ends):
            raise ValueError(f"token segments {[tuple(s) for s in segments]} need integer bounds (Python ints), "
                             "not floats, bools or tensors")
        if starts != [0, *ends[:-1]] or any(end < start for start, end in zip(starts, ends)) or \
                (ends[-1] if ends else 0) != length:
            raise ValueError(f"token segments {[tuple(s) for s in segments]} do not tile the sequence of {length} "
                             f"tokens: give (start, end, adapter) segments in order, each starting where the previous "
                             f"ends, from 0 to {length}")
        self._check_names([name for _, _, name in segments])

    def _adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """x in the adapters' dtype (fp32 adapters of a bf16 model), unless autocast chooses the dtype."""
        dtype = next(iter(self.adapters.values())).lora_A.weight.dtype
        return x if x.dtype == dtype or torch.is_autocast_enabled(x.device.type) else x.to(dtype)

    def _segment_update(self, x: torch.Tensor, segments: Segments) -> torch.Tensor:
        """Each token's low-rank update from its segment's adapter, as two matmuls over all tokens: the
        adapters' A stacked [k·r, in], their B side by side [out, k·r], and a 0/1 mask that keeps, for each
        token, only its own adapter's r columns. Slicing the tokens instead would cost a full-size gradient
        buffer per segment in the backward."""
        names = list(dict.fromkeys(name for _, _, name in segments if name is not None))
        if not names:
            return torch.zeros_like(x[..., :1]).expand(*x.shape[:-1], self.out_features)
        a = torch.cat([self.adapters[n].lora_A.weight for n in names])
        b = torch.cat([self.adapters[n].lora_B.weight for n in names], dim=1)
        keep = x.new_zeros((x.shape[-2], len(names) * self.rank))
        for start, end, name in segments:
            if name is not None:
                column = names.index(name) * self.rank
                keep[start:end, column:column + self.rank] = 1
        return F.linear(F.linear(x, a) * keep, b)

    def _apply(self, fn, recurse=True):
        """`model.to(torch.bfloat16)`, `.half()`: the base weight is cast, the adapters stay in `adapter_dtype`
        of it (fp32 for a half-precision weight)."""
        factors = [(linear, "weight") for adapter in self.adapters.values()
                   for linear in (adapter.lora_A, adapter.lora_B)]
        merged_unchanged = self.merged is not None and self._merge_record.versions_match(self._watched())
        with dtype_kept(factors, lambda: adapter_dtype(self.weight.dtype)):
            super()._apply(fn, recurse)
        if merged_unchanged:  # the conversion is not a change to the merged values
            self._merge_record = self._merge_record.watching(self._watched())
        return self

    def _factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        adapter = self.adapters[name]
        return adapter.lora_A.weight, adapter.lora_B.weight

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}, adapters={list(self.adapters)}"

    # --------------------------------------------------------------- merging an adapter into the weight

    @torch.no_grad()
    def merge(self, name: str) -> None:
        """Fold adapter `name` into the base weight (for serving a single adapter); unmerge() undoes it. Both
        compute in fp32 or wider, autocast or not, and round once into the weight's dtype: exact to fp32 rounding
        for an fp32 weight, but a bf16 or fp16 weight is rounded each way, so each merge/unmerge cycle moves some
        of its entries by a unit in the last place, and cycles add up (reload the base to get it back exactly).
        While merged, the adapter is frozen (its update is in the weight, so it would get no gradient); unmerge()
        subtracts what merge() added and restores its flags. A merged adapter or weight changed in place makes the
        next eager forward an error, but not a torch.compile'd one (see _check_merged_unchanged): unmerge() before
        changing either."""
        if name not in self.adapters:
            raise ValueError(f"adapter {name!r} does not exist (adapters: {list(self.adapters)})")
        if self.merged is not None:
            raise ValueError(f"adapter {self.merged!r} is merged already; unmerge it first")
        params = self._factors(name)
        flags = tuple(p.requires_grad for p in params)
        self._add_to_weight(tuple(p.detach() for p in params), +1)
        for p in params:
            p.requires_grad_(False)
        self._record_merge(name, params, flags)

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged is None:
            raise ValueError("no adapter is merged")
        record = self._merge_record
        if record.weight_changed(self.weight):  # subtracting the update merged would not give back the base
            raise ValueError(self._weight_changed_message())
        self._add_to_weight(record.factors, -1)  # the values merged, even if the adapter changed since
        for p, flag in zip(self._factors(self.merged), record.requires_grad):
            p.requires_grad_(flag)
        self.merged, self._merge_record = None, None
        delattr(self, MERGE_MARK)
        delattr(self, MERGE_SCALE)

    def merged_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The A and B whose update merge() added to the weight (unmerge() subtracts them)."""
        if self.merged is None:
            raise ValueError("no adapter is merged")
        return self._merge_record.factors

    def merge_stale(self) -> str | None:
        """Why the merged weight no longer stands for the merged adapter (changed in place since the merge), or
        None where it does or nothing is merged."""
        if self.merged is None or self._merge_record.versions_match(self._watched()):
            return None
        if self._merge_record.weight_changed(self.weight):
            return self._weight_changed_message()
        return (f"adapter {self.merged!r} was changed after it was merged into the weight, which still holds its "
                "old values: unmerge() and merge() it again")

    def _check_merged_unchanged(self) -> None:
        """The merged weight holds the adapter's values at merge(): refuse to run once either was changed in
        place (loaded, or an optimizer step), which would silently run other values than the adapter's.
        Not under torch.compile: a tensor's version counter is data a graph cannot guard on, and reading it outside
        the graph would break the graph at every layer, so a compiled merged model runs the values merged even after
        an in-place change (nor is a change through `.data` seen, eager or compiled)."""
        if torch.compiler.is_compiling():
            return
        stale = self.merge_stale()
        if stale:
            raise ValueError(stale)

    def _weight_changed_message(self) -> str:
        return (f"the weight, with adapter {self.merged!r} merged into it, was changed in place after the merge "
                "(loaded without its adapter, or stepped), so which update it holds is unknown: unmerge() would "
                "not give back the base weight. Load the weight together with the adapter (a merged model's whole "
                "state_dict: the merge is recorded from the loaded adapter), or build the model again from its "
                "base weights and adapters")

    def _add_to_weight(self, factors: tuple[torch.Tensor, torch.Tensor], sign: int) -> None:
        """weight ± scale·B·A, in fp32 or wider and rounded once. Outside autocast: under it the product would be
        bf16, and an unmerge() outside autocast would not subtract what a merge() inside it added."""
        a, b = factors
        acc = torch.promote_types(self.weight.dtype, torch.float32)
        with torch.autocast(self.weight.device.type, enabled=False):
            delta = b.to(self.weight.device, acc) @ a.to(self.weight.device, acc) * (sign * self.scale)
            self.weight.copy_(self.weight.to(acc) + delta)

    def _record_merge(self, name: str, factors: tuple[torch.Tensor, torch.Tensor], flags: tuple[bool, bool]) -> None:
        """Adapter `name`, whose A and B are `factors` (copied here) and whose requires_grad flags before the merge
        were `flags`, is merged into the weight as it is now: its record, its mark, the versions to watch."""
        # normal tensors even where merge() runs under torch.inference_mode(): a later load_state_dict copies into
        # the mark, which an inference tensor refuses outside inference mode
        with torch.inference_mode(False):
            self._merge_record = _MergeRecord(tuple(f.detach().clone() for f in factors), flags, (_CHANGED,) * 3)
            self.register_buffer(MERGE_MARK, _mark(name, self.weight.device))
            self.register_buffer(MERGE_SCALE, _mark(repr(float(self.scale)), self.weight.device))
        self.merged = name
        self._merge_record = self._merge_record.watching(self._watched())  # after the weight's own change

    def _watched(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The tensors whose values the merge record stands for: the weight and the merged adapter's A and B."""
        return (self.weight, *self._factors(self.merged))

    @staticmethod
    def _watched_keys(name: str) -> tuple[str, str, str]:
        return ("weight", f"{name}.lora_A.weight", f"{name}.lora_B.weight")

    def merge_state(self) -> MergeState | None:
        """This layer's merge, for another copy of the model to take over (`take_merge_state`); None where
        unmerged."""
        if self.merged is None:
            return None
        record = self._merge_record
        return MergeState(self.merged, record.requires_grad, record.unchanged(self._watched()))

    def take_merge_state(self, state: MergeState, factors: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """After this merged layer's weight and adapter were overwritten in place with those of a copy whose
        `merge_state()` was `state` (DDP's start-up broadcast of rank 0's values): the merge recorded as that
        copy's, unchanged where it was, changed (refused) where it was. `factors`: the copy's `merged_factors()`;
        None where it was unchanged, whose adapter holds them (the adapter's values now, as copied)."""
        if state.adapter != self.merged:
            raise ValueError(f"the merge of adapter {state.adapter!r} cannot be taken over by a layer with adapter "
                             f"{self.merged!r} merged")
        if factors is None:
            if not all(state.unchanged):
                raise ValueError("a merge changed since it was made needs its recorded factors (merged_factors())")
            factors = self._factors(state.adapter)
        record = _MergeRecord(tuple(f.detach().clone() for f in factors), state.requires_grad, (_CHANGED,) * 3)
        self._merge_record = record.watching(self._watched(), state.unchanged)

    # --------------------------------------------------------------- copies and loads of a merged layer

    # A copy (copy.deepcopy, pickle) starts its tensors' version counters afresh: the original marks those of
    # its watched tensors that changed since the merge (_CHANGED, never a version), the copy re-records the
    # others, so the copy runs as the original does (and refuses as it would).
    def __getstate__(self):
        state = super().__getstate__()
        if self.merged is not None:
            state["_merge_record"] = self._merge_record.for_copy(self._watched())
        return state

    def __setstate__(self, state):
        super().__setstate__(state)
        if self.merged is not None:
            self._merge_record = self._merge_record.in_copy(self._watched())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The merge mark says what the loaded weight holds. Loaded with the merged adapter (a merged model's
        # state_dict), the weight is taken as holding the loaded adapter's update, by a layer merged with the same
        # adapter or by an unmerged one (which becomes merged): noted here, recorded by _record_loaded_merge once
        # the adapter (a child module) is loaded too. A weight without the mark is a base weight.
        self._loading = None
        mark = state_dict.get(prefix + MERGE_MARK)
        merged = None if mark is None else _marked_name(mark)
        got = (f"a {mark.dtype} tensor of shape {list(mark.shape)}" if isinstance(mark, torch.Tensor)
               else f"a {type(mark).__name__}")
        problem = (f"{prefix}{MERGE_MARK} is not a merge mark (the merged adapter's name as a 1-D uint8 tensor of "
                   f"its UTF-8 bytes), got {got}" if mark is not None and merged is None
                   else self._scale_problem(merged, state_dict.get(prefix + MERGE_SCALE), prefix)
                   or self._load_problem(merged, lambda key: prefix + key in state_dict))
        if problem:  # nothing of this layer's own is loaded (its adapters are children: they are)
            where = f"LoRA layer {prefix[:-1]}" if prefix else "the LoRA layer"
            error_msgs.append(f"{where}: {problem}")
            return
        if merged is not None and all(prefix + key in state_dict for key in self._watched_keys(merged)):
            self._loading = (merged, [(t, t._version) for t in (self.weight, *self._factors(merged))])
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for key in (MERGE_MARK, MERGE_SCALE):
            if prefix + key in unexpected_keys:  # an unmerged layer has no mark buffers (yet)
                unexpected_keys.remove(prefix + key)
        if merged is not None and prefix + MERGE_SCALE in missing_keys:  # a mark written before the scale was
            missing_keys.remove(prefix + MERGE_SCALE)

    def _scale_problem(self, merged: str | None, scale, prefix: str) -> str | None:
        """Why this layer refuses a merged weight's recorded scale (None where it has none: a mark written before
        the scale), or None: the update was merged at another scale than this layer's, whose unmerge() would
        subtract its own and give another base."""
        if scale is None or merged is None:  # a scale left without its mark (the marks filtered out) says nothing
            return None
        value = _marked_scale(scale)
        if value is None:
            got = (f"a {scale.dtype} tensor of shape {list(scale.shape)}" if isinstance(scale, torch.Tensor)
                   else f"a {type(scale).__name__}")
            return (f"{prefix}{MERGE_SCALE} is not a merge scale (the scale's decimal text as a 1-D uint8 tensor), "
                    f"got {got}")
        if value != float(self.scale):
            return (f"the state_dict has adapter {merged!r} merged into the weight at scale {value:g} (alpha / "
                    f"rank), this layer's scale is {float(self.scale):g} (alpha {self.alpha:g}, rank {self.rank}): "
                    "unmerge() would give another base; add the adapters with the rank and alpha of the model it was "
                    "saved from")
        return None

    def _load_problem(self, merged: str | None, holds: Callable[[str], bool]) -> str | None:
        """Why this layer refuses a state_dict that `holds` its keys (named without the layer's prefix) and whose
        weight has adapter `merged` merged into it (None: no merge mark), or None."""
        if self.merged is not None and merged is None and holds("weight"):
            return (f"the state_dict holds its weight without a merge mark ({MERGE_MARK}): it is an unmerged "
                    f"model's (or was written by kpro before the mark, or by hand), whose weight is the base, but "
                    f"adapter {self.merged!r} is merged into this layer. unmerge() it before loading (`for layer in "
                    "kpro.lora.lora_layers(model): layer.unmerge()`), or load a merged model's state_dict")
        if merged is None:
            return None
        if self.merged is not None and merged != self.merged:
            return (f"the state_dict has adapter {merged!r} merged into the weight, this layer adapter "
                    f"{self.merged!r}: unmerge() this layer's adapter before loading (the load then merges "
                    f"{merged!r}), or load a state_dict merged with {self.merged!r}")
        if merged not in self.adapters:
            return (f"the state_dict has adapter {merged!r} merged into the weight, and this layer has no adapter "
                    f"{merged!r} (its adapters: {', '.join(self.adapters)}): add the adapters of the model it was "
                    "saved from before loading")
        lacking = [key for key in self._watched_keys(merged) if not holds(key)]
        if self.merged is None and lacking:
            return (f"the state_dict has adapter {merged!r} merged into the weight but lacks {', '.join(lacking)}: "
                    "the layer becomes merged only by loading its weight together with that adapter")
        return None


def _record_loaded_merge(layer: LoRALinear, incompatible_keys) -> None:
    """After a load of a merged state_dict that held the layer's weight and merged adapter (see
    LoRALinear._load_from_state_dict): where all three were loaded (copied into, or replaced under
    assign=True), record the merge from the loaded adapter (an unmerged layer becomes merged with it), so the
    forward runs the loaded model and unmerge() gives its base. A load that failed part way leaves the layer as
    it was: a merged one's forward then refuses."""
    loading, layer._loading = layer._loading, None
    if loading is None:
        return
    name, before = loading
    factors = layer._factors(name)
    if not all(now is not then or now._version != version
               for (then, version), now in zip(before, (layer.weight, *factors))):
        return
    # an unmerged layer becomes merged, its adapter's flags kept for unmerge() as merge() keeps them
    flags = tuple(p.requires_grad for p in factors) if layer.merged is None else layer._merge_record.requires_grad
    for p in factors:
        p.requires_grad_(False)  # merged (assign=True gives new parameters)
    layer._record_merge(name, factors, flags)


def add_adapters(model: nn.Module, names: Sequence[str], rank: int = 8, alpha: float = 1.0,
                 targets: Sequence[str] = PROJECTIONS, seed: int | None = None) -> list[str]:
    """Replace every nn.Linear named in `targets` inside `model.layers` (each must be bias-free) by a LoRALinear
    with adapters `names`; freeze the whole model except the adapters. Returns the wrapped module paths."""
    for what, value in (("names", names), ("targets", targets)):
        if isinstance(value, str):  # a string is a sequence of its letters: "lora" gave adapters l, o, r, a
            raise TypeError(f"add_adapters takes a list of {what}, got the string {value!r}: pass [{value!r}]")
    names = list(names)  # once: a generator would give the first layer every name and the others none
    if not names:
        raise ValueError("add_adapters needs at least one adapter name")
    bad = [name for name in names if not isinstance(name, str) or not name.isidentifier()]
    repeated = sorted({name for name in names if names.count(name) > 1}, key=str)
    if bad or repeated:  # checked before any layer is wrapped or frozen
        raise ValueError(f"adapter names must be distinct Python identifiers; got {names!r}")
    if lora_layers(model):
        present = list(dict.fromkeys(name for layer in lora_layers(model) for name in layer.adapters))
        raise ValueError(f"the model has LoRA adapters already ({', '.join(present)}): add_adapters adapts a plain "
                         "model once; load the model again to start over, or add one more adapter to every layer "
                         "with `for layer in kpro.lora.lora_layers(model): layer.add_adapter(name)`")
    if getattr(model, "block_runners", None) is not None:
        raise ValueError("the model is in train_only mode (frozen-block gradient skipping): call "
                         "kpro.train_only(model, None) before adding adapters")
    found = [(path, module, child_name, child) for path, module in list(model.named_modules())
             for child_name, child in list(module.named_children())
             if child_name in targets and isinstance(child, nn.Linear) and ".layers." in f".{path}."]
    if not found:
        raise ValueError(f"no linear layer named {list(targets)} was found under model.layers")
    unmatched = [target for target in targets if all(child_name != target for _, _, child_name, _ in found)]
    if unmatched:  # a misspelt target would otherwise leave its layers untrained without a word
        raise ValueError(f"targets {unmatched} match no linear layer under model.layers (matched: "
                         f"{sorted({child_name for _, _, child_name, _ in found})})")
    biased = [f"{path}.{child_name}" for path, _, child_name, child in found if child.bias is not None]
    if biased:  # checked before any layer is wrapped or frozen
        raise ValueError(f"{len(biased)} target linear layer(s) have a bias (first: {biased[0]}); LoRA wraps bias-free "
                         "ones only (LLaMA has none): give targets without a bias")
    parametrized = [f"{path}.{child_name}" for path, _, child_name, child in found if parametrize.is_parametrized(child)]
    if parametrized:  # LoRALinear would take (and fail to freeze) the computed weight, not the parameter behind it
        raise ValueError(f"{len(parametrized)} target linear layer(s) have a parametrized weight (first: "
                         f"{parametrized[0]}); LoRA wraps plain weights only: remove the parametrization first "
                         "(torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight') keeps its current "
                         "value), or give targets without one")
    if seed is not None and not (is_integer(seed) and 0 <= seed < 2 ** 63):  # the CLI's range (-1 wrapped to 2**64 - 1)
        raise ValueError(f"seed must be an integer from 0 to 2**63 - 1 (or None: the global RNG), got {seed!r}")
    generator = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    wrapped, flags = [], {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        for path, module, child_name, child in found:
            setattr(module, child_name, LoRALinear(child, names, rank, alpha, generator))
            wrapped.append(f"{path}.{child_name}")
    except BaseException:  # (out of memory, say) the layers wrapped so far put back: a retry can adapt the model
        for _, module, child_name, child in found[:len(wrapped)]:
            setattr(module, child_name, child)
        for name, param in model.named_parameters():
            param.requires_grad_(flags[name])
        raise
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_A." in name or ".lora_B." in name)
    return wrapped


@contextlib.contextmanager
def adapters_undone_on_error(model: nn.Module, keep: Callable[[], bool] = lambda: False):
    """For a loader that adds adapters to the caller's model and then loads them: if the block raises, every
    LoRA layer it added is replaced by the plain linear layer it wrapped and every parameter's requires_grad
    is restored, so the model is left as it was and a corrected retry can adapt it again. Unless `keep()` is
    true by then (tune: a step has trained the adapters)."""
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    before = set(map(id, lora_layers(model)))
    try:
        yield
    except BaseException:
        if keep():
            raise
        for path, module in list(model.named_modules()):
            for child_name, child in list(module.named_children()):
                if isinstance(child, LoRALinear) and id(child) not in before:
                    plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                    plain.weight = child.weight
                    setattr(module, child_name, plain)
        for name, param in model.named_parameters():
            param.requires_grad_(flags.get(name, param.requires_grad))
        raise


class AdaptedModel(nn.Module):
    """A model whose every forward runs with one adapter active: plain LoRA fine-tuning, as a module a
    trainer can wrap, checkpoint and call like the model itself."""

    def __init__(self, model: nn.Module, adapter: str):
        super().__init__()
        if not any(adapter in layer.adapters for layer in lora_layers(model)):
            raise ValueError(f"the model has no adapter {adapter!r}; add it with add_adapters first")
        self.model, self.adapter = model, adapter

    def forward(self, *args, **kwargs):
        with active(self.model, self.adapter):
            return self.model(*args, **kwargs)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside an AdaptedModel (whose config, positions and embeddings are its own), or the model itself."""
    return model.model if isinstance(model, AdaptedModel) else model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def refuse_idle_adapters(model: nn.Module, what: str, takes_wrappers: bool = True) -> None:
    """Refuse to evaluate a model whose LoRA layers run no adapter (none active, none merged) unless its base
    was asked for (`lora.active(model, None)`): it computes its base, though the natural call passes the model
    that add_adapters or tune adapted in place. `takes_wrappers`: `what` accepts a Bitune or an AdaptedModel
    (generate takes a Llama alone, so its advice is the context manager)."""
    layers = lora_layers(model)
    if layers and all(layer.active is None and layer.merged is None and not layer.base_asked for layer in layers):
        names = list(dict.fromkeys(name for layer in layers for name in layer.adapters))
        if takes_wrappers:
            advice = ("pass what tune returned (a Bitune, or kpro.lora.AdaptedModel(model, name)); to evaluate the "
                      "base, evaluate it under `with kpro.lora.active(model, None):`")
        else:
            advice = (f"call it under `with kpro.lora.active(model, {names[0]!r}):` (a Bitune decodes with its own "
                      "bt.generate(prompts, ...)); for the base, under `with kpro.lora.active(model, None):`")
        raise ValueError(f"{what}: the model has LoRA adapters ({', '.join(names)}) and none is active or merged, "
                         f"so it would run as its base model: {advice}")


@contextlib.contextmanager
def active(model: nn.Module, name: str | None):
    """Run plain forwards of `model` with adapter `name` (None: the base model only, which a layer with an
    adapter merged refuses to run). Every LoRA layer must have `name`: the layers are checked before any is
    switched, so a refused name leaves the model as it was."""
    layers = lora_layers(model)
    if name is not None and not layers:
        raise ValueError(f"adapter {name!r} asked for, but the model has no LoRA layers: add them with add_adapters")
    if name is not None:
        lacking = [layer for layer in layers if name not in layer.adapters]
        if lacking:
            first = next(path for path, module in model.named_modules() if module is lacking[0])
            raise ValueError(f"adapter {name!r} does not exist in {len(lacking)} of the {len(layers)} LoRA layers "
                             f"(first: {first}, whose adapters are {list(lacking[0].adapters)})")
    previous = [(layer.active, layer.base_asked) for layer in layers]
    for layer in layers:
        layer.active, layer.base_asked = name, name is None  # the base, asked for: evaluations take it
    try:
        yield
    finally:
        for layer, (name_before, base_before) in zip(layers, previous):
            layer.active, layer.base_asked = name_before, base_before
