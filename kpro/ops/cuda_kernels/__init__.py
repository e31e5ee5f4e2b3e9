"""Bindings of the CUDA C++ kernels in csrc/, loaded with ctypes (see library.py)."""
