"""Cross-entropy fused with the output projection: the loss of `hidden @ weight.T` against `labels`, with
the logits [N, V] never in memory.

`linear_cross_entropy(hidden, weight, labels)` equals `F.cross_entropy((hidden @ weight.T).float(), labels)`
with the log-sum-exp and everything after the matmul in fp32 (float64 for float64 inputs). It is registered
as torch.library custom ops, in two pairs. Where a gradient is wanted (gradients_in_forward), one op returns
the loss (per row, or summed) with the gradients of the summed loss, computed from the same logits, and its
backward op only scales them by the incoming dloss. Otherwise (and for a trainable head's per-row losses)
the forward op returns each row's loss (fp32 [N]) and its softmax statistics (fp32 [N, 2]: the row's
largest logit m and log s, s = Σ exp(logit - m)), the reduction is ordinary autograd on the loss vector,
and the backward op recomputes the logits for each row's dloss.

Large logits: every path subtracts m from the logits before anything else is subtracted, as
F.cross_entropy does: loss = log s - (logit_label - m) and softmax = exp((logit - m) - log s), or
exp(logit - m) / s. The log-sum-exp m + log s is never formed: rounded to fp32 at the logits' size
(half an ulp of 1e4 is 5e-4) it put that error into every loss and scaled the whole softmax by a common
factor, which a head's large rows turned into gradient errors a thousand times plain fp32's. Eager calls run the same
kernel functions through GradientsInForwardFunction and LinearCrossEntropyFunction instead, without the
custom ops' dispatch (backend.eager_fast_path).

What each backend keeps in memory:
- torch (the reference and the CPU default): the scored rows in chunks of CHUNK_BYTES of logits, [chunk, V]
  at a time. Where a gradient is wanted it is computed in the forward from the same logits, turned into
  dlogits in place (dH = dlogits @ W, dW += dlogitsᵀ @ H, for a loss summed with dloss = 1), and the backward
  only scales it: dH row by row by its dloss (any reduction), dW by the one dloss of a sum or mean. One
  matmul of the logits' size fewer than recomputing them; the backward keeps the [N, d] gradient (and the
  [V, d] one) in the accumulation dtype instead of hidden and the weight. A trainable head's per-row losses
  (reduction="none") cannot be done so, since dW weighs each row by its own dloss: there the backward
  recomputes each chunk's logits. Half-precision inputs are computed from an fp32 copy of the weight.
- triton: gradients in the forward as above, per chunk of rows: cuBLAS logits in fp32, a Triton program per
  row for the loss and dlogits, cuBLAS for dH and dW. Without a gradient the forward computes logits tile by
  tile on chip with an online log-sum-exp (nothing of [N, V] is written); where it recomputes, the backward
  rebuilds the tiles and writes dlogits of one slice of the vocabulary at a time (at most SLICE_BYTES) for
  two matmuls (triton_kernels/linear_cross_entropy.py).

Only rows whose label is not `ignore_index` are computed, forward and backward: an ignored row costs
nothing. dW is computed only when the weight requires grad: a frozen head (LLaMA Pro blocks, LoRA, Bitune)
gets no dW buffer and no dW matmul.
"""
from __future__ import annotations

import numbers
from types import SimpleNamespace

import torch

from .backend import (autocast_inputs, autocast_note, check_tensors, eager_fast_path, kernels, needs_graph, no_autocast,
                      once_differentiable, refuse_function_transforms, select, values_readable)
from .errors import BackendError
from .rms_norm import accumulation_dtype

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum", "none")
CHUNK_BYTES = 32 * 2**20  # torch backend: logits of one chunk of rows, [chunk, V] in the accumulation dtype


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *,
                         ignore_index: int = IGNORE_INDEX, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the logits `hidden @ weight.T` against `labels`, without the logits in memory.

    hidden  [N, d] or [B, T, d] (any leading shape), already aligned with `labels` (shift them first for a
            next-token loss)
    weight  [V, d], the output head (`lm_head.weight`, or the tied embedding)
    labels  integer [N] or [B, T] (hidden's leading shape), in [0, V) or `ignore_index` (no loss)
    reduction  "mean" over the scored rows (none is an error: a mean over nothing), "sum" (0 for none),
            or "none" (a loss per row, labels' shape, 0 where ignored)

    The result is fp32 (float64 for float64 inputs) whatever the input dtype. Under autocast, hidden and
    weight are cast to the autocast dtype first, as `F.linear` would be. A label outside [0, V) is an
    error on CPU tensors and gives a NaN loss elsewhere, with NaN gradients (never finite ones).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {', '.join(REDUCTIONS)}, got {reduction!r}")
    check_tensors("linear_cross_entropy", hidden=hidden, weight=weight, labels=labels)
    hidden, weight = autocast_inputs(hidden, weight)  # as a linear layer would be
    _check_args(hidden, weight, labels, ignore_index)
    refuse_function_transforms("linear_cross_entropy", hidden, weight)
    rows, targets = hidden.reshape(-1, hidden.shape[-1]), labels.reshape(-1).long()
    backend, ignore_index = select("linear_cross_entropy", hidden), int(ignore_index)
    hidden_grad, weight_grad = needs_graph(rows), needs_graph(weight)
    eager = eager_fast_path(rows, weight, targets)  # the same kernels without the custom ops' dispatch
    if gradients_in_forward(hidden_grad, weight_grad, reduction):
        flags = (reduction == "none", hidden_grad, weight_grad)  # per row, or the sum whose dloss is one
        if eager:
            out = GradientsInForwardFunction.apply(rows, weight, targets, ignore_index, backend, *flags)
        else:
            out = torch.ops.kpro.linear_cross_entropy_with_grads(rows, weight, targets, ignore_index, backend,
                                                                 *flags)[0]
        losses = total = out
    elif eager:
        if not (hidden_grad or weight_grad):
            losses = _run_forward(rows, weight, targets, ignore_index, backend)[0]
        else:
            losses = LinearCrossEntropyFunction.apply(rows, weight, targets, ignore_index, backend)
        total = None
    else:
        losses = torch.ops.kpro.linear_cross_entropy_forward(rows, weight, targets, ignore_index, backend)[0]
        total = None
    if reduction == "none":
        return losses.view(labels.shape)
    total = losses.sum() if total is None else total
    if reduction == "sum":
        return total
    count = (targets != ignore_index).sum()
    nothing = ("linear_cross_entropy: a mean over no tokens: "
               + (f"every one of the {targets.numel()} labels is ignore_index={ignore_index}" if targets.numel() else
                  "the batch holds no rows")
               + " (use reduction='sum' where a batch may have none)")
    if not values_readable(count):  # compiling, or fake or meta tensors: the error comes at the next device sync
        torch._assert_async(count > 0, nothing)
    elif int(count) == 0:
        raise ValueError(nothing)
    return total / count


def _check_args(hidden, weight, labels, ignore_index):
    # An int, as F.cross_entropy takes it: -100.5 was truncated to -100 for the kernels while the mean's count
    # compared the labels with -100.5 (every -100 label counted, none scored: a wrong mean, silently).
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral) or \
            not -2**63 <= ignore_index < 2**63:  # compared with int64 labels
        raise ValueError(f"linear_cross_entropy: ignore_index must be an int64 integer, got {ignore_index!r}")
    if hidden.dim() < 1 or weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or 0 in weight.shape:
        raise ValueError(f"linear_cross_entropy: weight must be [V >= 1, d >= 1] with d = hidden's last dimension; "
                         f"got hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"linear_cross_entropy: labels must be integers, got {labels.dtype}")
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(f"linear_cross_entropy: hidden and weight must share one floating-point dtype, got "
                         f"{hidden.dtype} and {weight.dtype}{autocast_note(hidden)}")
    if not (hidden.device == weight.device == labels.device):
        raise ValueError(f"linear_cross_entropy: hidden, weight and labels are on {hidden.device}, {weight.device} "
                         f"and {labels.device}")
    if labels.device.type == "cpu" and labels.numel():
        labels = labels.long()  # compared as the kernels read them: uint8's 156 is not -100
        bad = (labels != ignore_index) & ((labels < 0) | (labels >= weight.shape[0]))
        if not values_readable(bad):  # compiling, or fake tensors: the error comes at the next device sync
            torch._assert_async(~bad.any(), f"linear_cross_entropy: a label is outside [0, V={weight.shape[0]}) "
                                            f"and is not ignore_index={ignore_index}")
        elif bool(bad.any()):
            raise ValueError(f"linear_cross_entropy: label {int(labels[bad][0])} is outside [0, V={weight.shape[0]}) "
                             f"and is not ignore_index={ignore_index}")


# ------------------------------------------------------------------------------------ torch backend

def scored_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor | None:
    """Indices of the rows that take a loss, or None when every row does (no gather needed). One device
    sync (nonzero), the op's only one outside a mean's count."""
    index = (labels != ignore_index).nonzero().squeeze(1)
    return None if index.numel() == labels.numel() else index


def chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    return max(1, CHUNK_BYTES // (vocab * torch.empty((), dtype=dtype).element_size()))


def _chunks(n_rows: int, index: torch.Tensor | None, size: int):
    """(index of the chunk's rows, or a slice when every row is scored) for each chunk of scored rows."""
    count = n_rows if index is None else index.numel()
    for start in range(0, count, size):
        stop = min(start + size, count)
        yield slice(start, stop) if index is None else index[start:stop]


def nan_unless(valid: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[rows, 1]: 1 where the row's label is in [0, V), NaN elsewhere (unchecked labels: a GPU's, or under
    compile), to make a NaN loss's gradients NaN too."""
    return torch.where(valid, 1.0, torch.nan).to(dtype)[:, None]


def torch_forward(hidden, weight, labels, ignore_index):
    acc = accumulation_dtype(hidden.dtype)
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    w = weight.to(acc)  # no copy for fp32 / float64 weights
    loss = torch.zeros(n_rows, dtype=acc, device=hidden.device)
    stats = torch.zeros(n_rows, 2, dtype=acc, device=hidden.device)  # (m, log s) a row, for the backward
    index = scored_rows(labels, ignore_index)
    for rows in _chunks(n_rows, index, chunk_rows(vocab, acc)):
        logits = hidden[rows].to(acc) @ w.T  # [chunk, V], the only large buffer
        target = labels[rows]
        valid = (target >= 0) & (target < vocab)
        picked = logits.gather(1, target.clamp(0, vocab - 1)[:, None]).squeeze(1)
        top = logits.amax(1)
        log_total = logits.sub_(top[:, None]).exp_().sum(1).log_()
        stats[rows] = torch.stack((top, log_total), 1)
        loss[rows] = torch.where(valid, log_total - (picked - top), torch.nan)
        del logits  # before the next chunk's: one [chunk, V] buffer at a time
    return loss, stats


def torch_backward(dloss, hidden, weight, labels, stats, ignore_index, hidden_grad: bool, weight_grad: bool):
    acc = accumulation_dtype(hidden.dtype)
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    w = weight.to(acc)
    dh = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if hidden_grad else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if weight_grad else None
    index = scored_rows(labels, ignore_index)
    for rows in _chunks(n_rows, index, chunk_rows(vocab, acc)):
        h = hidden[rows].to(acc)
        target = labels[rows]
        top, log_total = stats[rows].unbind(1)
        grad = torch.mm(h, w.T).sub_(top[:, None]).sub_(log_total[:, None]).exp_()  # softmax, recomputed in place
        grad[torch.arange(grad.shape[0], device=grad.device), target.clamp(0, vocab - 1)] -= 1  # dlogits / dloss
        # applied to [chunk, d] operands, not to the [chunk, V] one; NaN where the loss is
        scale = dloss[rows, None].to(acc) * nan_unless((target >= 0) & (target < vocab), acc)
        if hidden_grad:
            dh[rows] = (grad @ w).mul_(scale).to(hidden.dtype)
        if weight_grad:
            dw.addmm_(grad.T, h * scale)
        del grad
    return dh, None if dw is None else dw.to(weight.dtype)


def torch_forward_with_grads(hidden, weight, labels, ignore_index, hidden_grad: bool, weight_grad: bool):
    """The forward and the gradients of the summed loss (dloss = 1 on every scored row) from the same
    logits, chunk by chunk: (loss [N], dh [N, d], dw [V, d]), the gradients in the accumulation
    dtype, zero on ignored rows, and None where not asked for. Two matmuls of the logits' size per chunk
    with a frozen head (logits, dh), three with a trainable one, against one more for forward + backward:
    the backward only scales these (dh by each row's dloss, dw by a sum's or mean's one dloss)."""
    acc = accumulation_dtype(hidden.dtype)
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    w = weight.to(acc)
    loss = torch.zeros(n_rows, dtype=acc, device=hidden.device)
    dh = torch.zeros(hidden.shape, dtype=acc, device=hidden.device) if hidden_grad else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if weight_grad else None
    index = scored_rows(labels, ignore_index)
    for rows in _chunks(n_rows, index, chunk_rows(vocab, acc)):
        h = hidden[rows].to(acc)
        logits = h @ w.T  # [chunk, V], the only large buffer: the logits, then the softmax, then dlogits
        target = labels[rows]
        valid = (target >= 0) & (target < vocab)
        clamped = target.clamp(0, vocab - 1)
        picked = logits.gather(1, clamped[:, None]).squeeze(1)
        top = logits.amax(1)
        total = logits.sub_(top[:, None]).exp_().sum(1)  # the forward's sum, op for op
        loss[rows] = torch.where(valid, total.log() - (picked - top), torch.nan)
        grad = logits.div_(total[:, None])  # softmax
        grad[torch.arange(grad.shape[0], device=grad.device), clamped] -= 1  # dlogits / dloss
        validity = nan_unless(valid, acc)  # NaN gradients where the loss is NaN, not the clamped label's
        if hidden_grad:
            dh[rows] = (grad @ w).mul_(validity)
        if weight_grad:
            dw.addmm_(grad.T, h * validity)
        del logits, grad
    return loss, dh, dw


def scale_gradients(dloss, dh, dw, labels, ignore_index, per_row: bool, hidden_dtype, weight_dtype):
    """The backward of forward_with_grads, for every backend: (dhidden, dweight), each None where its unit
    gradient is. Per row, dh's rows times their dloss (0 on ignored rows, whatever their dloss: they were
    never computed); for a sum, both times the one dloss (dw exists only then: it is a sum over rows)."""
    if per_row:
        scale = dloss.masked_fill(labels == ignore_index, 0)[:, None]
        return (dh * scale).to(hidden_dtype), None
    return (None if dh is None else (dh * dloss).to(hidden_dtype),
            None if dw is None else (dw * dloss).to(weight_dtype))


TORCH_KERNELS = SimpleNamespace(forward=torch_forward, backward=torch_backward,
                                forward_with_grads=torch_forward_with_grads)


def _kernels(backend: str):
    """The backend's functions: forward(hidden, weight, labels, ignore_index) -> (loss [N], stats [N, 2]: each
    row's (m, log s)), backward(dloss, hidden, weight, labels, stats, ignore_index, hidden_grad, weight_grad)
    -> (dh, dw) and
    forward_with_grads(hidden, weight, labels, ignore_index, hidden_grad, weight_grad) -> (loss, dh, dw)."""
    return kernels("linear_cross_entropy", backend, TORCH_KERNELS)


def gradients_in_forward(hidden_grad: bool, weight_grad: bool, reduction: str) -> bool:
    """Whether a call computes its gradients in the forward (forward_with_grads): wherever a gradient is
    wanted, except a trainable head's with reduction="none", whose dW weighs each row by a dloss the forward
    cannot know (that case recomputes the logits in the backward)."""
    return (hidden_grad or weight_grad) and not (weight_grad and reduction == "none")


# ------------------------------------------------------------------------------ custom op registration

def _run_forward(hidden, weight, labels, ignore_index, backend):
    """The forward of both paths, the custom op and LinearCrossEntropyFunction: (loss, stats)."""
    with no_autocast(hidden):  # the entry point already applied autocast
        return _kernels(backend).forward(hidden, weight, labels, ignore_index)


def _run_backward(dloss, hidden, weight, labels, stats, ignore_index, hidden_grad, weight_grad, backend):
    """The backward of both paths: (dhidden, dweight), each None when not asked for. dloss may be a stride-0
    expansion (the gradient of a sum or mean): the kernels take it contiguous."""
    with no_autocast(hidden):
        return _kernels(backend).backward(dloss.contiguous(), hidden, weight, labels, stats, ignore_index, hidden_grad,
                                          weight_grad)


@torch.library.custom_op("kpro::linear_cross_entropy_forward", mutates_args=())
def linear_cross_entropy_forward(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int,
                                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss [N], stats [N, 2]: each row's largest logit m and log of its sum of exp(logit - m)), in the
    accumulation dtype; both 0 on ignored rows. hidden [N, d], labels [N]."""
    return _run_forward(hidden, weight, labels, ignore_index, backend)


@linear_cross_entropy_forward.register_fake
def _(hidden, weight, labels, ignore_index, backend):
    acc = accumulation_dtype(hidden.dtype)
    return hidden.new_empty(hidden.shape[0], dtype=acc), hidden.new_empty(hidden.shape[0], 2, dtype=acc)


@torch.library.custom_op("kpro::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward(dloss: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                  stats: torch.Tensor, ignore_index: int, hidden_grad: bool, weight_grad: bool,
                                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(dhidden, dweight); each an empty tensor when not asked for."""
    dh, dw = _run_backward(dloss, hidden, weight, labels, stats, ignore_index, hidden_grad, weight_grad, backend)
    return (dh if dh is not None else hidden.new_empty(0)), (dw if dw is not None else weight.new_empty(0))


@linear_cross_entropy_backward.register_fake
def _(dloss, hidden, weight, labels, stats, ignore_index, hidden_grad, weight_grad, backend):
    return (hidden.new_empty(hidden.shape) if hidden_grad else hidden.new_empty(0),
            weight.new_empty(weight.shape) if weight_grad else weight.new_empty(0))


def _setup_context(ctx, inputs, output):
    hidden, weight, labels, ignore_index, backend = inputs
    ctx.save_for_backward(hidden, weight, labels, output[1])
    ctx.ignore_index, ctx.backend = ignore_index, backend


def _backward(ctx, dloss, _dstats):
    hidden, weight, labels, stats = ctx.saved_tensors
    hidden_grad, weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dh, dw = torch.ops.kpro.linear_cross_entropy_backward(dloss, hidden, weight, labels, stats, ctx.ignore_index,
                                                          hidden_grad, weight_grad, ctx.backend)
    return (dh if hidden_grad else None), (dw if weight_grad else None), None, None, None


linear_cross_entropy_forward.register_autograd(_backward, setup_context=_setup_context)


# The gradients computed in the forward (gradients_in_forward): one op computes the loss (per row, or its sum)
# with the unit gradients, a second scales them by the incoming dloss. The second is an op of its own, with
# no autograd formula, so that a double backward raises as the recomputing path's does.

@torch.library.custom_op("kpro::linear_cross_entropy_with_grads", mutates_args=())
def linear_cross_entropy_with_grads(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                    ignore_index: int, backend: str, per_row: bool, hidden_grad: bool,
                                    weight_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(loss, dh, dw): the loss per row [N] (per_row) or summed (0-dim), and the gradients of the summed
    loss in the accumulation dtype, dh [N, d] and dw [V, d], each an empty tensor when not asked for."""
    return _run_forward_with_grads(hidden, weight, labels, ignore_index, backend, per_row, hidden_grad, weight_grad)


@linear_cross_entropy_with_grads.register_fake
def _(hidden, weight, labels, ignore_index, backend, per_row, hidden_grad, weight_grad):
    acc = accumulation_dtype(hidden.dtype)
    return (hidden.new_empty(hidden.shape[0] if per_row else (), dtype=acc),
            hidden.new_empty(hidden.shape if hidden_grad else 0, dtype=acc),
            weight.new_empty(weight.shape if weight_grad else 0, dtype=acc))


@torch.library.custom_op("kpro::linear_cross_entropy_scale_grads", mutates_args=())
def linear_cross_entropy_scale_grads(dloss: torch.Tensor, dh: torch.Tensor, dw: torch.Tensor, labels: torch.Tensor,
                                     ignore_index: int, per_row: bool, hidden_dtype: torch.dtype,
                                     weight_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(dhidden, dweight) from the unit gradients (scale_gradients); each empty where its unit one is."""
    dhidden, dweight = _run_scale_gradients(dloss, dh, dw, labels, ignore_index, per_row, hidden_dtype, weight_dtype)
    return (dhidden if dhidden is not None else dh.new_empty(0, dtype=hidden_dtype),
            dweight if dweight is not None else dw.new_empty(0, dtype=weight_dtype))


@linear_cross_entropy_scale_grads.register_fake
def _(dloss, dh, dw, labels, ignore_index, per_row, hidden_dtype, weight_dtype):
    return dh.new_empty(dh.shape, dtype=hidden_dtype), dw.new_empty(dw.shape, dtype=weight_dtype)


def _run_forward_with_grads(hidden, weight, labels, ignore_index, backend, per_row, hidden_grad, weight_grad):
    """The forward of both paths, the custom op and GradientsInForwardFunction: (loss, dh, dw), the gradients
    an empty tensor where not asked for (what both paths save)."""
    if weight_grad and per_row:  # dW of a per-row loss needs each row's dloss: gradients_in_forward excludes it
        raise ValueError("linear_cross_entropy: a trainable head's gradient in the forward needs a summed loss")
    with no_autocast(hidden):
        loss, dh, dw = _kernels(backend).forward_with_grads(hidden, weight, labels, ignore_index, hidden_grad,
                                                            weight_grad)
    return ((loss if per_row else loss.sum()), (dh if dh is not None else hidden.new_empty(0)),
            (dw if dw is not None else weight.new_empty(0)))


def _run_scale_gradients(dloss, dh, dw, labels, ignore_index, per_row, hidden_dtype, weight_dtype):
    """The backward of both paths: (dhidden, dweight), None where the forward computed no gradient."""
    return scale_gradients(dloss, dh if dh.dim() == 2 else None, dw if dw.dim() == 2 else None, labels, ignore_index,
                           per_row, hidden_dtype, weight_dtype)


def _setup_context_with_grads(ctx, inputs, output):
    hidden, weight, labels, ignore_index, backend, per_row, hidden_grad, weight_grad = inputs
    ctx.save_for_backward(output[1], output[2], labels)
    ctx.ignore_index, ctx.per_row, ctx.dtypes = ignore_index, per_row, (hidden.dtype, weight.dtype)


def _refuse_create_graph(ctx) -> None:
    """A backward with create_graph=True through the gradients computed in the forward: they were computed
    without a graph and are not linked to hidden or the weight, so no error node could reach a second
    derivative taken with respect to them (autograd.grad(dh.norm(), x)): it would silently leave the loss's
    term out. Refused at once instead, where the other paths raise when the gradient is differentiated."""
    if torch.is_grad_enabled() and (ctx.needs_input_grad[0] or ctx.needs_input_grad[1]):
        raise BackendError("kpro's ops have no double backward: linear_cross_entropy computes its gradients in the "
                           "forward, which a backward with create_graph=True cannot differentiate (the second "
                           "derivative would leave the loss's term out); take this gradient without create_graph")


def _backward_with_grads(ctx, dloss, _ddh, _ddw):
    _refuse_create_graph(ctx)
    dh, dw, labels = ctx.saved_tensors
    dhidden, dweight = torch.ops.kpro.linear_cross_entropy_scale_grads(dloss, dh, dw, labels, ctx.ignore_index,
                                                                       ctx.per_row, *ctx.dtypes)
    return ((dhidden if ctx.needs_input_grad[0] else None), (dweight if ctx.needs_input_grad[1] else None),
            None, None, None, None, None, None)


linear_cross_entropy_with_grads.register_autograd(_backward_with_grads, setup_context=_setup_context_with_grads)


class GradientsInForwardFunction(torch.autograd.Function):
    """The eager path of linear_cross_entropy_with_grads: the same kernels and saved tensors (the unit
    gradients and the labels), returning the loss alone."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, backend, per_row, hidden_grad, weight_grad):
        loss, dh, dw = _run_forward_with_grads(hidden, weight, labels, ignore_index, backend, per_row, hidden_grad,
                                               weight_grad)
        ctx.save_for_backward(dh, dw, labels)
        ctx.ignore_index, ctx.per_row, ctx.dtypes = ignore_index, per_row, (hidden.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, dloss):
        _refuse_create_graph(ctx)
        dh, dw, labels = ctx.saved_tensors
        dhidden, dweight = _run_scale_gradients(dloss, dh, dw, labels, ctx.ignore_index, ctx.per_row, *ctx.dtypes)
        return ((dhidden if ctx.needs_input_grad[0] else None), (dweight if ctx.needs_input_grad[1] else None),
                None, None, None, None, None, None)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """The eager path: the custom ops' kernels and saved tensors (hidden, weight, labels, stats) without their
    dispatch (backend.eager_fast_path). It returns the per-row losses only: stats is saved, not an output. Its
    backward is once differentiable, as the custom op's (no autograd formula for its backward op)."""

    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, backend):
        loss, stats = _run_forward(hidden, weight, labels, ignore_index, backend)
        ctx.save_for_backward(hidden, weight, labels, stats)
        ctx.ignore_index, ctx.backend = ignore_index, backend
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, dloss):
        hidden, weight, labels, stats = ctx.saved_tensors
        hidden_grad, weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh, dw = _run_backward(dloss, hidden, weight, labels, stats, ctx.ignore_index, hidden_grad, weight_grad,
                               ctx.backend)
        return (dh if hidden_grad else None), (dw if weight_grad else None), None, None, None
