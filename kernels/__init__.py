"""Triton kernels, installed as ``lightning_fpq.kernels``.

One op a file: the ``@triton.jit`` kernel and its host wrapper. Nothing here imports
Lightning; modules outside import only the wrappers.
"""
