"""Pallas kernels, one file per kernel (each opens with its tutorial and names its jnp reference).

  fp8_gemm_sm90.py   FP8 block-scaled GEMM for Hopper (Mosaic GPU); reference ops.fp8.fp8_gemm_reference
  mla_attention_sm90.py  causal flash attention for MLA training / prefill (Mosaic GPU);
                     reference ops.attention.mla_attention_reference
  mla_decode_sm90.py     flash-decoding over the latent cache (Mosaic GPU);
                     reference ops.attention.mla_decode_reference
  grouped_matmul_sm90.py  MoE grouped matmul gmm / tgmm for Hopper; references in ops.grouped_matmul
  splash_attention_tpu.py  jax's splash attention (Mosaic TPU) under the MLA training / prefill
                     contract, its block sizes from one table; reference
                     ops.attention.mla_attention_reference
  mla_decode_tpu.py  split-KV decoding over the latent cache (Mosaic TPU); reference
                     ops.attention.mla_decode_reference
  hopper.py          their shared parts; a kernel imports it, jax and numpy only (never another
                     kernel, never its dispatcher in dsv3_jax.ops: tests/test_ops_structure.py)

Nothing here is imported by default: `dsv3_jax.ops` picks a kernel per platform and imports it when
it is used, so CPU and TPU runs never load Mosaic GPU (nor CPU and GPU runs Mosaic TPU).
"""
