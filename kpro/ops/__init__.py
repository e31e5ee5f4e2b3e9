"""kpro.ops: the differentiable math every kpro model calls, each op with up to three implementations
(plain PyTorch, Triton, CUDA C++) behind one entry point. See `kpro.ops.backend` for how one is chosen.
"""
from .attention import attention, check_attention_mask
from .bitune_attention import bitune_attention
from .backend import BackendError, backend, requested_backend
from .linear_cross_entropy import linear_cross_entropy
from .rms_norm import rms_norm
from .swiglu import swiglu, swiglu_packed

__all__ = ["BackendError", "attention", "bitune_attention", "backend", "check_attention_mask", "linear_cross_entropy",
           "requested_backend", "rms_norm", "swiglu", "swiglu_packed"]
