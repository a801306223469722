"""Triton kernels of drorebel, installed as ``drorebel.kernels``.

Only ``@triton.jit`` kernels and their launchers live here; autograd wiring is in
``drorebel.ops``. Nothing here imports torch-level APIs beyond tensors and streams.
"""
