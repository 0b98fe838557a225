"""The latent MLA decode kernel (ops/pallas/mla_decode_sm90.py): its dims and register-budget
refusals, and the kernel against `ops.attention.mla_decode_reference` in GPU interpret mode.

Tolerance (as in tests/test_mla_kernels.py): inputs bf16 ~ N(0, 1); kernel and reference compute
the scores and softmax in fp32 from the same bf16 inputs, the kernel feeds its unnormalised P to
the value product in bf16 after an online softmax and rounds each split's partial output to bf16
before the combine, the reference rounds its normalised P to bf16; both round the output to bf16.
Every output element is a convex combination of values of size <= ~4, so the two differ by a few
bf16 ulps of the output scale: 2^-6 of max|reference|. A wrong mask, block index or scale is off by
order 1; slots no query may see hold large values (30) so that a leak cannot hide.

Interpret mode runs the CTA's warpgroups as threads blocking in host callbacks; with asynchronous
CPU dispatch they can starve the XLA client's small thread pool, so dispatch is synchronous here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv3_jax.ops.attention import mla_decode_reference
from dsv3_jax.ops.pallas import mla_decode_sm90 as dec
from dsv3_jax.ops.pallas.hopper import SMEM_BYTES

from conftest import assert_close

KERNEL_RTOL = 2.0 ** -6  # see the module docstring
BF16 = (jnp.bfloat16,) * 3
V3 = ((64, 1, 128, 512), (64, 1, 128, 64), (64, 4096, 576), (64, 1))  # B 64, H 128, 4096 slots
SMALL = ((8, 1, 16, 512), (8, 1, 16, 64), (8, 32768, 576), (8, 1))  # the small config's dims


@pytest.fixture(autouse=True, scope="module")
def _synchronous_cpu_dispatch():
    old = jax.config.values["jax_cpu_enable_async_dispatch"]
    jax.config.update("jax_cpu_enable_async_dispatch", False)
    yield
    jax.config.update("jax_cpu_enable_async_dispatch", old)


def _shapes(b, t, h, c, r, s):
    return (b, t, h, c), (b, t, h, r), (b, s, c + r), (b, t)


def test_rope_dim_must_divide_the_latent_rank():
    """R = 256 with C = 384, and R = 192 with C = 512: both multiples the other checks accept,
    but the k_pe box (block C // R of width R) would start inside the latent columns."""
    for c, r in ((384, 256), (512, 192), (128, 256)):
        shapes = _shapes(1, 1, 2, c, r, 64)
        with pytest.raises(ValueError, match=rf"rope dim {r} must divide latent rank {c}"):
            dec.check_dims(*shapes, BF16)
        assert not dec.supports(*shapes, BF16)
    for c, r in ((512, 64), (384, 128), (256, 256), (128, 128)):
        assert dec.supports(*_shapes(1, 1, 2, c, r, 64), BF16), (c, r)


def test_default_config_within_the_register_budget_at_v3_and_small_dims():
    for shapes in (V3, SMALL):
        dec.check_dims(*shapes, BF16)  # no refusal
        assert dec.supports(*shapes, BF16)
    assert dec.registers_needed(dec.DEFAULT_CONFIG, 512, 64) <= dec.COMPUTE_REGISTERS == 232


def test_spilling_config_refused_before_lowering():
    """block_s 192 at C 128, R 64 fits in shared memory (so only the register check can refuse
    it) and ptxas spills it (8 B stored, mosaic_ptxas_check.py; registers_needed's table).
    mla_decode refuses it in check_dims, before any kernel is built or interpreted."""
    cfg = dec.DecodeConfig(block_s=192)
    assert dec.smem_bytes(cfg, 128, 64) <= SMEM_BYTES
    shapes = _shapes(1, 1, 2, 128, 64, 384)
    with pytest.raises(ValueError, match=r"needs about 240 registers per thread in its compute "
                                         r"warpgroups, over the 232"):
        dec.check_dims(*shapes, BF16, cfg)
    q_lat, q_pe, cache = (jnp.ones(s, jnp.bfloat16) for s in shapes[:3])
    with pytest.raises(ValueError, match="registers"):
        dec.mla_decode(q_lat, q_pe, cache, jnp.zeros((1, 1), jnp.int32), scale=0.1, config=cfg,
                       interpret=True)
    # At C 128, block_s 128 compiles clean (0 spills) and passes.
    dec.check_dims(*shapes, BF16, dec.DecodeConfig(block_s=128))
    # At V3 dims block_s 128 spills (48 B) and is over the budget too (shared memory refuses it
    # first); block_s past the score wgmma's N = 256 is a config error.
    assert dec.registers_needed(dec.DecodeConfig(block_s=128), 512, 64) > dec.COMPUTE_REGISTERS
    with pytest.raises(ValueError, match="shared memory"):
        dec.check_dims(*V3, BF16, dec.DecodeConfig(block_s=128))
    with pytest.raises(ValueError, match="block_s"):
        dec.DecodeConfig(block_s=320)


def _case(seed, b, t, h, c, r, s):
    rng = np.random.default_rng(seed)
    bf16 = lambda shape: jnp.asarray(rng.standard_normal(shape), jnp.bfloat16)
    return bf16((b, t, h, c)), bf16((b, t, h, r)), bf16((b, s, c + r))


def _poison_unseen(cache, pos):
    """Slots past every query of their sequence set to 30: any leak through the mask shows."""
    last = np.asarray(pos).max(axis=1)
    for b, p in enumerate(last):
        cache = cache.at[b, p + 1:].set(30.0)
    return cache


@pytest.mark.parametrize("splits", [2, 4])
def test_kernel_matches_reference_per_sequence_positions(splits):
    """Three sequences, two new tokens each, 3 heads (6 query rows padded to one 64-row tile), 256
    slots in four 64-slot blocks over `splits` splits: one sequence with both queries inside the
    first block (later splits see nothing, lse = -inf), one ending mid-cache, one seeing all of it.
    Splits of two blocks hand P over between the warpgroups several times (q's views re-indexed
    in the loop, the rescale factor applied by both); splits of one block hand it over once."""
    b, t, h, c, r, s = 3, 2, 3, 128, 64, 256
    q_lat, q_pe, cache = _case(11 + splits, b, t, h, c, r, s)
    pos = jnp.asarray([[3, 4], [129, 130], [254, 255]], jnp.int32)
    cache = _poison_unseen(cache, pos)
    cfg = dec.DecodeConfig(splits=splits)
    out = dec.mla_decode(q_lat, q_pe, cache, pos, scale=0.08, config=cfg, interpret=True)
    assert out.shape == (b, t, h, c) and out.dtype == jnp.bfloat16
    ref = mla_decode_reference(q_lat, q_pe, cache, pos, scale=0.08)
    assert_close(out, ref, KERNEL_RTOL, f"decode, {splits} splits")


def test_kernel_matches_reference_two_row_tiles_rope_128():
    """R = 128 (dividing C = 256), two tokens of 40 heads (80 rows: two row tiles, the second
    ragged, with different positions in one tile), one split of a cache of 200 slots (padded to
    four blocks; no combine) and a sequence whose positions lie in the first block."""
    b, t, h, c, r, s = 2, 2, 40, 256, 128, 200
    q_lat, q_pe, cache = _case(21, b, t, h, c, r, s)
    pos = jnp.asarray([[9, 10], [169, 170]], jnp.int32)
    cache = _poison_unseen(cache, pos)
    cfg = dec.DecodeConfig(splits=1)
    out = dec.mla_decode(q_lat, q_pe, cache, pos, scale=0.06, config=cfg, interpret=True)
    ref = mla_decode_reference(q_lat, q_pe, cache, pos, scale=0.06)
    assert_close(out, ref, KERNEL_RTOL, "decode, two row tiles, R 128")


@pytest.mark.gpu
@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="needs a GPU")
def test_kernel_on_the_gpu_at_the_small_config_dims():
    """Compiled at the small config's dims (B 8, H 16, 32K slots, default splits), positions
    spread over the cache, one inside the first block."""
    b, t, h, c, r, s = 8, 1, 16, 512, 64, 32768
    q_lat, q_pe, cache = _case(31, b, t, h, c, r, s)
    pos = jnp.asarray([[5], [63], [64], [1000], [4095], [20000], [32766], [32767]], jnp.int32)
    out = dec.mla_decode(q_lat, q_pe, cache, pos, scale=0.135)
    assert_close(out, mla_decode_reference(q_lat, q_pe, cache, pos, scale=0.135), KERNEL_RTOL,
                 "decode on the GPU, small config dims")
