"""SwiGLU through csrc/swiglu.cu (separate and packed layouts share the strided kernels)."""
from .._layout import swiglu_functions
from .library import call, dtype_code, stream


def _forward_rows(g, u, y):
    call("kpro_swiglu_forward", dtype_code(g), g.data_ptr(), u.data_ptr(), y.data_ptr(), g.shape[0], g.shape[1],
         g.stride(0), u.stride(0), y.stride(0), stream(g))


def _backward_rows(dy, g, u, dg, du):
    call("kpro_swiglu_backward", dtype_code(g), dy.data_ptr(), g.data_ptr(), u.data_ptr(), dg.data_ptr(),
         du.data_ptr(), g.shape[0], g.shape[1], dy.stride(0), g.stride(0), u.stride(0), dg.stride(0), du.stride(0),
         stream(g))


_functions = swiglu_functions(_forward_rows, _backward_rows)
forward, backward = _functions.forward, _functions.backward
packed_forward, packed_backward = _functions.packed_forward, _functions.packed_backward
