"""Pallas kernels, one file per kernel (each opens with its tutorial and names its jnp reference).

  fp8_gemm_sm90.py   FP8 block-scaled GEMM for Hopper (Mosaic GPU); reference ops.fp8.fp8_gemm_reference

Nothing here is imported by default: `dsv3_jax.ops` picks a kernel per platform and imports it when
it is used, so CPU and TPU runs never load Mosaic GPU.
"""
