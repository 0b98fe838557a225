"""dsv3_jax: DeepSeek-V3 in JAX/Flax.

The public API (DESIGN.md); nothing else is public:

    import dsv3_jax as ds
    cfg = ds.get_model_config("tiny")
    model = ds.DeepSeekV3(cfg)
    params = model.init(jax.random.key(0), tokens)["params"]
    logits = model.apply({"params": params}, tokens)
    logits, mtp_logits = model.apply({"params": params}, tokens, return_mtp=True)
    st = ds.model_stats(cfg, seq_len=4096)
    out = ds.generate(cfg, params, prompts, max_new_tokens=32, temperature=0.0, speculative=False)
    cfg, params = ds.load_hf_checkpoint(path, dtype=jnp.float32)
    ds.save_hf_checkpoint(path, cfg, params)
"""

from dsv3_jax.config import ConfigError, ModelConfig, get_model_config
from dsv3_jax.convert import HFCheckpointError, load_hf_checkpoint, save_hf_checkpoint
from dsv3_jax.infer.generate import generate
from dsv3_jax.model.stats import ModelStats, model_stats
from dsv3_jax.model.transformer import DeepSeekV3, ModelOutput

__all__ = [
    "ConfigError",
    "DeepSeekV3",
    "HFCheckpointError",
    "ModelConfig",
    "ModelOutput",
    "ModelStats",
    "generate",
    "get_model_config",
    "load_hf_checkpoint",
    "model_stats",
    "save_hf_checkpoint",
]
