"""The latent MLA decode kernel for TPU (ops/pallas/mla_decode_tpu.py): in TPU interpret mode on
the CPU against `ops.attention.mla_decode_reference`, its dims and config refusals, and its export
for "tpu" at V3 dims (the Mosaic TPU lowering, without a TPU).

Tolerances. bf16 inputs ~ N(0, 1) from jax.random (never zeros). Kernel and reference compute the
scores and softmax in fp32 from the same bf16 inputs; the kernel feeds its unnormalised P (after
an online softmax) to the value product in bf16, the reference its normalised P; both round the
output to bf16, and with several splits the kernel combines fp32 partials. Every output element
is a convex combination of values of size <= ~4, so the two differ by a few bf16 ulps of the
output scale: `attention.KERNEL_RTOL` (2^-6) of max|reference|, the bound of every attention
kernel here. fp32 inputs: no rounding to 16 bits anywhere, only the online softmax's different
order of fp32 operations (exp of shifted scores, rescaled sums over <= 512 slots): relative
errors of order 1e-6; we allow 1e-5 of max|reference|, which a bf16 rounding of P (2^-9) would
break. A wrong mask, block index, split combine or scale is off by order 1.

Junk: every test writes large random values (1e4 x (1 + |N(0, 1)|), either sign, finite) in the
cache slots past each sequence's largest position, inside the last visible block and in the blocks
past it, and compares against the reference on the clean cache: a slot leaking into a visible score or value
moves the output by orders of magnitude more than the tolerance.

Shapes are small (C 128 or 512, R 64, H 2-4, S of 3-4 blocks of 128) so that each interpret-mode
call takes seconds; the V3 shapes are only lowered (`jax.export`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.ops.attention import KERNEL_RTOL, mla_decode_reference
from dsv3_jax.ops.pallas import mla_decode_tpu as dec

from conftest import assert_close

FP32_RTOL = 1e-5  # see the module docstring
JUNK = 1e4
BF16 = (jnp.bfloat16,) * 3
V3 = ((64, 1, 128, 512), (64, 1, 128, 64), (64, 4096, 576), (64, 1))  # B 64, H 128, 4096 slots
SMALL = ((8, 1, 128, 512), (8, 1, 128, 64), (8, 32768, 576), (8, 1))  # B 8, 32K slots


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4, 5, 6))
def _inputs(positions, t, h, c, r, s, dtype):
    """q_latent, q_pe, the clean cache and the cache with junk in every slot past the
    sequence's largest position (one compiled program: eager jax.random compiles per op)."""
    b = positions.shape[0]
    kq, kp, kc, kj = jax.random.split(jax.random.key(b * 1000 + s), 4)
    q_lat = jax.random.normal(kq, (b, t, h, c), jnp.float32).astype(dtype)
    q_pe = jax.random.normal(kp, (b, t, h, r), jnp.float32).astype(dtype)
    cache = jax.random.normal(kc, (b, s, c + r), jnp.float32).astype(dtype)
    n = jax.random.normal(kj, cache.shape, jnp.float32)
    junk = (JUNK * jnp.where(n >= 0, 1 + n, n - 1)).astype(dtype)  # |junk| >= JUNK, either sign
    past = jnp.arange(s)[None, :] > positions.max(axis=1)[:, None]  # [B, S]
    return q_lat, q_pe, cache, jnp.where(past[..., None], junk, cache)


def _check(positions, *, t, h, c, r, s, dtype, rtol, config):
    """Kernel (junk past every position) vs the reference (clean cache) at the given positions
    [B, T]."""
    positions = jnp.asarray(positions, jnp.int32)
    q_lat, q_pe, cache, dirty = _inputs(positions, t, h, c, r, s, dtype)
    past = np.arange(s)[None, :] > np.asarray(positions).max(axis=1)[:, None]
    assert np.all(np.abs(np.asarray(dirty, np.float32)[past]) >= JUNK / 2), "junk must be written"
    scale = (c + r) ** -0.5
    got = jax.jit(functools.partial(dec.mla_decode, scale=scale, config=config, interpret=True))(
        q_lat, q_pe, dirty, positions)
    want = jax.jit(functools.partial(mla_decode_reference, scale=scale))(
        q_lat, q_pe, cache, positions)
    assert got.shape == want.shape and got.dtype == want.dtype == q_lat.dtype
    assert_close(got, want, rtol, f"positions {positions.tolist()}")


# ------------------------------------------------------------------------------------------------
# The kernel in TPU interpret mode vs the reference
# ------------------------------------------------------------------------------------------------
def test_bf16_two_splits_positions_mid_block_and_at_block_edges():
    """B 3, T 2 (two consecutive queries, as in speculative decoding), H 2, C 128, 4 blocks of 128
    in 2 splits: one sequence mid first block, one across the edge of blocks 0 and 1 (slots 127,
    128), one at the last slot of the cache (every block, both splits)."""
    _check([[60, 61], [127, 128], [510, 511]], t=2, h=2, c=128, r=64, s=512,
           dtype=jnp.bfloat16, rtol=KERNEL_RTOL, config=dec.DecodeConfig(block_s=128, splits=2))


def test_fp32_v3_latent_rank_three_splits_of_one_block():
    """fp32 at C 512 (the V3 latent rank), T 1, H 4: three splits of one block each; a position
    at the first slot of a block (256: the third split sees one slot) and one at the last slot of
    the first block (the other splits see nothing: lse -inf in the combine)."""
    _check([[256], [127]], t=1, h=4, c=512, r=64, s=384, dtype=jnp.float32, rtol=FP32_RTOL,
           config=dec.DecodeConfig(block_s=128, splits=3))


def test_bf16_row_tiles_ragged_cache_and_default_splits():
    """T 5 x H 4 = 20 query rows in tiles of 16 (two row tiles, the second padded), per-query
    positions straddling a block edge (the row tiles have different visible limits), a cache of
    300 slots (padded to 3 blocks of 128), splits chosen by the default rule."""
    cfg = dec.DecodeConfig(block_s=128, block_rows=16)
    _check([[125, 126, 127, 128, 129], [3, 4, 5, 6, 7]], t=5, h=4, c=128, r=64, s=300,
           dtype=jnp.bfloat16, rtol=KERNEL_RTOL, config=cfg)


def test_default_config_short_cache_shrinks_the_block():
    """DEFAULT_CONFIG (block_s 512) on a 200-slot cache: one block of 256 (S rounded up to 128),
    one split; B 2, T 1, H 3 (6 rows padded to 16)."""
    _check([[199], [77]], t=1, h=3, c=128, r=64, s=200, dtype=jnp.bfloat16, rtol=KERNEL_RTOL,
           config=None)


# ------------------------------------------------------------------------------------------------
# Refusals
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shapes, dtypes, match", [
    (((2, 1, 4, 128), (2, 1, 4, 64), (2, 256, 190), (2, 1)), BF16,
     r"shapes do not agree: .*cache \(2, 256, 190\) \(expected \[2, S, 128 \+ 64\]"),
    (((2, 1, 4, 128), (2, 1, 3, 64), (2, 256, 192), (2, 1)), BF16, r"shapes do not agree"),
    (((2, 1, 4, 128), (2, 1, 4, 64), (3, 256, 192), (2, 1)), BF16, r"shapes do not agree"),
    (((2, 1, 4, 128), (2, 1, 4, 64), (2, 256, 192), (2, 2)), BF16,
     r"q_positions has shape \(2, 2\); expected \(2, 1\)"),
    (((2, 1, 4, 128), (2, 1, 4, 64), (2, 256), (2, 1)), BF16, r"must be \[B, T, H, \*\]"),
    (((2, 1, 4, 96), (2, 1, 4, 64), (2, 256, 160), (2, 1)), BF16,
     r"latent rank 96 must be a multiple of 128"),
    (((2, 1, 4, 128), (2, 1, 4, 32), (2, 256, 160), (2, 1)), BF16,
     r"rope dim 32 a multiple of 64"),
    (((2, 1, 4, 128), (2, 1, 4, 64), (2, 256, 192), (2, 1)),
     (jnp.bfloat16, jnp.bfloat16, jnp.float32), r"must all be bfloat16 .*cast them"),
    (((2, 1, 4, 128), (2, 1, 4, 64), (2, 256, 192), (2, 1)), (jnp.float16,) * 3,
     r"must all be bfloat16 \(or all float32\), got \['float16'"),
    (((2, 1, 4, 128), (2, 1, 4, 64), (2, 0, 192), (2, 1)), BF16, r"no slots"),
])
def test_check_dims_refuses_with_a_one_line_message(shapes, dtypes, match):
    with pytest.raises(ValueError, match=match) as err:
        dec.check_dims(*shapes, dtypes)
    assert "\n" not in str(err.value) and str(err.value).startswith("mla_decode_tpu: ")
    assert not dec.supports(*shapes, dtypes)


def test_mla_decode_refuses_before_building_a_kernel():
    args = [jax.ShapeDtypeStruct(s, d) for s, d in zip(
        ((2, 1, 2, 128), (2, 1, 2, 64), (2, 256, 192), (2, 3)), (*BF16, jnp.int32))]
    with pytest.raises(ValueError, match="q_positions has shape"):
        jax.eval_shape(functools.partial(dec.mla_decode, scale=0.1, interpret=True), *args)


def test_check_dims_refuses_a_config_over_vmem():
    cfg = dec.DecodeConfig(block_s=8192, block_rows=1024)
    shapes = ((8, 8, 128, 512), (8, 8, 128, 64), (8, 32768, 576), (8, 8))
    with pytest.raises(ValueError, match=r"bytes of VMEM .* use a smaller block_s or block_rows"):
        dec.check_dims(*shapes, BF16, cfg)
    dec.check_dims(*shapes, BF16)  # the default config fits


@pytest.mark.parametrize("field, value", [("block_s", 100), ("block_s", 0), ("block_rows", 24),
                                          ("splits", 0), ("cores", 0)])
def test_config_refuses_bad_fields(field, value):
    with pytest.raises(ValueError, match=rf"DecodeConfig\.{field}={value}: must be"):
        dec.DecodeConfig(**{field: value})


def test_supports_v3_dims_and_defaults():
    assert dec.supports(*V3, BF16) and dec.supports(*SMALL, BF16)
    assert dec.supports(*V3, (jnp.float32,) * 3)
    assert dec.DEFAULT_CONFIG == dec.DecodeConfig(block_s=512, block_rows=256, splits=None,
                                                  cores=2)
    assert dec.vmem_bytes(128, 512, 512, 64, 2) < dec.VMEM_BUDGET


def test_choose_splits():
    cfg = dec.DEFAULT_CONFIG
    assert dec.choose_splits(64, 1, 8, cfg) == 1  # the batch feeds both TensorCores
    assert dec.choose_splits(1, 1, 64, cfg) == 2  # one sequence: split the cache for two cores
    assert dec.choose_splits(1, 1, 3, cfg) == 1  # no split shorter than two blocks
    assert dec.choose_splits(1, 1, 3, dec.DecodeConfig(splits=8)) == 3  # at most one per block


# ------------------------------------------------------------------------------------------------
# Lowering for TPU without one
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shapes", [V3, SMALL], ids=["B64_S4096", "B8_S32768"])
def test_exports_for_tpu_at_v3_dims(shapes):
    """jax.export for platform "tpu" runs the Pallas -> Mosaic lowering on the CPU: the module
    holds one Mosaic TPU custom call (Mosaic's own compile happens on the TPU, untested here)."""
    args = [jax.ShapeDtypeStruct(s, d) for s, d in
            zip(shapes, (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16, jnp.int32))]
    fn = functools.partial(dec.mla_decode, scale=(512 + 64) ** -0.5)
    exported = jax.export.export(jax.jit(fn), platforms=["tpu"])(*args)
    text = exported.mlir_module()
    assert text.count("tpu_custom_call") >= 1, text[:2000]
    assert exported.out_avals[0].shape == shapes[0]
    assert exported.out_avals[0].dtype == jnp.bfloat16
