"""Hugging Face DeepSeek-V3 checkpoints <-> dsv3_jax parameters (SPEC.md sections 1-3 and 5), and
the CLI `python -m dsv3_jax.convert {hf-to-orbax, orbax-to-hf}` (`__main__.py`).

    cfg, params = load_hf_checkpoint("DeepSeek-V3/", jnp.bfloat16, mesh=mesh, keep_fp8=False)
    save_hf_checkpoint("out/", cfg, params, max_shard_bytes=..., fp8=True)

  hf_config.py    config.json <-> ModelConfig
  layout.py       the tensor names and orientations: one plan for load and save
  load.py         the checkpoint folder read, checked and placed on devices
  save.py         params written as a checkpoint folder
  safetensors.py  the file format, read by memory map and written streaming
"""

from dsv3_jax.convert.hf_config import HFCheckpointError, config_from_hf, config_to_hf
from dsv3_jax.convert.layout import INDEX_FILE
from dsv3_jax.convert.load import load_hf_checkpoint
from dsv3_jax.convert.save import DEFAULT_MAX_SHARD_BYTES, quantize_fp8, save_hf_checkpoint

__all__ = ["DEFAULT_MAX_SHARD_BYTES", "HFCheckpointError", "INDEX_FILE", "config_from_hf",
           "config_to_hf", "load_hf_checkpoint", "quantize_fp8", "save_hf_checkpoint"]
