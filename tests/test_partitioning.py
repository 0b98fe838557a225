"""Every parameter's logical axis names are mapped by the one rules table."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

import dsv3_jax as ds
from dsv3_jax.model.transformer import DeepSeekV3
from dsv3_jax.parallel.mesh import LOGICAL_AXIS_RULES, MESH_AXES


def _boxed_shapes(cfg):
    return jax.eval_shape(lambda: DeepSeekV3(cfg).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def test_every_logical_axis_is_in_the_rules_table():
    known = {name for name, _ in LOGICAL_AXIS_RULES}
    for target in (mesh for _, mesh in LOGICAL_AXIS_RULES):
        for axis in (target if isinstance(target, tuple) else (target,)):
            assert axis is None or axis in MESH_AXES, axis
    for preset in ("tiny", "deepseek-v3-16b", "deepseek-v3-671b"):
        cfg = ds.get_model_config(preset)
        for cfg_variant in (cfg, cfg.replace(scan_layers=False, n_layers=cfg.n_dense_layers + 1)):
            specs = nn.get_partition_spec(_boxed_shapes(cfg_variant))
            for path, spec in jax.tree_util.tree_flatten_with_path(
                    specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]:
                for name in spec:
                    assert name is None or name in known, (jax.tree_util.keystr(path), name)


def test_scanned_parameters_carry_the_layers_axis():
    specs = nn.get_partition_spec(_boxed_shapes(ds.get_model_config("tiny")))
    assert specs["moe_layers"]["layers"]["ffn"]["w1"] == jax.sharding.PartitionSpec(
        "layers", "exp", "embed", "moe_mlp")
    assert specs["embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
