"""The attention cores' jnp references (what the Pallas kernels will be tested against) against
float64 numpy loops, and the absorbed-MLA identity on the cores themselves."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from dsv3_jax.ops.attention import mla_attention_reference, mla_decode_reference

from conftest import assert_close
import reference


def _numpy_attention(q, k, v, scale, segment_ids):
    b, t, h, _ = q.shape
    out = np.zeros((b, t, h, v.shape[-1]))
    for bi in range(b):
        for hi in range(h):
            for i in range(t):
                keys = [j for j in range(i + 1) if segment_ids[bi, j] == segment_ids[bi, i]]
                s = np.array([q[bi, i, hi] @ k[bi, j, hi] for j in keys]) * scale
                out[bi, i, hi] = reference.softmax(s) @ v[bi, keys, hi]
    return out


def test_training_attention_with_segments_matches_numpy():
    rng = np.random.default_rng(0)
    b, t, h, dk, dv = 2, 9, 3, 12, 8
    q, k = (rng.standard_normal((b, t, h, dk)) for _ in range(2))
    v = rng.standard_normal((b, t, h, dv))
    segments = np.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1] * 9])
    got = mla_attention_reference(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), scale=0.3,
                                  segment_ids=jnp.asarray(segments))
    assert got.shape == (b, t, h, dv) and got.dtype == jnp.float32
    assert_close(got, _numpy_attention(q, k, v, 0.3, segments), 1e-5, "attention")
    plain = mla_attention_reference(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), scale=0.3)
    assert_close(plain, _numpy_attention(q, k, v, 0.3, np.ones((b, t))), 1e-5, "no segments")


def test_decode_core_matches_numpy_and_ignores_future_slots():
    rng = np.random.default_rng(1)
    b, t, h, c, r, s = 2, 3, 4, 16, 6, 10
    q_lat, q_pe = rng.standard_normal((b, t, h, c)), rng.standard_normal((b, t, h, r))
    cache = rng.standard_normal((b, s, c + r))
    positions = np.array([[4, 5, 6], [0, 1, 9]])
    got = mla_decode_reference(jnp.asarray(q_lat, jnp.float32), jnp.asarray(q_pe, jnp.float32),
                               jnp.asarray(cache, jnp.float32), jnp.asarray(positions), scale=0.2)
    expected = np.zeros((b, t, h, c))
    for bi in range(b):
        for ti in range(t):
            rows = cache[bi, :positions[bi, ti] + 1]
            for hi in range(h):
                sc = (rows[:, :c] @ q_lat[bi, ti, hi] + rows[:, c:] @ q_pe[bi, ti, hi]) * 0.2
                expected[bi, ti, hi] = reference.softmax(sc) @ rows[:, :c]
    assert_close(got, expected, 1e-5, "decode")
    # Garbage in slots past a query's position changes nothing.
    poisoned = cache.copy()
    poisoned[0, 7:] = 1e3
    got2 = mla_decode_reference(jnp.asarray(q_lat, jnp.float32), jnp.asarray(q_pe, jnp.float32),
                                jnp.asarray(poisoned, jnp.float32), jnp.asarray(positions), scale=0.2)
    np.testing.assert_array_equal(got2[0], got[0])


def test_absorbed_form_equals_naive_form():
    """SPEC.md: q_nope . (W_k c) = (q_nope W_k) . c and P (c W_v) = (P c) W_v."""
    rng = np.random.default_rng(2)
    t, h, n, rr, vd, c = 7, 3, 8, 4, 5, 12
    q_nope, q_pe = rng.standard_normal((1, t, h, n)), rng.standard_normal((1, t, h, rr))
    lat, k_pe = rng.standard_normal((1, t, c)), rng.standard_normal((1, t, rr))
    w_k, w_v = rng.standard_normal((c, h, n)), rng.standard_normal((c, h, vd))
    k = np.concatenate([np.einsum("btc,chn->bthn", lat, w_k),
                        np.broadcast_to(k_pe[:, :, None], (1, t, h, rr))], -1)
    v = np.einsum("btc,chv->bthv", lat, w_v)
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    naive = mla_attention_reference(f32(np.concatenate([q_nope, q_pe], -1)), f32(k), f32(v), scale=0.25)
    o_lat = mla_decode_reference(f32(np.einsum("bthn,chn->bthc", q_nope, w_k)), f32(q_pe),
                                 f32(np.concatenate([lat, k_pe], -1)), jnp.arange(t)[None], scale=0.25)
    absorbed = jnp.einsum("bthc,chv->bthv", o_lat, f32(w_v))
    assert_close(absorbed, naive, 1e-5, "absorbed vs naive")
