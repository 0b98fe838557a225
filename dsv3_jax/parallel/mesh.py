"""The one table mapping logical axis names to mesh axes.

Parameters name their dimensions with the logical axes below (`dsv3_jax/model/layers.py`
`param_with_axes`); block-boundary activations use the `activation_*` names. Mesh axes:
`data` (pure data parallel), `fsdp` (data parallel with sharded weights), `expert` (expert
parallel), `tensor` (heads and hidden dims). A logical axis mapped to None is replicated.
"""

from __future__ import annotations

MESH_AXES = ("data", "fsdp", "expert", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations [B, T, D]
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    # parameters
    ("layers", None),  # the scanned layer axis
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("q_lora", None),
    ("kv_lora", None),
    ("heads", "tensor"),  # heads x head_dim, flattened
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("moe_mlp", "tensor"),
    ("mtp_concat", None),  # eh_proj's input, [embedding | hidden]
)
