"""Triton kernels. Imported on first use: `triton.jit` reads TRITON_INTERPRET when a kernel is defined."""
