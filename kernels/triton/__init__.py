"""Triton kernels for NVIDIA GPUs; ``backend.TritonKernels`` puts them behind the kernel interface.

One module per kernel (attention_decode, attention_extend, kv_write, norm, rotary, activation,
sampling), ``ops`` the model ops with the reference's signatures; ``compile_check`` compiles
them all for sm_90 / sm_80 without a GPU. Nothing is imported here: importing a kernel module
decorates its kernels, and whether that makes GPU kernels or interpreted ones depends on
TRITON_INTERPRET at that moment.
"""
