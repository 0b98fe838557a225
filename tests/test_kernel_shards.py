"""The kernel wrappers of parallel/kernel_shards.py on 8 simulated CPU devices.

These tests need 8 devices: `make test` runs them in a second pytest with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (elsewhere they are skipped).

Each wrapped op (here the ops function picks a jnp path: the reference, or the chunked one, as
on a CPU) is compared with the same ops function called on one device without a mesh: outputs
and the gradients w.r.t. every float input (a vjp with a random cotangent). Inputs are float32
~ N(0, 1); a shard computes the same sums as one device, so the differences are fp32 rounding of
a different summation order (measured <= 5.4e-7 of each output's scale, attention's dk; <= 1.5e-7
for the FP8 linear): the bound is 2e-6 x max|reference|. For the FP8 linear the shapes are chosen
so that every FP8 tile lands on one device's boundaries (module docstring of
kernel_shards): 128 rows per device (the Wgrad 128x1 tiles) and 128-wide tensor shards (the
128x128 weight blocks and the 1x128 tiles of a split dim); a tile on other boundaries changes its
scale and moves results by FP8 steps (2^-4 relative per element; the control test below sees it).
What the body receives is recorded by a fake that wraps the ops function.
"""

from __future__ import annotations

import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from dsv3_jax.model.transformer import DeepSeekV3
from dsv3_jax.ops import attention, fp8
from dsv3_jax.parallel import kernel_shards
from dsv3_jax.parallel.mesh import LOGICAL_AXIS_RULES, make_mesh

from conftest import TINY32, assert_close, init_params, random_tokens

pytestmark = pytest.mark.multidevice
RTOL = 2e-6  # see the module docstring
MESHES = {"data2-fsdp2-tensor2": dict(data=2, fsdp=2, expert=1, tensor=2),
          "expert2-fsdp2-tensor2": dict(data=1, fsdp=2, expert=2, tensor=2)}


def _mesh(**sizes):
    n = int(np.prod(list(sizes.values())))
    return make_mesh(ml_collections.ConfigDict(sizes), devices=jax.devices()[:n])


def _normal(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _record(monkeypatch, module, name):
    """Replaces module.name by a fake that records its array arguments' shapes (not the scale or
    output dtype) and calls the original."""
    original, seen = getattr(module, name), []

    def fake(*args, **kwargs):
        arrays = (*args, *(v for k, v in sorted(kwargs.items()) if k not in ("scale", "out_dtype")))
        seen.append(tuple(None if a is None else a.shape for a in arrays))
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, fake)
    return seen


def _value_and_vjp(f, args, cotangent):
    """(f(*args), the vjp of f at args applied to cotangent), one jit."""
    def run(*args):
        y, pull = jax.vjp(f, *args)
        return y, pull(cotangent)
    return jax.jit(run)(*args)


def _compare(f_sharded, f_single, args, cotangent, mesh, what):
    want = _value_and_vjp(f_single, args, cotangent)
    with jax.set_mesh(mesh):
        got = _value_and_vjp(f_sharded, args, cotangent)
    for i, (g, w) in enumerate(zip(jax.tree.leaves(got), jax.tree.leaves(want))):
        assert_close(g, w, RTOL, f"{what}: leaf {i}")
    return got


# ------------------------------------------------------------------------------------ attention

def _force_jnp_path(monkeypatch, impl):
    """DSV3_ATTENTION / DSV3_DECODE = impl; for "chunked", blocks of 8 (several per shard)."""
    monkeypatch.setenv("DSV3_ATTENTION", impl)
    monkeypatch.setenv("DSV3_DECODE", impl)
    if impl == "chunked":
        from dsv3_jax.ops import chunked_attention

        for name in ("BLOCK_Q", "BLOCK_K", "BLOCK_S"):
            monkeypatch.setattr(chunked_attention, name, 8)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
@pytest.mark.parametrize("name", MESHES)
def test_attention_per_shard_equals_one_device(name, impl, monkeypatch):
    """q, k, v [B=8, T=16, H=4, *] with packed segments: the body gets [B/4, T, H/2, *] (batch
    over data x fsdp x expert, heads over tensor); output, dq, dk, dv equal one device's. Both jnp
    paths: the reference, and the chunked one (its custom_vjp and block loops inside shard_map)."""
    _force_jnp_path(monkeypatch, impl)
    mesh = _mesh(**MESHES[name])
    b, t, h, a, o = 8, 16, 4, 24, 16
    q, k, v = _normal(1, b, t, h, a), _normal(2, b, t, h, a), _normal(3, b, t, h, o)
    seg = jnp.asarray(np.sort(np.random.default_rng(4).integers(0, 3, (b, t)), axis=1), jnp.int32)
    run = lambda core: (lambda q, k, v: core(q, k, v, scale=0.2, segment_ids=seg))
    single = run(attention.mla_attention)
    seen = _record(monkeypatch, attention, "mla_attention")
    _compare(run(kernel_shards.mla_attention), single, (q, k, v), _normal(5, b, t, h, o), mesh, name)
    assert set(seen) == {((2, t, 2, a), (2, t, 2, a), (2, t, 2, o), (2, t))}, seen


def test_attention_without_a_mesh_or_dividing_dims_calls_the_op_directly(monkeypatch):
    """No mesh; a 1-device mesh; B=3 and H=3 on data2 x fsdp2 x tensor2 (nothing divides): the op
    sees the whole arrays, and no shard_map is traced."""
    q = _normal(1, 3, 8, 3, 16)
    seen = _record(monkeypatch, attention, "mla_attention")
    f = lambda q: kernel_shards.mla_attention(q, q, q, scale=0.25)
    for mesh in (None, _mesh(data=1, fsdp=1, expert=1, tensor=1), _mesh(**MESHES["data2-fsdp2-tensor2"])):
        with jax.set_mesh(mesh) if mesh else contextlib.nullcontext():
            jaxpr = jax.make_jaxpr(f)(q)
        assert "shard_map" not in str(jaxpr)
    assert set(seen) == {((3, 8, 3, 16),) * 3 + (None,)}, seen


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_decode_per_shard_equals_one_device(impl, monkeypatch):
    """q_latent [B=4, T=2, H=4, C], q_pe [.., R], cache [B, S, C + R], positions [B, T] on
    expert2 x fsdp2 x tensor2: the body gets [1, 2, 2, *] and [1, S, C + R]; equal to one device.
    With B=2 (batch not divisible by 4) the batch stays whole and the heads are still split. Both
    jnp paths (the chunked decode, in blocks of 8 slots, has no gradient: outputs only)."""
    _force_jnp_path(monkeypatch, impl)
    mesh = _mesh(**MESHES["expert2-fsdp2-tensor2"])
    t, h, c, r, s = 2, 4, 32, 8, 24
    for b in (4, 2):
        ql, qp, cache = _normal(b, b, t, h, c), _normal(b + 1, b, t, h, r), _normal(b + 2, b, s, c + r)
        pos = jnp.asarray(np.random.default_rng(b).integers(0, s, (b, t)), jnp.int32)
        run = lambda core: (lambda ql, qp, cache: core(ql, qp, cache, pos, scale=0.3))
        single = run(attention.mla_decode)
        seen = _record(monkeypatch, attention, "mla_decode")
        if impl == "reference":
            _compare(run(kernel_shards.mla_decode), single, (ql, qp, cache),
                     _normal(9, b, t, h, c), mesh, f"decode B={b}")
        else:  # the chunked decode is inference only (no gradient): outputs
            want = jax.jit(single)(ql, qp, cache)
            with jax.set_mesh(mesh):
                got = jax.jit(run(kernel_shards.mla_decode))(ql, qp, cache)
            assert_close(got, want, RTOL, f"chunked decode B={b}")
        b_loc = 1 if b == 4 else b
        assert set(seen) == {((b_loc, t, 2, c), (b_loc, t, 2, r), (b_loc, s, c + r), (b_loc, t))}, seen
        monkeypatch.undo()
        _force_jnp_path(monkeypatch, impl)


# ------------------------------------------------------------------------------------ FP8 linear

# (logical axes of w [I, J], the weight shard the body multiplies by, and x's last dim there) on
# data2 x fsdp2 x tensor2 with I = J = 256: FSDP dims gathered, tensor dims kept split.
LINEAR_CASES = {
    "column-parallel": (("embed", "heads"), (256, 128), 256),  # wq: I over fsdp, J over tensor
    "row-parallel": (("heads", "embed"), (128, 256), 128),  # wo: I over tensor, J over fsdp
    "fsdp-only": (("embed", "q_lora"), (256, 256), 256),  # wq_a: I over fsdp, J whole
    "column-parallel-fsdp-in": (("q_lora", "heads"), (256, 128), 256),  # wq_b
}


@pytest.mark.parametrize("case", LINEAR_CASES)
def test_fp8_linear_per_shard_equals_one_device(case, monkeypatch):
    """x [B=4, T=128, I=256] rows over data x fsdp (128 rows per device), w [256, 256] placed as
    its logical axes say: y, dx and dw equal one device's fp8_linear (every FP8 tile on the same
    boundaries), and dw comes back with w's sharding."""
    axes, w_local, i_local = LINEAR_CASES[case]
    mesh = _mesh(**MESHES["data2-fsdp2-tensor2"])
    x, w, dy = _normal(1, 4, 128, 256), 0.05 * _normal(2, 256, 256), _normal(3, 4, 128, 256)
    place = jax.sharding.NamedSharding(mesh, nn.logical_to_mesh_axes(axes, LOGICAL_AXIS_RULES))
    w = jax.device_put(w, place)
    seen = _record(monkeypatch, fp8, "fp8_linear")
    y, (dx, dw) = _compare(lambda x, w: kernel_shards.fp8_linear(x, w, axes), fp8.fp8_linear,
                           (x, w), dy, mesh, case)
    assert dw.sharding.is_equivalent_to(place, 2), (dw.sharding, place)
    # The reference ran once unwrapped ([4, 128, 256] x [256, 256]), then on each shard.
    assert seen[0] == ((4, 128, 256), (256, 256)), seen
    assert set(seen[1:]) == {((1, 128, i_local), w_local)}, seen


def test_fp8_linear_tiles_off_the_shard_boundaries_are_seen():
    """The control for the test above: with 16 rows per device the Wgrad 128x1 tiles restart at
    each device's rows, a different quantization of x^T dy, so dw moves by FP8 steps (calc_diff
    measured 8e-4, 4e-2 of max|dw| elementwise: far above fp32 rounding) while y and dx, whose
    tiles are whole rows, stay equal."""
    axes = ("embed", "q_lora")
    mesh = _mesh(**MESHES["data2-fsdp2-tensor2"])
    x, w, dy = _normal(1, 4, 16, 256), 0.05 * _normal(2, 256, 256), _normal(3, 4, 16, 256)
    want = _value_and_vjp(fp8.fp8_linear, (x, w), dy)
    with jax.set_mesh(mesh):
        y, (dx, dw) = _value_and_vjp(lambda x, w: kernel_shards.fp8_linear(x, w, axes), (x, w), dy)
    assert_close(y, want[0], RTOL, "y")
    assert_close(dx, want[1][0], RTOL, "dx")
    diff = fp8.calc_diff(dw, want[1][1])
    assert 1e-6 < diff < 3e-3, diff


def test_fp8_linear_that_does_not_divide_calls_the_op_directly(monkeypatch):
    """x [3, 8, 256] (3 rows do not split 4 ways), and J = 101 over tensor 2 with divisible rows:
    the op gets the whole arrays."""
    mesh = _mesh(**MESHES["data2-fsdp2-tensor2"])
    seen = _record(monkeypatch, fp8, "fp8_linear")
    with jax.set_mesh(mesh):
        for x, w in ((_normal(1, 3, 8, 256), _normal(2, 256, 256)),
                     (_normal(1, 4, 8, 256), _normal(2, 256, 101))):
            jaxpr = jax.make_jaxpr(lambda x, w: kernel_shards.fp8_linear(x, w, ("embed", "heads")))(x, w)
            assert "shard_map" not in str(jaxpr)
    assert seen == [((3, 8, 256), (256, 256)), ((4, 8, 256), (256, 101))], seen


# ------------------------------------------------------------------------------------ the model

def test_the_model_calls_every_kernel_per_shard(monkeypatch):
    """The fp8 tiny model's loss gradient, traced on data2 x fsdp2 x tensor2 (batch 8): attention
    gets [2, T, H/2, A] shards and every FP8 projection its batch shard of rows, with kernel shards
    as the rules table splits them (wq_b column-parallel, wo row-parallel). (The loss and gradients
    of the sharded model against one device: tests/test_parallel.py, whose MLA and Linear calls
    run through these wrappers.) Traced only, not compiled."""
    cfg = TINY32.replace(fp8=True)
    params, tokens = init_params(cfg), random_tokens(cfg, (8, 16), seed=1)
    model = DeepSeekV3(cfg)
    loss = lambda p, tokens: model.apply({"params": p}, tokens, method=DeepSeekV3.forward).logits.sum()
    attn = _record(monkeypatch, attention, "mla_attention")
    linear = _record(monkeypatch, fp8, "fp8_linear")
    with jax.set_mesh(_mesh(**MESHES["data2-fsdp2-tensor2"])), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        jax.make_jaxpr(jax.grad(loss))(params, tokens)
    h, a, o = cfg.n_heads, cfg.qk_head_dim, cfg.v_head_dim
    assert attn and set(attn) == {((2, 16, h // 2, a),) * 2 + ((2, 16, h // 2, o), None)}, attn
    assert linear and all(x[0] == 2 for x, _ in linear), linear  # 8 sequences / 4 batch shards
    w_shapes = {w for _, w in linear}
    assert (cfg.q_lora_rank, h * a // 2) in w_shapes  # wq_b [Q, H A / tensor], Q gathered
    assert (h * o // 2, cfg.dim) in w_shapes  # wo [H O / tensor, D], D gathered
