"""kpro.ops: the differentiable math every kpro model calls.

Each op has one entry point; the model never calls torch.nn.functional directly for these.
"""
from .attention import attention
from .rms_norm import rms_norm
from .swiglu import swiglu

__all__ = ["attention", "rms_norm", "swiglu"]
