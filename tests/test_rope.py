"""RoPE and YaRN against SPEC.md section 2, with the constants written out."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

import dsv3_jax as ds
from dsv3_jax.model.rope import apply_rope, rope_frequencies, yarn_correction_range

from conftest import V2_STYLE
import reference


def test_671b_yarn_constants():
    cfg = ds.get_model_config("deepseek-v3-671b")
    assert yarn_correction_range(cfg) == (10, 23)
    # softmax scale = 192^-0.5 * (0.1 * ln 40 + 1)^2
    assert cfg.softmax_scale == pytest.approx(0.1352338, abs=5e-8)
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2, rel=1e-12)
    f = rope_frequencies(cfg)
    base = 10000.0 ** (-np.arange(0, 64, 2) / 64)
    # Below the ramp (fast-rotating pairs, i <= 10): unchanged; above it (i >= 23): divided by 40.
    np.testing.assert_allclose(f[:11], base[:11], rtol=1e-15)
    np.testing.assert_allclose(f[23:], base[23:] / 40, rtol=1e-15)
    i = 16  # inside the ramp: ramp = (16 - 10) / 13
    r = 6 / 13
    assert f[i] == pytest.approx(base[i] / 40 * r + base[i] * (1 - r), rel=1e-14)


def test_no_yarn_within_the_original_context():
    cfg = ds.get_model_config("small")
    assert not cfg.use_yarn
    assert cfg.softmax_scale == 192 ** -0.5
    np.testing.assert_allclose(rope_frequencies(cfg), 10000.0 ** (-np.arange(0, 64, 2) / 64), rtol=1e-15)


def test_yarn_frequencies_match_the_reference_equations():
    np.testing.assert_allclose(rope_frequencies(V2_STYLE), reference.rope_frequencies(V2_STYLE), rtol=1e-14)
    assert V2_STYLE.softmax_scale == pytest.approx(reference.softmax_scale(V2_STYLE), rel=1e-14)


def test_equal_corr_dims_widen_the_ramp():
    # d = 4 and a huge original context: corr_dim(32) = 3.36 -> floor 3; corr_dim(1) = 4.11 ->
    # ceil 5, clipped to d - 1 = 3. low == high, so high gains 0.001 (reference code).
    cfg = ds.get_model_config("tiny", qk_rope_head_dim=4, original_seq_len=2 ** 30,
                              max_seq_len=2 ** 30 + 1)
    assert yarn_correction_range(cfg) == (3, 3.001)
    np.testing.assert_allclose(rope_frequencies(cfg), reference.rope_frequencies(cfg), rtol=1e-15)


def test_interleaved_pairs_rotate_together():
    """Pairs are (2i, 2i+1): rotating e_{2i} at position p gives cos/sin in dims 2i, 2i+1 only."""
    r = 8
    freqs = np.array([1.0, 0.5, 0.25, 0.125])
    positions = jnp.array([[3]])
    for i in range(r // 2):
        x = np.zeros((1, 1, r), np.float32)
        x[..., 2 * i] = 1.0
        y = np.asarray(apply_rope(jnp.asarray(x), positions, freqs))[0, 0]
        expected = np.zeros(r)
        expected[2 * i], expected[2 * i + 1] = math.cos(3 * freqs[i]), math.sin(3 * freqs[i])
        np.testing.assert_allclose(y, expected, atol=1e-6)


def test_rope_matches_complex_multiplication():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 7, 3, 16)).astype(np.float32)  # [B, T, H, R]
    positions = rng.integers(0, 1000, (2, 7))
    freqs = reference.rope_frequencies(V2_STYLE)
    y = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(positions), freqs))
    for b in range(2):
        expected = reference.rope(x[b].astype(np.float64), positions[b], freqs)
        # float32 angles up to 1000 rad: ~1e-4 absolute phase error.
        np.testing.assert_allclose(y[b], expected, atol=2e-4)
    # Keeps dtype; rotation preserves the norm of each pair.
    yb = apply_rope(jnp.asarray(x, jnp.bfloat16), jnp.asarray(positions), freqs)
    assert yb.dtype == jnp.bfloat16
    pair_norm = lambda a: np.hypot(a[..., 0::2], a[..., 1::2])
    np.testing.assert_allclose(pair_norm(y), pair_norm(x), rtol=1e-5)
