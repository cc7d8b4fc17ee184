"""Low-bit GEMM kernels (CUDA, Triton) and their slow reference implementations (reference.py).

Modules here import Triton lazily: on a machine without CUDA only reference.py is usable.
"""
