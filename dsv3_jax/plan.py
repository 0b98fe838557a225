"""python -m dsv3_jax.plan --config=configs/deepseek_v3_671b.py --devices=256 --mesh=expert=64,fsdp=-1

Per-device memory of a training run on a mesh, from abstract evaluation only (no array is
allocated, no device of that count is needed):
- params and optimizer state: every leaf of the TrainState's shape, split as the logical-axis
  rules place it on the mesh (`dsv3_jax/parallel/mesh.py`), summed per device;
- activations: what the backward pass keeps from the forward pass (jax's saved residuals, with
  the config's remat policy) for one device's share of the batch, traced on a per-device model
  whose heads, FFN, expert hidden and vocabulary dims are divided by the tensor axis (what tensor
  parallelism leaves on a device). Weights the backward reads are counted with the params, not
  again here. Not included: transient workspace inside one layer, XLA's buffers for collectives,
  and the expert-parallel dispatch buffers (the padded all_to_all holds expert-axis x the pairs).
"""

from __future__ import annotations

import dataclasses
import math

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from dsv3_jax import cli
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.train.run_config import check_run_config, model_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).",
                                          lock_config=True)
_DEVICES = flags.DEFINE_list("devices", ["256", "2048"], "Device counts to plan for.")
_MESH = flags.DEFINE_string("mesh", "", "Mesh sizes, e.g. 'expert=64,fsdp=-1' (others 1); "
                            "empty: the config's mesh.")
_BATCH = flags.DEFINE_integer("per_device_batch", 1, "Sequences per device of the batch axes "
                              "(data x fsdp x expert); the global batch follows. 0: the config's.")
flags.mark_flags_as_required(["config"])


@dataclasses.dataclass
class Plan:
    devices: int
    mesh: dict
    global_batch: int
    per_device_batch: int
    params_bytes: int
    optimizer_bytes: int
    activation_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.params_bytes + self.optimizer_bytes + self.activation_bytes


def _local_bytes(leaf, spec, sizes: dict) -> int:
    """Bytes of one device's shard of `leaf` under PartitionSpec `spec` on a mesh of `sizes`."""
    shape = list(leaf.shape)
    for dim, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None:
                shape[dim] = math.ceil(shape[dim] / sizes[axis])
    return math.prod(shape) * jnp.dtype(leaf.dtype).itemsize


def plan(config: ml_collections.ConfigDict, devices: int, mesh_cfg, per_device_batch: int) -> Plan:
    """The per-device memory of `config` on `devices` devices shaped by `mesh_cfg`."""
    from jax._src.ad_checkpoint import saved_residuals  # no public equivalent in jax 0.11

    from dsv3_jax.train.loop import loss_fn, state_builder

    check_run_config(config)
    cfg, tc, seq_len = model_config(config), config.train, config.data.seq_len
    sizes = mesh_lib.mesh_shape(mesh_cfg, devices)
    batch_ways = mesh_lib.batch_ways(sizes)
    local_batch = per_device_batch or max(config.data.batch_size // batch_ways, 1)
    mesh_lib.check_mesh_fits(sizes, cfg, local_batch * batch_ways)

    _, _, init_boxed = state_builder(cfg, tc, seq_len)
    state, specs = mesh_lib.abstract_with_shardings(init_boxed)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)

    def total(tree, tree_specs) -> int:
        leaves = jax.tree.leaves(tree)
        leaf_specs = jax.tree.leaves(tree_specs, is_leaf=is_spec)
        return sum(_local_bytes(x, s, sizes) for x, s in zip(leaves, leaf_specs))

    t = sizes["tensor"]  # the per-device model: what tensor parallelism leaves on a device
    local_cfg = cfg.replace(n_heads=cfg.n_heads // t, inter_dim=cfg.inter_dim // t,
                            moe_inter_dim=cfg.moe_inter_dim // t, vocab_size=cfg.vocab_size // t)
    local_model, _, local_init = state_builder(local_cfg, tc, seq_len)
    local_params = jax.eval_shape(local_init).params
    batch = {k: jax.ShapeDtypeStruct((local_batch, seq_len), jnp.int32)
             for k in ("tokens", "segment_ids", "positions")}
    f = lambda p, b: loss_fn(nn.unbox(p), b, model=local_model, train_cfg=tc)[0]
    residuals = saved_residuals(f, local_params, batch)
    activations = sum(math.prod(a.shape) * jnp.dtype(a.dtype).itemsize
                      for a, why in residuals if not why.startswith("from the argument"))
    return Plan(devices=devices, mesh=sizes, global_batch=local_batch * batch_ways,
                per_device_batch=local_batch, params_bytes=total(state.params, specs.params),
                optimizer_bytes=total(state.opt_state, specs.opt_state),
                activation_bytes=activations)


def parse_mesh(text: str, default) -> ml_collections.ConfigDict:
    """'expert=64,fsdp=-1' -> a mesh config (unnamed axes 1); '' -> `default`."""
    if not text:
        return default
    sizes = dict(data=1, fsdp=1, expert=1, tensor=1)
    for part in text.split(","):
        name, _, value = part.partition("=")
        name, value = name.strip(), value.strip()
        if name not in sizes or not (value.isdigit() or value == "-1") or int(value) == 0:
            raise cli.UsageError(f"--mesh: {part!r} is not axis=size with axis in {list(sizes)} "
                                 "and size a positive int or -1, e.g. --mesh=expert=64,fsdp=-1.")
        sizes[name] = int(value)
    return ml_collections.ConfigDict(sizes)


def table(plans: list[Plan], cfg_name: str, seq_len: int, remat: str) -> str:
    gb = lambda b: f"{b / 2**30:,.2f}"
    rows = [f"Per-device memory, {cfg_name}, sequence {seq_len}, remat {remat!r} (GiB):", "",
            "| devices | mesh (data, fsdp, expert, tensor) | global batch | per-device batch | "
            "params | optimizer | activations | total |", "|---|---|---|---|---|---|---|---|"]
    for p in plans:
        m = p.mesh
        rows.append(f"| {p.devices} | {m['data']}, {m['fsdp']}, {m['expert']}, {m['tensor']} | "
                    f"{p.global_batch:,} | {p.per_device_batch} | {gb(p.params_bytes)} | "
                    f"{gb(p.optimizer_bytes)} | {gb(p.activation_bytes)} | {gb(p.total_bytes)} |")
    return "\n".join(rows)


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}.")
    config = _CONFIG.value
    devices = cli.positive_ints("--devices", _DEVICES.value)
    if _BATCH.value < 0:
        raise cli.UsageError(f"--per_device_batch={_BATCH.value} must be >= 1 (or 0: the "
                             "config's batch size split over the batch axes).")
    mesh_cfg = parse_mesh(_MESH.value, config.mesh)
    plans = [plan(config, n, mesh_cfg, _BATCH.value) for n in devices]
    print(table(plans, config.model.preset, config.data.seq_len, model_config(config).remat_policy))


if __name__ == "__main__":
    cli.run(main)
