"""Triton kernels for TempMe's merge ops (imported as ``tempme_kernels``).

This package holds Triton code only: no knowledge of models, configs or autograd. The host
launchers and autograd functions that call these kernels live in ``tempme_fast.ops``.
"""
