"""MLA attention in plain jnp that never materialises [T, S] scores: blocks and an online softmax.

Letters (dsv3_jax/NOTATION.md): B batch, T query positions, S key positions or cache slots,
H heads, A qk head dim, O v head dim, C kv latent rank, R qk rope head dim. Block sizes: bq query
rows and bk keys (training), bs cache slots (decode).

These are the contracts of `ops.attention.mla_attention_reference` and
`ops.attention.mla_decode_reference` (the same masks, float32 scores, softmax and sums, the query
dtype out), computed block by block so that the largest temporary is one block's scores
[B, H, bq, bk] (or [B, T, H, bs]) instead of [B, H, T, S]. They run wherever XLA does (CPU, any GPU,
TPU) and are what `ops.attention` picks above a sequence length where no kernel applies.

Training / prefill (`mla_attention_chunked`), flash attention's algorithm in jnp:

  forward, for each query block i (a `lax.fori_loop`) over the key blocks j <= the last one its
  rows can see (causal block skipping: a dynamic trip count, so blocks above the diagonal cost
  nothing), keeping per row the running max m, the running sum l and the unnormalised output acc:
      s    = scale * q_i k_j^T                     [B, H, bq, bk] fp32, masked (causal, segments)
      m'   = max(m, rowmax s);  p = exp(s - m');  l = l e^(m - m') + rowsum p
      acc  = acc e^(m - m') + p v_j                [B, bq, H, O] fp32
  then out_i = acc / l and lse_i = m + log l, the row's log-sum-exp, saved for the backward.

  backward (a custom_vjp: nothing of the forward's loop is stored), for each key block j over the
  query blocks i >= the first that sees it, with delta = rowsum(dout * out):
      p    = exp(scale * q_i k_j^T - lse_i)        the probabilities, recomputed exactly
      dv_j += p^T dout_i;  dp = dout_i v_j^T;  ds = p (dp - delta_i)
      dk_j += scale ds^T q_i;  dq_i += scale ds k_j
  dk_j and dv_j stay in the loop's carry; dq accumulates in a [B, T, H, A] fp32 buffer.

  T is padded up to a multiple of the block (a padded key sits past every real query, so the causal
  mask hides it; padded query rows are sliced away and get a zero cotangent). Every real row sees at
  least itself, so l > 0. A block's scores for a row that sees none of its keys are -inf and add
  exp(-inf) = 0 (m is kept finite for such rows, see `_NEG`).

Decode over the latent cache (`mla_decode_chunked`), split-KV in a loop: the cache rows
[c (C) | k_pe (R)] are scanned in blocks of bs slots up to the last slot any query may see (a
dynamic trip count), with the same online softmax; the last block is read at a start clamped to
S - bs (no copy of the cache to pad it) and its slots already seen are masked out. Inference only
(no gradient is defined through the dynamic loop).

Precision: scores, softmax and both products in float32 (the operands are upcast, which is exact
for bf16); the reference instead rounds its normalised probabilities to v's dtype before P V, so in
bf16 the two differ by about that rounding (within KERNEL_RTOL of ops/attention.py); in float32
they agree to about 1e-6 relative (tests/test_chunked_attention.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

# Default block sizes: a [B, H, 512, 512] fp32 block of scores is 1 MiB per (sequence, head).
BLOCK_Q = 512
BLOCK_K = 512
BLOCK_S = 1024
# A finite stand-in for -inf as the running max of a row that has seen no key yet, so that
# exp(s - m) with s = -inf is 0 and exp(m_old - m_new) never computes inf - inf.
_NEG = -1e30


def _f32(x):
    return x.astype(jnp.float32)


def _pad_time(x, multiple: int):
    extra = -x.shape[1] % multiple
    return x if not extra else jnp.pad(x, ((0, 0), (0, extra)) + ((0, 0),) * (x.ndim - 2))


def _block(x, start, size):
    """x[:, start:start + size] along axis 1 (start traced)."""
    return lax.dynamic_slice_in_dim(x, start, size, axis=1)


def _mask(i0, j0, bq, bk, seg_q, seg_k):
    """[B or 1, 1, bq, bk] bool: key index <= query index, and the same segment when given."""
    rows = i0 + jnp.arange(bq)[:, None]
    cols = j0 + jnp.arange(bk)[None, :]
    mask = (cols <= rows)[None, None]
    if seg_q is not None:
        mask = mask & (seg_q[:, None, :, None] == seg_k[:, None, None, :])
    return mask


def _scores(q_i, k_j, scale, mask):
    """scale * q_i k_j^T, masked with -inf: q_i [B, bq, H, A], k_j [B, bk, H, A] ->
    [B, H, bq, bk]."""
    s = jnp.einsum("btha,bsha->bhts", _f32(q_i), _f32(k_j)) * scale
    return jnp.where(mask, s, -jnp.inf)


def _forward(q, k, v, seg, scale, bq, bk):
    """Padded q, k [B, Tp, H, A], v [B, Tp, H, O], seg [B, Tp] or None ->
    (out [B, Tp, H, O] fp32, lse [B, H, Tp] fp32)."""
    b, tp, h, _ = q.shape
    o = v.shape[-1]

    def query_block(i, carry):
        out, lse = carry
        i0 = i * bq
        q_i = _block(q, i0, bq)
        seg_i = None if seg is None else _block(seg, i0, bq)

        def key_block(j, state):
            m, l, acc = state
            j0 = j * bk
            seg_j = None if seg is None else _block(seg, j0, bk)
            s = _scores(q_i, _block(k, j0, bk), scale, _mask(i0, j0, bq, bk, seg_i, seg_j))
            m_new = jnp.maximum(m, s.max(-1))
            p = jnp.exp(s - m_new[..., None])
            alpha = jnp.exp(m - m_new)
            l = l * alpha + p.sum(-1)
            acc = (acc * jnp.swapaxes(alpha, 1, 2)[..., None]
                   + jnp.einsum("bhts,bsho->btho", p, _f32(_block(v, j0, bk))))
            return m_new, l, acc

        init = (jnp.full((b, h, bq), _NEG, jnp.float32), jnp.zeros((b, h, bq), jnp.float32),
                jnp.zeros((b, bq, h, o), jnp.float32))
        last = (i0 + bq - 1) // bk  # the last key block any row of this block sees
        m, l, acc = lax.fori_loop(0, last + 1, key_block, init)
        out_i = acc / jnp.swapaxes(l, 1, 2)[..., None]
        out = lax.dynamic_update_slice_in_dim(out, out_i, i0, axis=1)
        lse = lax.dynamic_update_slice_in_dim(lse, m + jnp.log(l), i0, axis=2)
        return out, lse

    init = (jnp.zeros((b, tp, h, o), jnp.float32), jnp.zeros((b, h, tp), jnp.float32))
    return lax.fori_loop(0, tp // bq, query_block, init)


def _backward(q, k, v, seg, out, lse, dout, scale, bq, bk):
    """The padded inputs, out [B, Tp, H, O] fp32, lse [B, H, Tp], dout [B, Tp, H, O] ->
    (dq, dk, dv) fp32, each shaped like its input."""
    b, tp, h, a = q.shape
    o = v.shape[-1]
    dout = _f32(dout)
    delta = jnp.einsum("btho,btho->bht", dout, out)  # rowsum(dout * out)

    def key_block(j, carry):
        dq, dk, dv = carry
        j0 = j * bk
        k_j, v_j = _f32(_block(k, j0, bk)), _f32(_block(v, j0, bk))
        seg_j = None if seg is None else _block(seg, j0, bk)

        def query_block(i, state):
            dq, dk_j, dv_j = state
            i0 = i * bq
            q_i = _f32(_block(q, i0, bq))
            seg_i = None if seg is None else _block(seg, i0, bq)
            s = _scores(q_i, k_j, scale, _mask(i0, j0, bq, bk, seg_i, seg_j))
            p = jnp.exp(s - lax.dynamic_slice_in_dim(lse, i0, bq, axis=2)[..., None])
            do_i = _block(dout, i0, bq)
            dv_j = dv_j + jnp.einsum("bhts,btho->bsho", p, do_i)
            dp = jnp.einsum("btho,bsho->bhts", do_i, v_j)
            ds = p * (dp - lax.dynamic_slice_in_dim(delta, i0, bq, axis=2)[..., None]) * scale
            dk_j = dk_j + jnp.einsum("bhts,btha->bsha", ds, q_i)
            dq_i = _block(dq, i0, bq) + jnp.einsum("bhts,bsha->btha", ds, k_j)
            return lax.dynamic_update_slice_in_dim(dq, dq_i, i0, axis=1), dk_j, dv_j

        init = (dq, jnp.zeros((b, bk, h, a), jnp.float32), jnp.zeros((b, bk, h, o), jnp.float32))
        first = j0 // bq  # the first query block that sees a key of this block
        dq, dk_j, dv_j = lax.fori_loop(first, tp // bq, query_block, init)
        dk = lax.dynamic_update_slice_in_dim(dk, dk_j, j0, axis=1)
        dv = lax.dynamic_update_slice_in_dim(dv, dv_j, j0, axis=1)
        return dq, dk, dv

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    return lax.fori_loop(0, tp // bk, key_block, (zeros(q), zeros(k), zeros(v)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, seg, scale, bq, bk):
    return _forward(q, k, v, seg, scale, bq, bk)[0]


def _flash_fwd(q, k, v, seg, scale, bq, bk):
    out, lse = _forward(q, k, v, seg, scale, bq, bk)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(scale, bq, bk, residuals, dout):
    q, k, v, seg, out, lse = residuals
    dq, dk, dv = _backward(q, k, v, seg, out, lse, dout, scale, bq, bk)
    dseg = None if seg is None else jnp.zeros(seg.shape, jax.dtypes.float0)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), dseg


_flash.defvjp(_flash_fwd, _flash_bwd)


def _check_blocks(**blocks):
    for name, value in blocks.items():
        if not (isinstance(value, int) and value >= 1):
            raise ValueError(f"chunked attention: {name}={value!r}; a block size is a positive "
                             "int.")


def mla_attention_chunked(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                          segment_ids: jax.Array | None = None, block_q: int | None = None,
                          block_k: int | None = None) -> jax.Array:
    """Causal attention, qk head dim A, v head dim O, block by block (module docstring).

    Args:
      q: [B, T, H, A]; k: [B, T, H, A]; v: [B, T, H, O].
      scale: softmax scale.
      segment_ids: optional int [B, T]; a query attends only to keys of its own segment.
      block_q, block_k: query rows and keys per block (default BLOCK_Q, BLOCK_K; each capped at T
        rounded up to 8).
    Returns:
      [B, T, H, O] in q's dtype; differentiable in q, k and v (custom_vjp).
    """
    block_q = BLOCK_Q if block_q is None else block_q
    block_k = BLOCK_K if block_k is None else block_k
    _check_blocks(block_q=block_q, block_k=block_k)
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"chunked attention: q {q.shape}, k {k.shape}, v {v.shape}; expected q "
                         "and k [B, T, H, A] and v [B, T, H, O].")
    t = q.shape[1]
    cap = -(-t // 8) * 8
    bq, bk = min(block_q, cap), min(block_k, cap)
    multiple = math.lcm(bq, bk)
    q_p, k_p, v_p = (_pad_time(x, multiple) for x in (q, k, v))
    seg = None if segment_ids is None else _pad_time(segment_ids.astype(jnp.int32), multiple)
    out = _flash(q_p, k_p, v_p, seg, float(scale), bq, bk)
    return out[:, :t].astype(q.dtype)


def mla_decode_chunked(q_latent: jax.Array, q_pe: jax.Array, cache: jax.Array,
                       q_positions: jax.Array, *, scale: float,
                       block_s: int | None = None) -> jax.Array:
    """Absorbed MLA attention over the latent cache, cache block by block (module docstring).

    Args:
      q_latent: [B, T, H, C]; q_pe: [B, T, H, R].
      cache: [B, S, C + R], rows `[kv_norm(c_kv) | rope'd k_pe]`; slot s holds position s.
      q_positions: int [B, T]; a query sees the slots <= its position.
      scale: softmax scale.
      block_s: cache slots per block (default BLOCK_S; capped at S).
    Returns:
      [B, T, H, C] in q_latent's dtype. Not differentiable (inference).
    """
    block_s = BLOCK_S if block_s is None else block_s
    _check_blocks(block_s=block_s)
    b, t, h, c_rank = q_latent.shape
    s_len = cache.shape[1]
    bs = min(block_s, s_len)
    ql, qp = _f32(q_latent), _f32(q_pe)
    pos = q_positions.astype(jnp.int32)
    # Slots beyond the last visible one of the whole batch are never read.
    n_blocks = jnp.minimum(jnp.max(pos) // bs + 1, -(-s_len // bs))

    def cache_block(j, state):
        m, l, acc = state
        j0 = j * bs
        start = jnp.minimum(j0, s_len - bs)  # the last block is read overlapping the one before
        rows = _f32(lax.dynamic_slice_in_dim(cache, start, bs, axis=1))
        c, k_pe = rows[..., :c_rank], rows[..., c_rank:]
        # [B, T, H, bs]: the (t, h) query rows side by side, one matmul against the shared rows
        # (2.5x faster on a CPU than a [B, H, T, bs] layout).
        s = (jnp.einsum("bthc,bsc->bths", ql, c) + jnp.einsum("bthr,bsr->bths", qp, k_pe)) * scale
        slots = start + jnp.arange(bs)
        visible = (slots[None, None, :] <= pos[:, :, None]) & (slots >= j0)[None, None, :]
        s = jnp.where(visible[:, :, None], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        alpha = jnp.exp(m - m_new)
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum("bths,bsc->bthc", p, c)
        return m_new, l, acc

    init = (jnp.full((b, t, h), _NEG, jnp.float32), jnp.zeros((b, t, h), jnp.float32),
            jnp.zeros((b, t, h, c_rank), jnp.float32))
    _, l, acc = lax.fori_loop(0, n_blocks, cache_block, init)
    return (acc / l[..., None]).astype(q_latent.dtype)
