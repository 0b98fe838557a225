"""The one table mapping logical axis names to mesh axes.

Parameters name their dimensions with the logical axes below (`dsv3_jax/model/layers.py`
`param_with_axes`); block-boundary activations use the `activation_*` names. Mesh axes:
`data` (pure data parallel), `fsdp` (data parallel with sharded weights), `expert` (expert
parallel), `tensor` (heads and hidden dims). A logical axis mapped to None is replicated. Within one
parameter a mesh axis is used once: the first of its dims to claim it (in order) gets it.
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
    ("q_lora", "fsdp"),  # the low-rank dims take fsdp where the model dim has not (wq_b, wkv_b)
    ("kv_lora", "fsdp"),
    ("heads", "tensor"),  # heads x head_dim, flattened
    ("mlp", "tensor"),
    ("exp", "expert"),
    ("moe_mlp", "tensor"),
    ("mtp_concat", None),  # eh_proj's input, [embedding | hidden]
)


def mesh_shape(mesh_cfg, n_devices: int) -> dict[str, int]:
    """Sizes of (data, fsdp, expert, tensor) from a config with one entry per axis; -1 (at most one)
    takes the devices the others leave. Refuses shapes that do not multiply to `n_devices`."""
    sizes = {}
    for axis in MESH_AXES:
        value = mesh_cfg.get(axis, 1) if hasattr(mesh_cfg, "get") else getattr(mesh_cfg, axis)
        if not isinstance(value, int) or (value < 1 and value != -1):
            raise ValueError(f"config.mesh.{axis}={value!r} is invalid: use a positive device "
                             "count, or -1 for the devices the other axes leave.")
        sizes[axis] = value
    fill = [a for a, v in sizes.items() if v == -1]
    if len(fill) > 1:
        raise ValueError(f"config.mesh: only one axis may be -1, got {fill}; give the others sizes.")
    known = 1
    for a, v in sizes.items():
        if v != -1:
            known *= v
    if fill:
        if n_devices % known:
            raise ValueError(f"config.mesh: the fixed axes use {known} devices, which does not "
                             f"divide the {n_devices} available; change {sizes}.")
        sizes[fill[0]] = n_devices // known
    elif known != n_devices:
        raise ValueError(f"config.mesh {sizes} spans {known} devices but {n_devices} are "
                         "available; make the sizes multiply to that, or set one axis to -1.")
    return sizes


def check_mesh_fits(sizes: dict[str, int], cfg, global_batch: int) -> None:
    """Refuses a mesh the model or the batch cannot be split over, naming the axis and the fix.

    The batch is split over data x fsdp x expert; experts over expert; the model dim of the
    weights (or their low-rank dims) over fsdp; heads, FFN and expert hidden dims and the
    vocabulary over tensor.
    """
    batch_ways = sizes["data"] * sizes["fsdp"] * sizes["expert"]
    needs = [
        ("expert", cfg.n_routed_experts, "ModelConfig.n_routed_experts"),
        ("fsdp", cfg.dim, "ModelConfig.dim"),
        ("fsdp", cfg.kv_lora_rank, "ModelConfig.kv_lora_rank"),
        ("fsdp", cfg.q_lora_rank or sizes["fsdp"], "ModelConfig.q_lora_rank"),
        ("tensor", cfg.n_heads, "ModelConfig.n_heads"),
        ("tensor", cfg.inter_dim, "ModelConfig.inter_dim"),
        ("tensor", cfg.moe_inter_dim, "ModelConfig.moe_inter_dim"),
        ("tensor", cfg.vocab_size, "ModelConfig.vocab_size"),
    ]
    for axis, value, what in needs:
        if value % sizes[axis]:
            raise ValueError(f"config.mesh.{axis}={sizes[axis]} does not divide {what}={value}, "
                             f"which is split over that axis; use a {axis} size dividing {value}.")
    if global_batch % batch_ways:
        raise ValueError(f"config.data.batch_size={global_batch} is not divisible by data x fsdp "
                         f"x expert = {batch_ways}, the devices the batch is split over; use a "
                         f"multiple of {batch_ways}.")


def make_mesh(mesh_cfg, devices=None):
    """A jax Mesh over `devices` (default: all) with axes MESH_AXES."""
    import jax
    import numpy as np

    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_cfg, len(devices))
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return jax.sharding.Mesh(grid, MESH_AXES)


def batch_sharding(mesh):
    """Batches [B, T] split over the data-like axes, replicated over expert and tensor."""
    import jax

    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp", "expert"), None))
