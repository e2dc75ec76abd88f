"""Tensor-level quantization kernels: pure-PyTorch references and Triton kernels with the same signatures.

Kernels know nothing of schemes or files: they map a 2-D tensor to codes and scales and back.
"""
