"""MLA training / prefill attention on a TPU: a thin wrapper around jax's splash attention kernel.

Letters (dsv3_jax/NOTATION.md): B batch, T query positions (also the key positions: self-attention,
S = T), H heads, A qk head dim (nope + rope, 192 in V3), O v head dim (128 in V3).

Reference: `dsv3_jax.ops.attention.mla_attention_reference` (the contract; tests/
test_splash_attention.py compares against it). This file imports nothing of dsv3_jax (a kernel
under ops/pallas/ never imports its dispatcher, tests/test_ops_structure.py).

What splash attention does
--------------------------
Splash ("sparse flash") attention, `jax.experimental.pallas.ops.tpu.splash_attention`, is a Pallas
Mosaic TPU flash attention: for each head and each block of `block_q` query rows it streams the
key / value blocks, `block_kv` rows at a time (computed `block_kv_compute` rows per step), keeps
the running row max m, the running sum l and the fp32 output accumulator in VMEM (online softmax),
and writes O = acc / l and the log-sum-exp at the end. Its backward is a `jax.custom_vjp`: a dq
kernel (tiles `block_q_dq` x `block_kv_dq`) and a dk / dv kernel (tiles `block_q_dkv` x
`block_kv_dkv`, computed `block_kv_dkv_compute` rows at a time), each recomputing P from the
saved log-sum-exp. Scores and softmax are fp32 (`preferred_element_type=float32`); P is cast to
v's dtype before the P V product, as the reference does.

"Sparse": the mask is static, known at trace time (here `CausalMask`), so splash precomputes per
(head, q block, kv block) whether the block is empty (skipped: its DMA and its matmuls never run),
full (no masking work), or partial (masked elementwise): the causal upper triangle of blocks costs
nothing. The mask is per head, a `MultiHeadMask` of H identical causal masks (splash deduplicates
identical heads). Segment ids are the dynamic part: `SegmentIds(q, kv)`, int [T] each, and a
query attends to a key only where causal AND q_seg == kv_seg, so packed documents never attend
across each other (a document boundary may fall anywhere, inside a block too: that block is
masked elementwise). Every row keeps its diagonal, so no softmax row is empty.

Splash takes the head dim of v separately from the qk one (jax 0.11.2 reads `head_dim_v =
v.shape[-1]` in the forward, dq and dkv kernels; the output is [H, T, O]), so MLA's A = 192 != O =
128 runs as is: no zero padding of v.

Layout
------
Our contract is [B, T, H, dim]; splash takes one sequence [H, T, dim] (head-major, head dim
minor). The wrapper transposes to [B, H, T, dim] and maps the kernel over the batch:
`jax.vmap` on a TPU (Pallas adds the batch as a leading parallel grid dimension), `jax.lax.map`
under TPU interpret mode (`pltpu.InterpretParams`), whose grid check rejects vmapped Pallas calls in
jax 0.11.2 (its dimension semantics stay at splash's 3 while the grid grows to 4). The softmax
scale is folded into q before the kernel: q * scale, rounded once to q's dtype (splash has no
scale argument; the reference multiplies the fp32 scores instead: one extra rounding of q, a
relative 2^-9 in bf16, far inside the tolerance).

Block sizes: one table per shape class
--------------------------------------
`BLOCK_TABLE` maps a shape class, (smallest T, largest head dim), to the `BlockSizes` fields;
`block_sizes(t, a, o)` returns the first (largest) class whose smallest T is <= t, whose largest
head dim covers max(a, o), and whose blocks all divide t. The 128 class takes any T that is a
multiple of 128 (a TPU vreg has 128 lanes: splash refuses smaller blocks). The larger classes
follow MaxText's splash settings (512-row query blocks; 1024-row key blocks streamed as two
512-row computes at long T, which halves the key / value DMAs per query block). VMEM at the
largest class and A = 192, O = 128, bf16: q, k, v and out blocks double-buffered ~2 MiB, the fp32
output accumulator 256 KiB, the fp32 512 x 512 score tile 1 MiB: inside the 16 MiB default scoped
VMEM of every TPU generation. UNTUNED: the table has not been timed on a real TPU (none was lent);
the export tests only prove that the kernels lower to Mosaic at V3 dims.

On a real TPU f32 inputs run the matmuls at the MXU's default precision (bf16 passes), so f32 is
only as accurate as bf16 there; under interpret mode on a CPU f32 matmuls are exact fp32.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

_NAME = "splash_attention_tpu"
_LANES = 128  # a vreg's lanes: splash's smallest block
_DIM_MULTIPLE = 64  # head dims in whole half-vregs of lanes (V3: 192 and 128)
_MAX_DIM = 256  # the largest head dim the table's VMEM budget covers
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))

# (smallest T, largest head dim) -> BlockSizes fields; the first class that takes a call wins.
BLOCK_TABLE: dict[tuple[int, int], dict[str, int]] = {
    # long sequences (V3 pretraining at T 4096): 512-row q blocks, 1024-row kv blocks in 512 steps
    (2048, _MAX_DIM): dict(block_q=512, block_kv=1024, block_kv_compute=512,
                           block_q_dkv=512, block_kv_dkv=1024, block_kv_dkv_compute=512,
                           block_q_dq=512, block_kv_dq=1024),
    # medium sequences: 512 everywhere
    (512, _MAX_DIM): dict(block_q=512, block_kv=512, block_kv_compute=512,
                          block_q_dkv=512, block_kv_dkv=512, block_kv_dkv_compute=512,
                          block_q_dq=512, block_kv_dq=512),
    # short sequences and any T that is a multiple of 128 (tests, the smallest legal tiles)
    (_LANES, _MAX_DIM): dict(block_q=128, block_kv=128, block_kv_compute=128,
                             block_q_dkv=128, block_kv_dkv=128, block_kv_dkv_compute=128,
                             block_q_dq=128, block_kv_dq=128),
}


def _fields(bs: splash.BlockSizes) -> dict[str, int]:
    return {name: getattr(bs, name) for name in BLOCK_TABLE[(_LANES, _MAX_DIM)]}


def block_sizes(t: int, a: int, o: int) -> splash.BlockSizes:
    """The `BlockSizes` of the first `BLOCK_TABLE` class that takes T = t and head dims a, o
    (module docstring). Raises ValueError when none does (t not a multiple of 128, or a head dim
    above the table's)."""
    for (t_min, max_dim), fields in BLOCK_TABLE.items():
        if t >= t_min and max(a, o) <= max_dim and all(t % b == 0 for b in fields.values()):
            return splash.BlockSizes(**fields)
    raise ValueError(f"{_NAME}: no block-size class takes T={t}, A={a}, O={o}; T must be a "
                     f"multiple of {_LANES} (pad the sequence) and head dims at most {_MAX_DIM}.")


_table_block_sizes = block_sizes  # for the functions whose `block_sizes` argument hides it


def check_dims(q_shape, k_shape, v_shape, dtypes, *, segment_ids_shape=None,
               block_sizes: splash.BlockSizes | None = None) -> None:
    """Refuses inputs the wrapper cannot take: ValueError naming the value and the fix.
    block_sizes: the ones to run with; None checks the table's choice, `block_sizes(T, A, O)`."""
    if len(q_shape) != 4 or len(k_shape) != 4 or len(v_shape) != 4:
        raise ValueError(f"{_NAME}: q, k, v must be [B, T, H, dim], got {tuple(q_shape)}, "
                         f"{tuple(k_shape)}, {tuple(v_shape)}.")
    if tuple(q_shape) != tuple(k_shape) or tuple(v_shape[:3]) != tuple(q_shape[:3]):
        raise ValueError(f"{_NAME}: q {tuple(q_shape)} and k {tuple(k_shape)} must match, and v "
                         f"{tuple(v_shape)} must share their [B, T, H].")
    b, t, _, a = q_shape
    o = v_shape[-1]
    for name, d in (("qk head dim A", a), ("v head dim O", o)):
        if d % _DIM_MULTIPLE or d > _MAX_DIM:
            raise ValueError(f"{_NAME}: {name} = {d} must be a multiple of {_DIM_MULTIPLE} and at "
                             f"most {_MAX_DIM}; use the reference for other dims.")
    if t % _LANES:
        raise ValueError(f"{_NAME}: T = {t} must be a multiple of {_LANES} (splash's smallest "
                         "block); pad the sequence (with its own segment id) or use the reference.")
    dts = [jnp.dtype(d) for d in dtypes]
    if len(set(dts)) != 1 or dts[0] not in DTYPES:
        raise ValueError(f"{_NAME}: q, k, v must all be bfloat16 or all float32, got "
                         f"{[d.name for d in dts]}; cast them to one.")
    if segment_ids_shape is not None and tuple(segment_ids_shape) != (b, t):
        raise ValueError(f"{_NAME}: segment_ids {tuple(segment_ids_shape)} must be [B, T] = "
                         f"{(b, t)}, one id per token.")
    bs = block_sizes if block_sizes is not None else _table_block_sizes(t, a, o)
    if bs.use_fused_bwd_kernel:
        raise ValueError(f"{_NAME}: use_fused_bwd_kernel=True is not supported here; the table's "
                         "separate dq and dkv kernels are (pass block_sizes=None).")
    for name, blk in _fields(bs).items():
        if blk is None or blk % _LANES or t % blk:
            raise ValueError(f"{_NAME}: block size {name} = {blk} must be a multiple of {_LANES} "
                             f"dividing T = {t}; pass block_sizes=None for the table's choice.")
    if bs.block_kv % bs.block_kv_compute or bs.block_kv_dkv % bs.block_kv_dkv_compute:
        raise ValueError(f"{_NAME}: block_kv_compute {bs.block_kv_compute} must divide block_kv "
                         f"{bs.block_kv} (and block_kv_dkv_compute {bs.block_kv_dkv_compute} "
                         f"block_kv_dkv {bs.block_kv_dkv}).")


def supports(q_shape, k_shape, v_shape, dtypes) -> bool:
    """Whether the wrapper takes these inputs at the table's block sizes (the dispatcher's test)."""
    try:
        check_dims(q_shape, k_shape, v_shape, dtypes)
    except (ValueError, IndexError, TypeError):
        return False
    return True


def _interpret_arg(interpret):
    """False: Mosaic TPU; True: TPU interpret mode, `pltpu.InterpretParams()`; params as given."""
    if isinstance(interpret, pltpu.InterpretParams):
        return interpret
    return pltpu.InterpretParams() if interpret else False


@functools.lru_cache(maxsize=64)
def _kernel(t: int, h: int, bs: splash.BlockSizes, interpret) -> splash.SplashAttentionKernel:
    """The splash kernel for one sequence [H, T, dim]: H causal masks, one device, no sharding.
    Cached: building it preprocesses the static mask into block tables (numpy)."""
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((t, t)) for _ in range(h)])
    with jax.ensure_compile_time_eval():  # concrete mask tables even when called under a trace
        kernel = splash.make_splash_mha_single_device(mask, block_sizes=bs, interpret=interpret)
    return jax.tree.map(np.asarray, kernel)


def mla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                  segment_ids: jax.Array | None = None, interpret=False,
                  block_sizes: splash.BlockSizes | None = None) -> jax.Array:
    """Causal MLA attention through splash; the contract of
    `dsv3_jax.ops.attention.mla_attention_reference`.

    Args:
      q: [B, T, H, A]; k: [B, T, H, A]; v: [B, T, H, O]; all bf16 or all f32 (check_dims).
      scale: softmax scale, folded into q before the kernel.
      segment_ids: optional int [B, T]; a query attends only to keys of its own segment.
      interpret: False (Mosaic TPU), True (TPU interpret mode on any backend, slow) or a
        `pltpu.InterpretParams`.
      block_sizes: splash `BlockSizes`; None picks `block_sizes(T, A, O)` from the table.
    Returns:
      [B, T, H, O] in q's dtype. Differentiable in q, k, v (splash's custom vjp).
    """
    check_dims(q.shape, k.shape, v.shape, (q.dtype, k.dtype, v.dtype), block_sizes=block_sizes,
               segment_ids_shape=None if segment_ids is None else segment_ids.shape)
    bs = block_sizes if block_sizes is not None else _table_block_sizes(
        q.shape[1], q.shape[-1], v.shape[-1])
    interpret = _interpret_arg(interpret)
    _, t, h, _ = q.shape
    kernel = _kernel(t, h, bs, interpret)
    q = (q.astype(jnp.float32) * scale).astype(q.dtype)
    # [B, T, H, dim] -> [B, H, T, dim]: splash's per-sequence layout
    q_bh, k_bh, v_bh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))

    def one(q, k, v, seg):  # q, k: [H, T, A]; v: [H, T, O]; seg: [T] or None -> [H, T, O]
        return kernel(q, k, v, segment_ids=None if seg is None else splash.SegmentIds(seg, seg))

    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    if interpret is False:
        out = jax.vmap(one)(q_bh, k_bh, v_bh, seg)
    else:  # TPU interpret mode rejects a vmapped grid (module docstring)
        out = jax.lax.map(lambda xs: one(*xs), (q_bh, k_bh, v_bh, seg))
    return out.transpose(0, 2, 1, 3).astype(q.dtype)  # [B, H, T, O] -> [B, T, H, O]
