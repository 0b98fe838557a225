"""Every Mosaic GPU kernel of ops/pallas compiled and run on a Hopper GPU (H100 / H200), at
DeepSeek-V3 dims and at ragged shapes, against its jnp reference on fresh random inputs.

All tests are marked `gpu` and skipped without a Hopper GPU (`pytest -m gpu`; on the GPU machine
`python experiments/gpu_check.py` runs them with the rest of its checks). The same test bodies run
on the CPU in GPU interpret mode at tiny shapes with GPU_TESTS_INTERPRET=1 in the environment
(slow, a few minutes: a check of the tests themselves, not part of `make test`).

What is covered (dims from the presets "deepseek-v3-671b" and "small", dsv3_jax.get_model_config):
  fp8_gemm       fprop / Dgrad (bf16 out, 128x128 b scales) and Wgrad (f32 out, per-row b scales)
                 at V3 expert shapes; M, I, J not multiples of the tiles.
  gmm            w1 / w2 shapes and their dx (transpose_rhs): groups crossing row tiles, empty
                 groups, rows before the first and after the last group (must be exact zeros).
  tgmm           the same groups, bf16 and f32 out (empty groups: exact zeros).
  grouped_matmul expert-parallel shards (group_offset, a middle and the last shard) through the
                 dispatcher's custom_vjp: y, dx, dw.
  mla_attention  forward and backward (dq, dk, dv) with packed documents (segment ids, one of
                 length 1) and without, V3 heads; a ragged T.
  mla_decode     B 64 S 4K and B 8 S 32K at V3 heads, and two new tokens per sequence over a
                 ragged S; per-sequence positions including 0 and the last slot.

References: ops.fp8.fp8_gemm_reference, ops.grouped_matmul.grouped_matmul_reference /
transposed_grouped_matmul_reference, ops.attention.mla_attention_reference /
mla_decode_reference, each computed in float32 (fp32 inputs cast from the same bf16 / e4m3
values, fp32 outputs), so the tolerances below bound the kernel's own error.

Tolerances (elementwise |out - ref| <= rtol |ref| + atol max|ref|, or scale-aware where stated):
  * fp8_gemm: rtol 2^-8, atol 2^-10. The kernel and the reference use the same quantized operands
    and scales and promote each 128-wide I block into fp32. On Hopper the FP8 tensor core sums a
    block's 128 products in a ~14-bit accumulator (the reason for the per-block promotion), about
    2^-13 relative per block partial, random across blocks: well under 2^-10 of the output scale.
    bf16 output rounding adds at most 2^-9 |ref| (round to nearest): rtol 2^-8 allows twice that.
    A wrong scale, block or tile is off by O(max|ref|).
  * gmm / tgmm: rtol 2^-8, atol 2^-12 (f32 tgmm: rtol 0, atol 2^-12). bf16 x bf16 products are
    exact in fp32 and the sums are fp32 in both, so they differ by summation order (about 2^-24
    sqrt(I) of the scale) and the output's bf16 rounding (2^-9 |ref|). A row of another group is
    off by O(max|ref|). Rows outside every group and empty groups must be exactly 0.
  * mla_attention, mla_decode: 2^-6 of max|ref| (of each sequence for decode), the bound of
    tests/test_mla_kernels.py: the kernels feed P (and dS) to the value products in bf16 after an
    online softmax and round outputs to bf16; each output is a convex combination of values of
    size <= ~4, so the error is a few bf16 ulps of the output scale (gradients likewise; observed
    about 2^-8 in interpret mode). A wrong mask or block gives errors of order 1.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax as ds
from dsv3_jax.ops import fp8, grouped_matmul as gm, platform
from dsv3_jax.ops.attention import mla_attention_reference, mla_decode_reference

INTERPRET = os.environ.get("GPU_TESTS_INTERPRET") == "1"  # tiny shapes in GPU interpret mode
ON_HOPPER = platform.on_hopper()

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not (ON_HOPPER or INTERPRET),
                                 reason="needs a Hopper GPU (or GPU_TESTS_INTERPRET=1)")]

V3 = ds.get_model_config("deepseek-v3-671b")
SMALL = ds.get_model_config("small")
A = V3.qk_nope_head_dim + V3.qk_rope_head_dim  # 192, the same in both presets
O, C, R = V3.v_head_dim, V3.kv_lora_rank, V3.qk_rope_head_dim

FP8_RTOL, FP8_ATOL = 2.0 ** -8, 2.0 ** -10
GMM_RTOL, GMM_ATOL = 2.0 ** -8, 2.0 ** -12
ATTN_RTOL = 2.0 ** -6


@pytest.fixture(autouse=True, scope="module")
def _synchronous_cpu_dispatch():
    """Interpret mode only: its warpgroup threads block in host callbacks, which can deadlock the
    CPU client's small thread pool under asynchronous dispatch (tests/test_mla_kernels.py)."""
    old = jax.config.values["jax_cpu_enable_async_dispatch"]
    jax.config.update("jax_cpu_enable_async_dispatch", not INTERPRET and old)
    yield
    jax.config.update("jax_cpu_enable_async_dispatch", old)


def _compiled(fn):
    """jax.jit(fn) on the GPU. In interpret mode fn itself, run op by op: under one jit, XLA:CPU
    may run independent kernels (the dq and dk-dv kernels) at once, and their interpreted
    warpgroup threads then wait on each other in its small thread pool (a deadlock)."""
    return fn if INTERPRET else jax.jit(fn)


def _kernel_kw():
    """interpret / num_sms as the dispatchers pass them."""
    return dict(interpret=INTERPRET, num_sms=platform.num_sms())


@jax.jit
def _excess(out, ref, rtol, atol):
    """(max of |out - ref| - rtol |ref| - atol max|ref|, max|out - ref| / max|ref|), on device."""
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    err = jnp.abs(out - ref)
    scale = jnp.max(jnp.abs(ref))
    return jnp.max(err - rtol * jnp.abs(ref) - atol * scale), jnp.max(err) / scale


def _check(out, ref, rtol, atol, what):
    assert out.shape == ref.shape, (what, out.shape, ref.shape)
    assert float(jnp.max(jnp.abs(ref.astype(jnp.float32)))) > 0, f"{what}: reference is all zeros"
    excess, rel = map(float, _excess(out, ref, rtol, atol))
    assert excess <= 0, (f"{what}: error {rel:.3g} x max|ref| exceeds rtol {rtol:.3g} |ref| + atol "
                         f"{atol:.3g} max|ref| somewhere (by {excess:.3g})")


def _normal(key, shape, dtype=jnp.bfloat16, scale=1.0):
    return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def _f32(*arrays):
    return [a.astype(jnp.float32) for a in arrays]


# ------------------------------------------------------------------------------------------------
# FP8 block-scaled GEMM
# ------------------------------------------------------------------------------------------------
# (id, M, I, J, out dtype, per-row b scales): C [M, J] = A [M, I] B [J, I]^T
FP8_CASES = ([
    ("tiny_aligned", 128, 256, 128, jnp.bfloat16, False),
    ("tiny_ragged", 100, 300, 72, jnp.bfloat16, False),
    ("tiny_wgrad", 72, 256, 192, jnp.float32, True),
] if INTERPRET else [
    ("fprop_v3", 4096, V3.dim, V3.moe_inter_dim, jnp.bfloat16, False),
    ("dgrad_v3", 4096, V3.moe_inter_dim, V3.dim, jnp.bfloat16, False),
    ("wgrad_v3", V3.dim, 4096, V3.moe_inter_dim, jnp.float32, True),
    ("fprop_small", 4096, SMALL.dim, SMALL.inter_dim, jnp.bfloat16, False),
    ("m_not_tile_v3", 1000, V3.dim, V3.q_lora_rank, jnp.bfloat16, False),
    ("all_ragged", 77, 300, 200, jnp.bfloat16, False),
    ("all_ragged_wgrad", 200, 333, 130, jnp.float32, True),
])


@pytest.mark.parametrize("m, i, j, out_dtype, per_row_b",
                         [c[1:] for c in FP8_CASES], ids=[c[0] for c in FP8_CASES])
def test_fp8_gemm_vs_reference(m, i, j, out_dtype, per_row_b):
    from dsv3_jax.ops.pallas import fp8_gemm_sm90

    ka, kb = jax.random.split(jax.random.key(m * 31 + i * 7 + j))
    a_q, a_s = fp8.act_quant(_normal(ka, (m, i)))
    b = _normal(kb, (j, i))
    b_q, b_s = fp8.act_quant(b) if per_row_b else fp8.weight_quant(b)
    out = _compiled(lambda *ops: fp8_gemm_sm90.fp8_gemm(*ops, out_dtype=out_dtype, **_kernel_kw()))(
        a_q, a_s, b_q, b_s)
    assert out.dtype == out_dtype and out.shape == (m, j)
    ref = jax.jit(lambda *ops: fp8.fp8_gemm_reference(*ops, out_dtype=jnp.float32))(
        a_q, a_s, b_q, b_s)
    _check(out, ref, FP8_RTOL, FP8_ATOL, f"fp8_gemm {m}x{i}x{j}")


# ------------------------------------------------------------------------------------------------
# Grouped matmuls: gmm (y, dx) and tgmm (dw)
# ------------------------------------------------------------------------------------------------
def _group_sizes(key, rows: int, groups: int, block: int) -> np.ndarray:
    """int32 [E] summing to `rows`: a quarter of the groups empty (at least one), the others
    random, at least one spanning more than a row tile of `block`, boundaries mostly not on tile
    edges."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 30)))
    p = rng.uniform(0.2, 1.0, groups)
    p[rng.choice(groups, max(1, groups // 4), replace=False)] = 0.0
    sizes = rng.multinomial(rows - block - 1, p / p.sum())
    sizes[int(np.argmax(p))] += block + 1  # one group crosses at least one row tile
    return sizes.astype(np.int32)


def _starts(sizes: np.ndarray, lead: int) -> jax.Array:
    """[E+1] row starts of groups laid out after `lead` rows that belong to no group."""
    return jnp.asarray(np.concatenate([[0], np.cumsum(sizes)]) + lead, jnp.int32)


def _gmm_tiles():
    """Interpret mode: the smallest tiles (64), so that a few rows make several tiles; on the GPU
    the kernels' defaults (None)."""
    if not INTERPRET:
        return None, None
    from dsv3_jax.ops.pallas import grouped_matmul_sm90 as k

    small = k.TileConfig(block_m=64, block_n=64, block_k=64, max_concurrent_steps=2, grid_block_n=1)
    return small, small


# (id, M rows, E groups, I, J, rows before the first group, rows after the last)
GMM_CASES = ([
    ("tiny", 200, 4, 96, 64, 5, 11),
] if INTERPRET else [
    ("w1_v3", 4096, 8, V3.dim, V3.moe_inter_dim, 0, 0),
    ("w2_v3", 4096, 8, V3.moe_inter_dim, V3.dim, 0, 0),
    ("w1_small_padded", 3000, SMALL.n_routed_experts, SMALL.dim, SMALL.moe_inter_dim, 37, 211),
    ("w2_small_padded", 3000, SMALL.n_routed_experts, SMALL.moe_inter_dim, SMALL.dim, 0, 300),
    ("odd_dims", 777, 5, 200, 136, 3, 50),
])


def _gmm_case(m, e, i, j, lead, tail):
    kx, kw, kd, kg = jax.random.split(jax.random.key(m + 3 * e + 5 * i + 7 * j), 4)
    sizes = _group_sizes(kg, m - lead - tail, e, 128 if not INTERPRET else 64)
    x = _normal(kx, (m, i))
    w = _normal(kw, (e, i, j), scale=i ** -0.5)
    dy = _normal(kd, (m, j))
    return x, w, dy, sizes, _starts(sizes, lead)


def _outside_rows(starts, m):
    rows = np.arange(m)
    return (rows < int(starts[0])) | (rows >= int(starts[-1]))


@pytest.mark.parametrize("m, e, i, j, lead, tail", [c[1:] for c in GMM_CASES],
                         ids=[c[0] for c in GMM_CASES])
def test_gmm_and_its_dx_vs_reference(m, e, i, j, lead, tail):
    """y = x w[e] and dx = dy w[e]^T (transpose_rhs) against ragged_dot in fp32; rows outside the
    groups are exact zeros."""
    from dsv3_jax.ops.pallas import grouped_matmul_sm90 as k

    x, w, dy, sizes, starts = _gmm_case(m, e, i, j, lead, tail)
    cfg, _ = _gmm_tiles()
    y = _compiled(lambda x, w, s: k.gmm(x, w, s, config=cfg, **_kernel_kw()))(x, w, starts)
    dx = _compiled(lambda dy, w, s: k.gmm(dy, w, s, transpose_rhs=True, config=cfg,
                                        **_kernel_kw()))(dy, w, starts)
    assert y.dtype == x.dtype and dx.dtype == x.dtype

    def reference(x, w, dy):  # the groups shifted to row 0 (the reference has no row offset)
        xs, dys = jnp.roll(x, -lead, 0), jnp.roll(dy, -lead, 0)
        y = gm.grouped_matmul_reference(xs, w, jnp.asarray(sizes))
        dx = gm.grouped_matmul_reference(dys, jnp.swapaxes(w, 1, 2), jnp.asarray(sizes))
        return jnp.roll(y, lead, 0), jnp.roll(dx, lead, 0)

    y_ref, dx_ref = jax.jit(reference)(*_f32(x, w, dy))
    _check(y, y_ref, GMM_RTOL, GMM_ATOL, "gmm y")
    _check(dx, dx_ref, GMM_RTOL, GMM_ATOL, "gmm dx (transpose_rhs)")
    outside = _outside_rows(starts, m)
    assert outside.any() == bool(lead or tail)
    for name, out in (("y", y), ("dx", dx)):
        assert not np.any(np.asarray(out[outside], np.float32)), f"gmm {name}: rows outside groups"


@pytest.mark.parametrize("out_dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("m, e, i, j, lead, tail", [c[1:] for c in GMM_CASES],
                         ids=[c[0] for c in GMM_CASES])
def test_tgmm_vs_reference(m, e, i, j, lead, tail, out_dtype):
    """dw[e] = x_e^T dy_e in bf16 and f32 against ragged_dot_general in fp32; empty groups exact
    zeros; rows outside the groups ignored."""
    from dsv3_jax.ops.pallas import grouped_matmul_sm90 as k

    x, _, dy, sizes, starts = _gmm_case(m, e, i, j, lead, tail)
    _, cfg = _gmm_tiles()
    dw = _compiled(lambda x, dy, s: k.tgmm(x, dy, s, out_dtype=out_dtype, config=cfg,
                                         **_kernel_kw()))(x, dy, starts)
    assert dw.dtype == out_dtype and dw.shape == (e, i, j)
    ref = jax.jit(lambda x, dy: gm.transposed_grouped_matmul_reference(
        jnp.roll(x, -lead, 0), jnp.roll(dy, -lead, 0), jnp.asarray(sizes)))(*_f32(x, dy))
    rtol = GMM_RTOL if out_dtype == jnp.bfloat16 else 0.0
    _check(dw, ref, rtol, GMM_ATOL, f"tgmm {jnp.dtype(out_dtype).name}")
    empty = np.flatnonzero(sizes == 0)
    assert empty.size and not np.any(np.asarray(dw[empty], np.float32)), "tgmm: empty groups"


# (id, M rows, E groups in group_sizes, E_loc held, I, J, padding rows)
SHARD_CASES = ([
    ("tiny", 160, 8, 2, 96, 64, 9),
] if INTERPRET else [
    ("v3_ep32", 4096, 32, 8, V3.dim, V3.moe_inter_dim, 100),
])


@pytest.mark.parametrize("m, e, held, i, j, pad", [c[1:] for c in SHARD_CASES],
                         ids=[c[0] for c in SHARD_CASES])
@pytest.mark.parametrize("shard", ["middle", "last"])
def test_grouped_matmul_shards_vjp_vs_reference(m, e, held, i, j, pad, shard, monkeypatch):
    """grouped_matmul(impl="sm90") with group_offset (w holds E_loc of the E groups): y, dx, dw
    through the dispatcher's custom_vjp against the ragged_dot backend in fp32; rows of other
    groups and padding come back zero."""
    from dsv3_jax.ops.pallas import grouped_matmul_sm90 as k

    gmm_cfg, tgmm_cfg = _gmm_tiles()
    if INTERPRET:
        monkeypatch.setattr(k, "DEFAULT_GMM_CONFIG", gmm_cfg)
        monkeypatch.setattr(k, "DEFAULT_TGMM_CONFIG", tgmm_cfg)
    kx, kw, kd, kg = jax.random.split(jax.random.key(m + e + held + i + j), 4)
    sizes = _group_sizes(kg, m - pad, e, 64)
    offset = held if shard == "middle" else e - held
    sizes[offset] = 0  # the shard's first group is empty
    sizes[-1] += m - pad - int(sizes.sum())  # keep sum = m - pad (the last group takes the rest)
    assert sizes.min() >= 0 and sizes.sum() == m - pad
    x, dy = _normal(kx, (m, i)), _normal(kd, (m, j))
    w = _normal(kw, (held, i, j), scale=i ** -0.5)
    gs = jnp.asarray(sizes)

    def vjp(impl, x, w, dy):
        y, pull = jax.vjp(lambda x, w: gm.grouped_matmul(x, w, gs, jnp.int32(offset), impl=impl),
                          x, w)
        return (y, *pull(dy))

    got = _compiled(lambda x, w, dy: vjp("sm90", x, w, dy))(x, w, dy)
    ref = jax.jit(lambda x, w, dy: vjp("ragged_dot", x, w, dy))(*_f32(x, w, dy))
    for name, g, r in zip(("y", "dx", "dw"), got, ref):
        _check(g, r, GMM_RTOL, GMM_ATOL, f"grouped_matmul {shard} shard {name}")
    starts = np.concatenate([[0], np.cumsum(sizes)])
    rows = np.arange(m)
    outside = (rows < starts[offset]) | (rows >= starts[offset + held])
    for name, out in zip(("y", "dx"), got[:2]):
        assert not np.any(np.asarray(out[outside], np.float32)), f"{name}: rows of other groups"
    assert not np.any(np.asarray(got[2][0], np.float32)), "dw of the empty held group"


# ------------------------------------------------------------------------------------------------
# MLA flash attention: forward and backward
# ------------------------------------------------------------------------------------------------
def _documents(key, b: int, t: int) -> jax.Array:
    """int32 [B, T] segment ids of packed documents: random lengths, one document of length 1."""
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 30)))
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(2, t - 1), size=min(4, t // 8), replace=False))
        cuts = np.concatenate([[0], cuts[:1], cuts[:1] + 1, cuts[1:], [t]])  # [c0, c0+1): length 1
        rows.append(np.repeat(np.arange(len(cuts) - 1), np.diff(cuts)))
    return jnp.asarray(np.stack(rows), jnp.int32)


# (id, B, T, H, packed documents, A, O); interpret mode: one CTA tile, reduced head dims for one
# case (multiples of 64, as the kernels allow) to keep it fast.
ATTN_CASES = ([
    ("tiny_packed_ragged_t", 1, 100, 1, True, 128, 64),
    ("tiny_noseg", 1, 128, 1, False, A, O),
] if INTERPRET else [
    ("v3_packed", 1, 2048, V3.n_heads, True, A, O),
    ("v3_noseg", 1, 2048, V3.n_heads, False, A, O),
    ("small_packed_ragged_t", 2, 1000, SMALL.n_heads, True, A, O),
    ("small_noseg_ragged_t", 2, 1000, SMALL.n_heads, False, A, O),
])


@pytest.mark.parametrize("b, t, h, packed, a, o", [c[1:] for c in ATTN_CASES],
                         ids=[c[0] for c in ATTN_CASES])
def test_mla_attention_forward_and_backward_vs_reference(b, t, h, packed, a, o):
    """o and (dq, dk, dv) of the flash kernels (forward, dq, dk-dv) against the fp32 reference and
    its jax.vjp, with and without segment ids."""
    from dsv3_jax.ops.pallas import mla_attention_sm90

    kq, kk, kv, kd, ks = jax.random.split(jax.random.key(b * t + h), 5)
    q, k = _normal(kq, (b, t, h, a)), _normal(kk, (b, t, h, a))
    v, do = _normal(kv, (b, t, h, o)), _normal(kd, (b, t, h, o))
    seg = _documents(ks, b, t) if packed else None
    scale = float(V3.softmax_scale)

    def run(fn, q, k, v, do, **kw):
        out, pull = jax.vjp(lambda q, k, v: fn(q, k, v, scale=scale, segment_ids=seg, **kw),
                            q, k, v)
        return (out, *pull(do))

    got = _compiled(lambda *a: run(mla_attention_sm90.mla_attention, *a, interpret=INTERPRET))(
        q, k, v, do)
    ref = jax.jit(lambda *a: run(mla_attention_reference, *a))(*_f32(q, k, v, do))
    for name, g, r in zip(("o", "dq", "dk", "dv"), got, ref):
        assert g.dtype == jnp.bfloat16, name
        _check(g, r, 0.0, ATTN_RTOL, f"mla_attention {name}")


# ------------------------------------------------------------------------------------------------
# MLA latent decode
# ------------------------------------------------------------------------------------------------
# (id, B, T new tokens, H, C, S cache slots)
DECODE_CASES = ([
    ("tiny", 3, 1, 2, 128, 200),
    ("tiny_two_tokens", 2, 2, 2, 128, 130),
] if INTERPRET else [
    ("v3_b64_s4k", 64, 1, V3.n_heads, C, 4096),
    ("v3_b8_s32k", 8, 1, V3.n_heads, C, 32768),
    ("small_two_tokens_ragged_s", 4, 2, SMALL.n_heads, C, 1000),
])


@pytest.mark.parametrize("b, t, h, c, s", [c[1:] for c in DECODE_CASES],
                         ids=[c[0] for c in DECODE_CASES])
def test_mla_decode_vs_reference(b, t, h, c, s):
    """Per-sequence positions: sequence 0 at slot 0 (its first token), sequence 1 at the last
    slot, the others random; T new tokens at consecutive positions."""
    from dsv3_jax.ops.pallas import mla_decode_sm90

    kq, kp, kc, kpos = jax.random.split(jax.random.key(b * s + h + t), 4)
    q_lat, q_pe = _normal(kq, (b, t, h, c)), _normal(kp, (b, t, h, R))
    cache = _normal(kc, (b, s, c + R))
    last = np.array(jax.random.randint(kpos, (b,), 0, s - t + 1))
    last[0], last[1] = 0, s - t  # first token at slot 0; last token at slot S - 1
    pos = jnp.asarray(last[:, None] + np.arange(t)[None], jnp.int32)
    assert int(pos.min()) == 0 and int(pos.max()) == s - 1
    scale = float(V3.softmax_scale)
    out = _compiled(lambda *a: mla_decode_sm90.mla_decode(*a, scale=scale, interpret=INTERPRET))(
        q_lat, q_pe, cache, pos)
    ref = jax.jit(lambda *a: mla_decode_reference(*a, scale=scale))(
        *_f32(q_lat, q_pe, cache), pos)
    assert out.dtype == jnp.bfloat16 and out.shape == (b, t, h, c)
    for i in range(b):  # each sequence against its own scale (position 0 outputs are c_0 itself)
        _check(out[i], ref[i], 0.0, ATTN_RTOL, f"mla_decode sequence {i} (position {last[i]})")
