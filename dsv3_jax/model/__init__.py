"""DeepSeek-V3 as Flax Linen modules: MLA, DeepSeekMoE, MTP. Letters: dsv3_jax/NOTATION.md."""
