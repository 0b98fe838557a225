"""The one table mapping logical axis names to mesh axes.

Parameters name their dimensions with the logical axes below (`dsv3_jax/model/layers.py`
`param_with_axes`); block-boundary activations use the `activation_*` names. Mesh axes:
`data` (pure data parallel), `fsdp` (data parallel with sharded weights), `expert` (expert
parallel), `tensor` (heads and hidden dims). A logical axis mapped to None is replicated. Within one
parameter a mesh axis is used once: rules are tried in table order, and a rule whose mesh axes a
dim of that parameter already holds is skipped (so a later rule for the same name is a fallback).
"""

from __future__ import annotations

import numpy as np

MESH_AXES = ("data", "fsdp", "expert", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations [B, T, D]
    ("activation_batch", ("data", "fsdp", "expert")),
    ("activation_length", None),
    ("activation_embed", None),
    # parameters
    ("layers", None),  # the scanned layer axis
    ("vocab", "tensor"),
    ("exp", "expert"),  # before the rules below: they must not take `expert` from expert weights
    # FSDP: non-expert weights are split over fsdp x expert (the expert axis holds other tokens,
    # so it can hold other weight shards too); expert weights, whose expert dim takes `expert`,
    # fall back to fsdp alone.
    ("embed", ("fsdp", "expert")),
    ("embed", "fsdp"),
    ("q_lora", "fsdp"),  # the low-rank dims take fsdp where the model dim has not (wq_b, wkv_b)
    ("kv_lora", "fsdp"),
    ("heads", ("tensor", "expert")),  # heads x head_dim, flattened: tensor parallel, + FSDP
    ("heads", "tensor"),
    ("mlp", "tensor"),
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
    known = int(np.prod([v for v in sizes.values() if v != -1]))
    if fill:
        if n_devices % known:
            raise ValueError(f"config.mesh: the fixed axes use {known} devices, which does not "
                             f"divide the {n_devices} available; change {sizes}.")
        sizes[fill[0]] = n_devices // known
    elif known != n_devices:
        raise ValueError(f"config.mesh {sizes} spans {known} devices but {n_devices} are "
                         "available; make the sizes multiply to that, or set one axis to -1.")
    return sizes


def mesh_axes(logical: str) -> tuple[str, ...]:
    """The mesh axes of `logical`'s first rule (() when replicated): where a dim of that name goes
    unless the parameter's other dims already hold those axes."""
    for name, axes in LOGICAL_AXIS_RULES:
        if name == logical:
            return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    raise KeyError(f"no rule for the logical axis {logical!r}")


def batch_ways(sizes) -> int:
    """How many ways a batch is split on a mesh of these axis sizes (a dict or `mesh.shape`)."""
    return int(np.prod([sizes[a] for a in mesh_axes("activation_batch")]))


def parse_mesh_sizes(text: str) -> dict[str, int]:
    """'expert=64,fsdp=-1' -> {data: 1, fsdp: -1, expert: 64, tensor: 1} (unnamed axes 1); a
    part that is not axis=size (a MESH_AXES name, a positive int or -1) raises ValueError."""
    sizes = dict.fromkeys(MESH_AXES, 1)
    for part in text.split(","):
        name, _, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if name not in sizes or not (value.isdigit() or value == "-1") or int(value) == 0:
            raise ValueError(f"--mesh: {part!r} is not axis=size with axis in {list(sizes)} "
                             "and size a positive int or -1, e.g. --mesh=expert=64,fsdp=-1.")
        sizes[name] = int(value)
    return sizes


def check_mesh_fits(sizes: dict[str, int], cfg, global_batch: int,
                    grad_accum_steps: int = 1) -> None:
    """Refuses a mesh the model or the batch cannot be split over, naming the axis and the fix.
    Each dim is split over the mesh axes the rules table gives its logical name; each of the
    `grad_accum_steps` microbatches of the global batch is split over the batch axes."""
    needs = [
        ("exp", cfg.n_routed_experts, "ModelConfig.n_routed_experts"),
        ("embed", cfg.dim, "ModelConfig.dim"),
        ("heads", cfg.n_heads * cfg.v_head_dim, "n_heads x v_head_dim"),
        ("kv_lora", cfg.kv_lora_rank, "ModelConfig.kv_lora_rank"),
        ("q_lora", cfg.q_lora_rank, "ModelConfig.q_lora_rank"),
        (mesh_axes("heads")[:1], cfg.n_heads, "ModelConfig.n_heads"),  # attention splits heads
        ("mlp", cfg.inter_dim, "ModelConfig.inter_dim"),
        ("moe_mlp", cfg.moe_inter_dim, "ModelConfig.moe_inter_dim"),
        ("vocab", cfg.vocab_size, "ModelConfig.vocab_size"),
    ]
    for axes, value, what in needs:
        axes = mesh_axes(axes) if isinstance(axes, str) else axes
        ways = int(np.prod([sizes[a] for a in axes]))
        if value and value % ways:
            named = " x ".join(f"config.mesh.{a}={sizes[a]}" for a in axes)
            raise ValueError(f"{named} does not divide {what}={value}, which is split over "
                             f"{'those axes' if len(axes) > 1 else 'that axis'}; choose sizes "
                             f"whose product divides {value}.")
    ways = batch_ways(sizes)
    if global_batch % ways:
        raise ValueError(f"config.data.batch_size={global_batch} is not divisible by "
                         f"{' x '.join(mesh_axes('activation_batch'))} = {ways}, the devices the "
                         f"batch is split over; use a multiple of {ways}.")
    if global_batch % (ways * grad_accum_steps):
        raise ValueError(f"config.data.batch_size={global_batch} does not split into "
                         f"config.train.grad_accum_steps={grad_accum_steps} microbatches over "
                         f"the {ways} devices of the batch axes; use a multiple of "
                         f"{ways * grad_accum_steps} or another grad_accum_steps.")


def make_mesh(mesh_cfg, devices=None):
    """A jax Mesh over `devices` (default: all) with axes MESH_AXES."""
    import jax

    devices = jax.devices() if devices is None else devices
    sizes = mesh_shape(mesh_cfg, len(devices))
    grid = np.asarray(devices).reshape([sizes[a] for a in MESH_AXES])
    return jax.sharding.Mesh(grid, MESH_AXES)


def batch_sharding(mesh):
    """Batches [B, T] split over the data-like axes, replicated over expert and tensor."""
    import jax

    spec = jax.sharding.PartitionSpec(mesh_axes("activation_batch"), None)
    return jax.sharding.NamedSharding(mesh, spec)


def abstract_with_shardings(init_boxed, mesh=None):
    """(abstract tree, placement) of what `init_boxed()` builds (a pytree with logically
    partitioned leaves: a model's init, a TrainState), without allocating it. The placement is each
    leaf's PartitionSpec of mesh axes from LOGICAL_AXIS_RULES; with a `mesh`, its NamedSharding,
    which the abstract leaves (ShapeDtypeStruct) then carry."""
    import flax.linen as nn
    import jax

    boxed = jax.eval_shape(init_boxed)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    place = jax.tree.map(lambda s: nn.logical_to_mesh_axes(s, LOGICAL_AXIS_RULES),
                         nn.get_partition_spec(boxed), is_leaf=is_spec)
    abstract = nn.unbox(boxed)
    if mesh is not None:
        place = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), place, is_leaf=is_spec)
        abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                                abstract, place)
    return abstract, place
