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


def test_mesh_shapes_and_their_errors():
    import ml_collections
    import pytest

    from dsv3_jax.parallel.mesh import check_mesh_fits, mesh_shape

    mk = lambda **kw: ml_collections.ConfigDict(dict(dict(data=1, fsdp=1, expert=1, tensor=1), **kw))
    assert mesh_shape(mk(fsdp=-1), 8) == dict(data=1, fsdp=8, expert=1, tensor=1)
    assert mesh_shape(mk(expert=4, tensor=-1), 8) == dict(data=1, fsdp=1, expert=4, tensor=2)
    with pytest.raises(ValueError, match="only one axis may be -1"):
        mesh_shape(mk(fsdp=-1, data=-1), 8)
    with pytest.raises(ValueError, match=r"spans 6 devices but 8 are available"):
        mesh_shape(mk(data=2, expert=3), 8)
    with pytest.raises(ValueError, match=r"fixed axes use 3 devices, which does not divide the 8"):
        mesh_shape(mk(expert=3, fsdp=-1), 8)
    with pytest.raises(ValueError, match=r"config.mesh.tensor=0 is invalid"):
        mesh_shape(mk(tensor=0), 8)
    cfg = ds.get_model_config("tiny")  # 8 experts, 4 heads, dim 128
    check_mesh_fits(dict(data=1, fsdp=2, expert=4, tensor=1), cfg, 16)
    with pytest.raises(ValueError, match=r"config.mesh.expert=16 does not divide ModelConfig.n_routed_experts=8"):
        check_mesh_fits(dict(data=1, fsdp=1, expert=16, tensor=1), cfg, 16)
    with pytest.raises(ValueError, match=r"config.mesh.tensor=8 does not divide ModelConfig.n_heads=4"):
        check_mesh_fits(dict(data=1, fsdp=1, expert=1, tensor=8), cfg, 16)
    with pytest.raises(ValueError, match=r"config.mesh.fsdp=32 x config.mesh.expert=8 does not divide "
                                         r"ModelConfig.dim=128"):
        check_mesh_fits(dict(data=1, fsdp=32, expert=8, tensor=1), cfg, 256)
    with pytest.raises(ValueError, match=r"batch_size=12 is not divisible by data x fsdp x expert = 8"):
        check_mesh_fits(dict(data=2, fsdp=2, expert=2, tensor=1), cfg, 12)


def test_plan_counts_sharded_bytes_without_allocating():
    import importlib.util
    import pathlib

    from dsv3_jax.plan import COMPONENTS, parse_mesh, plan
    from dsv3_jax.train.run_config import base_config

    root = pathlib.Path(__file__).resolve().parent.parent
    spec = importlib.util.spec_from_file_location("v3", root / "configs" / "deepseek_v3_671b.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    big = module.get_config("")
    st = ds.model_stats(ds.get_model_config("deepseek-v3-671b"))
    mesh = parse_mesh("expert=64,fsdp=-1", None)
    p = plan(big, 256, mesh, 1, capacity_factor=0)
    b = p.bytes
    assert p.mesh == dict(data=1, fsdp=4, expert=64, tensor=1)
    assert set(b) == set(COMPONENTS) | {"total"} and b["total"] == sum(b[k] for k in COMPONENTS)
    ideal = 4 * (st.total_params + st.mtp_params) / 256  # fp32 master weights, perfectly split
    assert ideal <= b["params"] < 1.02 * ideal
    # Two bf16 moments per fp32 weight (bf16_moments); the router biases have none.
    assert abs(b["optimizer"] / b["params"] - 1) < 1e-4
    assert b["gradients"] == b["params"]  # float32 gradients, sharded like the fp32 params
    assert b["activations"] > 0 and b["loss"] > 0 and b["transient"] > 0
    # Dropless: each device's buffers hold [P = 64, C = M, D]; capacity 2 bounds C at 2M / 64.
    bounded = plan(big, 256, mesh, 1, capacity_factor=2.0)
    # (the [M, D] rows in token order do not shrink with C)
    assert 20 < b["ep_buffers"] / bounded.bytes["ep_buffers"] < 32
    assert bounded.capacity_factor == 2.0 and p.capacity_factor == 0.0
    # Two microbatches of 1 sequence per device: the same global batch as 2 sequences at once,
    # half the activations, an accumulator beside the gradients.
    two = plan(big, 256, mesh, 2, grad_accum_steps=1)
    accum = plan(big, 256, mesh, 1, grad_accum_steps=2)
    assert accum.global_batch == two.global_batch == 512 and accum.grad_accum_steps == 2
    assert abs(accum.bytes["activations"] / two.bytes["activations"] - 0.5) < 0.01
    assert accum.bytes["gradients"] == 2 * b["gradients"]
    tiny = base_config("tiny")
    none = plan(tiny, 8, parse_mesh("fsdp=-1", None), 2)
    with tiny.unlocked():
        tiny.model.remat_policy = "full"
    full = plan(tiny, 8, parse_mesh("fsdp=-1", None), 2)
    # remat keeps only block inputs
    assert full.bytes["activations"] < none.bytes["activations"] / 2
    assert none.bytes["optimizer"] > 1.9 * none.bytes["params"]  # fp32 moments
    ref = plan(tiny, 8, parse_mesh("fsdp=-1", None), 2, attention="reference")
    assert ref.bytes["transient"] > full.bytes["transient"]  # float32 [b, H, T, T] scores
