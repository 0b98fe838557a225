"""Checkpoint conversion: Hugging Face safetensors <-> dsv3_jax parameters, and the CLI
`python -m dsv3_jax.convert {hf-to-orbax, orbax-to-hf}` (see `dsv3_jax/convert/__main__.py`).

  cfg, params = load_hf_checkpoint(path, jnp.float32, mesh=None, keep_fp8=False)
  save_hf_checkpoint(path, cfg, params, max_shard_bytes=..., fp8=False)
"""

from dsv3_jax.convert.hf import (HFCheckpointError, config_from_hf, config_to_hf, dequantize_fp8,
                                 load_hf_checkpoint, quantize_fp8, save_hf_checkpoint)

__all__ = ["HFCheckpointError", "config_from_hf", "config_to_hf", "dequantize_fp8",
           "load_hf_checkpoint", "quantize_fp8", "save_hf_checkpoint"]
