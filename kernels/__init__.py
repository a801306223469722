"""Triton kernels of drorebel, installed as ``drorebel.kernels``.

Only ``@triton.jit`` kernels, their launchers and what those share live here; autograd wiring
is in ``drorebel.ops``. Modules here import nothing from drorebel outside this package, and
this ``__init__`` imports nothing, so ``drorebel.kernels.accum`` (pure torch) can be used
without triton. Shared pieces: ``tiles`` (``@triton.jit`` building blocks of the kernels),
``common`` (launcher utilities: config builder and pruning, dot flags, interpreter checks),
``accum`` (the fp32 GEMM accumulation of the chunked passes), ``softmax_cache`` (pure torch:
the cached-softmax backward of the ops' ``softmax_cache`` option).
"""
