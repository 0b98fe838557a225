"""MLA decoding over the latent cache on TPU, Pallas Mosaic TPU, split along the cache.

Letters (dsv3_jax/NOTATION.md): B batch, T new tokens, H heads, S cache slots, C kv latent
rank (512), R qk rope head dim (64); THp: the T*H query rows of a sequence, padded to a multiple
of the row tile. The math (SPEC.md section 2, absorbed MLA), per sequence b, for every query row
(t, h) of that sequence at absolute position pos[t] = q_positions[b, t], over the cache slots s:

    score_ths = scale * (q_latent_th . c_s + q_pe_th . k_pe_s)    cache row s = [c_s | k_pe_s]
    visible(t, s) = s <= pos[t]
    o_th = sum_{visible s} softmax_s(score_ths) c_s            [C], fp32 softmax and accumulation

The cache rows are shared by all heads, so a sequence's T*H query rows form one matrix (row
(t, h) at t * H + h) and each cache block is read once per row tile and fed to the MXU against
all of them (MQA-like: head dim C + R = 576 for the scores, C = 512 for the values).

Tiling (flash-decoding). The grid is (batch, row tiles, splits of the cache, blocks of a split):

    b: "parallel"   i: "parallel" (rows_t query rows)   s: "parallel"   j: "arbitrary"

One grid step holds its row tile's q ([rows_t, C] latent, [rows_t, R] rope part, and each row's
position) in VMEM, which the pipeline fetches once per (b, i) since their block index does not
change along s and j, and one cache block of `block_s` full rows [block_s, C + R] (one DMA of
contiguous rows; c is the ref's columns [0, C), k_pe its columns [C, C + R), both starting on a
128-lane boundary). It updates an online softmax in VMEM scratch (natural exp, fp32):

    S   = Qlat . c^T + Qpe . k_pe^T  (two MXU matmuls, fp32 accumulation)   [rows_t, block_s]
    S   = scale * S masked to slot <= pos[row] (-inf elsewhere)
    m_new = max(m, rowmax S);  alpha = exp(m - m_new);  P = exp(S - m_new)
    l   = alpha l + rowsum P;  acc = alpha acc + P . c   (P in the cache dtype, as the reference)

m starts at a finite -1e30, so a row that sees nothing in a visible block keeps alpha = 1 and
P = 0 instead of NaN. Per-row-tile visible limits (the largest position of the tile's rows) are
scalar-prefetched into SMEM (`PrefetchScalarGridSpec`): a block whose first slot is past the
limit is skipped (`pl.when`), and the cache's index map clamps the block index to the last visible
block, so skipped steps repeat the previous block index and the pipeline fetches nothing for
them. Short sequences in a long cache cost only the blocks they see. At the split's last step it
writes its normalised partial output and its log-sum-exp (-inf when the split saw no visible
slot); the combine across splits is jnp:

    o_th = sum_splits exp(lse_split - lse) o_split,   lse = log sum_splits exp(lse_split)

Layout in VMEM: scores [rows_t, block_s] are lane-dense (block_s a multiple of 128); the
accumulator [rows_t, C] fp32 with C a multiple of 128; m, l, the positions and the lse are
[rows_t, 1] columns (one lane of a vreg each; small). rows_t is a multiple of 16 for bf16 (two
rows per sublane) and 8 for fp32. At V3 dims (H 128, T 1, bf16, block_s 512) one step holds two
cache buffers of 512 x 640 (576 lanes padded) bf16 (1.25 MiB), q, the fp32 accumulator and the
scores: about 4 MiB of VMEM (`vmem_bytes`), within every TPU's default scoped limit.

Splits: on a single-TensorCore chip (v5e, v6e) the parallel axes gain nothing, so the default
adds splits only when batch x row tiles is smaller than `cores` (2: the TensorCores of a v4 / v5p
megacore or a v7x chip share the parallel axes), never splits shorter than two blocks.

What the wrapper does (XLA, around the call): flattens q to rows [B, T*H, C] and [B, T*H, R],
pads the rows to a multiple of rows_t (padded rows have position 0, see slot 0, and are sliced
away), builds the per-row positions [B, THp, 1] (clamped to S - 1, as the reference treats a
position past the cache) and per-tile limits [B, row tiles], pads the cache slots to a multiple of
block_s when needed (a copy: allocate caches in multiples of block_s to avoid it; when S is
smaller than block_s the block shrinks to S rounded up to 128), and combines the splits (fp32
partials when there are several splits, the output dtype directly when there is one).
Requirements (checked by `check_dims`): C a multiple of 128, R a multiple of 64 (the k_pe columns
start on a lane-tile boundary), one dtype for q_latent, q_pe and cache, bfloat16 or float32.
Junk in slots past every position does not change the output as long as it is finite (P is 0
there; 0 x inf would be NaN in the P . c product, as in the reference).

The plain-jnp reference it is tested against is `dsv3_jax.ops.attention.mla_decode_reference`
(tests/test_mla_decode_tpu.py: TPU interpret mode on the CPU against it with per-sequence
positions mid-block and at block edges, several splits and blocks, several row tiles, junk past
every position; bf16 and fp32; the dims refusals; `jax.export` for "tpu" at V3 dims).

Status: NOT YET RUN ON A TPU. TPU interpret mode matches the reference and the jax-side lowering
for "tpu" (a `tpu_custom_call` holding the Mosaic module) succeeds without a TPU; Mosaic's own
compile (layouts, VMEM) and the speed remain to be confirmed on a TPU.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.tpu as pltpu
import jax.numpy as jnp

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))  # what the kernel takes
LANES = 128
M_INIT = -1e30  # running-max start: finite, so a fully masked row gives exp(-inf) = 0, not NaN
VMEM_BUDGET = 16 * 1024 * 1024  # the smallest default scoped VMEM limit (v5e)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_axis(x, axis: int, size: int, value=0):
    """x padded with `value` at the end of `axis` to `size` (x itself when it is that long)."""
    if x.shape[axis] == size:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=value)


def _refuse(config, field: str, why: str):
    raise ValueError(f"{type(config).__name__}.{field}={getattr(config, field)!r}: {why}.")


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """block_s: cache rows per grid step (a multiple of 128: the scores' lane dim); block_rows:
    query rows per row tile, at most (a multiple of 16); splits: cache splits per sequence (None:
    chosen from the shape, see `choose_splits`); cores: TensorCores sharing the parallel grid
    axes (2 on v4 / v5p / v7x; 1 on v5e / v6e)."""

    block_s: int = 512
    block_rows: int = 256
    splits: int | None = None
    cores: int = 2

    def __post_init__(self):
        if self.block_s < LANES or self.block_s % LANES:
            _refuse(self, "block_s", "must be a positive multiple of 128 (the scores' lane dim)")
        if self.block_rows < 16 or self.block_rows % 16:
            _refuse(self, "block_rows", "must be a positive multiple of 16 (bf16 sublane pairs)")
        if self.splits is not None and self.splits < 1:
            _refuse(self, "splits", "must be >= 1 (or None)")
        if self.cores < 1:
            _refuse(self, "cores", "must be >= 1")


DEFAULT_CONFIG = DecodeConfig()


def row_multiple(dtype) -> int:
    """Query rows are padded to a multiple of this: 8 sublanes x (4 // itemsize) rows each."""
    return 8 * (4 // jnp.dtype(dtype).itemsize)


def row_tile(rows: int, dtype, cfg: DecodeConfig) -> int:
    """rows_t: the query rows of one tile (all of a sequence's rows when they fit block_rows)."""
    return min(cfg.block_rows, _round_up(rows, row_multiple(dtype)))


def block_slots(slots: int, cfg: DecodeConfig) -> int:
    """The cache block: block_s, or S rounded up to 128 when the cache is shorter."""
    return min(cfg.block_s, _round_up(slots, LANES))


def vmem_bytes(rows_t: int, bs: int, c: int, r: int, itemsize: int) -> int:
    """VMEM of one grid step: double-buffered blocks (cache [bs, C + R], q [rows_t, C] and
    [rows_t, R], positions [rows_t, 1], output [rows_t, C] (fp32 at most), lse [rows_t, 1]), the
    scratch (acc [rows_t, C], m, l) and about three fp32 [rows_t, bs] temporaries of the scores;
    lanes padded to 128."""
    lanes = lambda n: _round_up(n, LANES)
    blocks = (bs * lanes(c + r) * itemsize + rows_t * (lanes(c) + lanes(r)) * itemsize
              + rows_t * LANES * 4 + rows_t * lanes(c) * 4 + rows_t * LANES * 4)
    scratch = rows_t * lanes(c) * 4 + 2 * rows_t * LANES * 4
    return 2 * blocks + scratch + 3 * rows_t * bs * 4


def check_dims(q_latent_shape, q_pe_shape, cache_shape, positions_shape, dtypes,
               config: DecodeConfig | None = None) -> None:
    """Refuses inputs the kernel cannot take (ValueError naming the value and the fix)."""
    cfg = config or DEFAULT_CONFIG
    if len(q_latent_shape) != 4 or len(q_pe_shape) != 4 or len(cache_shape) != 3:
        raise ValueError(f"mla_decode_tpu: q_latent {tuple(q_latent_shape)} and q_pe "
                         f"{tuple(q_pe_shape)} must be [B, T, H, *], cache "
                         f"{tuple(cache_shape)} [B, S, C + R].")
    b, t, h, c = q_latent_shape
    r = q_pe_shape[-1]
    if tuple(q_pe_shape[:3]) != (b, t, h) or cache_shape[0] != b or cache_shape[2] != c + r:
        raise ValueError(f"mla_decode_tpu: shapes do not agree: q_latent {tuple(q_latent_shape)}, "
                         f"q_pe {tuple(q_pe_shape)}, cache {tuple(cache_shape)} (expected "
                         f"[{b}, S, {c} + {r}] and q_pe [{b}, {t}, {h}, R]).")
    if tuple(positions_shape) != (b, t):
        raise ValueError(f"mla_decode_tpu: q_positions has shape {tuple(positions_shape)}; "
                         f"expected {(b, t)} (one position per query of q_latent).")
    if c <= 0 or c % LANES or r <= 0 or r % 64:
        raise ValueError(f"mla_decode_tpu: latent rank {c} must be a multiple of 128 and rope dim "
                         f"{r} a multiple of 64 (lane-aligned columns of a cache row); use the "
                         f"reference for other dims.")
    if cache_shape[1] < 1:
        raise ValueError(f"mla_decode_tpu: cache {tuple(cache_shape)} has no slots; give it at "
                         "least one slot (S >= 1).")
    dts = [jnp.dtype(d) for d in dtypes]
    if len(set(dts)) != 1 or dts[0] not in DTYPES:
        raise ValueError(f"mla_decode_tpu: q_latent, q_pe and cache must all be bfloat16 (or all "
                         f"float32), got {[str(d) for d in dts]}; cast them to one of these.")
    rows_t = row_tile(t * h, dts[0], cfg)
    need = vmem_bytes(rows_t, block_slots(cache_shape[1], cfg), c, r, dts[0].itemsize)
    if need > VMEM_BUDGET:
        raise ValueError(f"mla_decode_tpu: {cfg} needs about {need} bytes of VMEM at C {c}, R {r}, "
                         f"{rows_t} rows a tile, more than {VMEM_BUDGET}; use a smaller block_s "
                         "or block_rows.")


def supports(q_latent_shape, q_pe_shape, cache_shape, positions_shape, dtypes) -> bool:
    try:
        check_dims(q_latent_shape, q_pe_shape, cache_shape, positions_shape, dtypes)
    except ValueError:
        return False
    return True


def choose_splits(batch: int, row_tiles: int, blocks: int, cfg: DecodeConfig) -> int:
    """Cache splits per sequence: enough parallel work for `cores` TensorCores, each split at
    least two blocks (config.splits when given)."""
    if cfg.splits is not None:
        return max(1, min(cfg.splits, blocks))
    want = -(-cfg.cores // (batch * row_tiles))
    return max(1, min(want, blocks // 2))


def _kernel(limit_ref, pos_ref, qlat_ref, qpe_ref, cache_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc,
            *, c: int, bs: int, blocks_per_split: int, num_blocks: int, scale: float):
    # limit_ref: [B, THp / rows_t] int32, SMEM (scalar prefetch): max position of each row tile
    # pos_ref:   [rows_t, 1] int32        absolute position of each query row (slots <= it seen)
    # qlat_ref:  [rows_t, C]              rows (t, h) of q_latent
    # qpe_ref:   [rows_t, R]              rows (t, h) of q_pe
    # cache_ref: [bs, C + R]              cache block: slots g * bs .. g * bs + bs - 1, [c | k_pe]
    # o_ref:     [rows_t, C]              this split's normalised partial output
    # lse_ref:   [rows_t, 1] f32          this split's log-sum-exp (-inf: nothing visible)
    # m_sc, l_sc: [rows_t, 1] f32         running max and sum of the online softmax
    # acc_sc:    [rows_t, C] f32          running unnormalised output
    b, i, s, j = (pl.program_id(k) for k in range(4))
    g = s * blocks_per_split + j  # the cache block of this step

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, M_INIT, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(jnp.logical_and(g < num_blocks, g * bs <= limit_ref[b, i]))
    def _step():
        kv_c = cache_ref[:, :c]  # [bs, C]
        kv_pe = cache_ref[:, c:]  # [bs, R]
        nt = (((1,), (1,)), ((), ()))  # contract the last dims: A . B^T
        scores = (lax.dot_general(qlat_ref[...], kv_c, nt, preferred_element_type=jnp.float32)
                  + lax.dot_general(qpe_ref[...], kv_pe, nt, preferred_element_type=jnp.float32))
        scores = scores * scale  # [rows_t, bs]
        slots = g * bs + lax.broadcasted_iota(jnp.int32, scores.shape, 1)
        scores = jnp.where(slots <= pos_ref[...], scores, -jnp.inf)
        m_prev = m_sc[...]
        m_new = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))  # [rows_t, 1]
        alpha = jnp.exp(m_prev - m_new)
        p = jnp.exp(scores - m_new)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_sc[...] = alpha * acc_sc[...] + jnp.dot(p.astype(kv_c.dtype), kv_c,
                                                    preferred_element_type=jnp.float32)
        m_sc[...] = m_new

    @pl.when(j == blocks_per_split - 1)
    def _finish():
        l = l_sc[...]
        seen = l > 0
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = (acc_sc[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m_sc[...] + jnp.log(l_safe), -jnp.inf)


def combine(o_parts: jax.Array, lse_parts: jax.Array) -> jax.Array:
    """Flash-decoding combine: o_parts [splits, ...rows, C], lse_parts [splits, ...rows] (natural
    log, -inf for a split that saw nothing) -> [...rows, C] float32."""
    lse_max = jnp.max(lse_parts, axis=0)  # finite: the split holding slot 0 sees every row
    w = jnp.exp(lse_parts - lse_max[None])  # [splits, ...rows]
    # The sum over the splits (axis 0, a dim the package's letter legend has no letter for).
    num = jnp.einsum(w, [0, ...], o_parts.astype(jnp.float32), [0, ..., 1], [..., 1])
    return num / jnp.sum(w, axis=0)[..., None]


def _interpret_params(interpret):
    """False -> None (Mosaic TPU); True -> TPU interpret mode's defaults; InterpretParams as is."""
    if interpret is True:
        return pltpu.InterpretParams()
    return interpret or None


def mla_decode(q_latent: jax.Array, q_pe: jax.Array, cache: jax.Array, q_positions: jax.Array, *,
               scale: float, config: DecodeConfig | None = None,
               interpret: bool | pltpu.InterpretParams = False) -> jax.Array:
    """Absorbed MLA attention over the latent cache, split along the cache (flash-decoding).

    Args:
      q_latent: [B, T, H, C]; q_pe: [B, T, H, R]; cache: [B, S, C + R] rows `[c | k_pe]`; one
        dtype, bfloat16 or float32.
      q_positions: int [B, T]; a query at position p sees slots 0..p (p < S).
      scale: softmax scale.
      config: block sizes, splits (DEFAULT_CONFIG when None).
      interpret: False on a TPU; True (or `pltpu.InterpretParams`) runs the kernel in TPU
        interpret mode on the CPU.
    Returns:
      [B, T, H, C] in q_latent's dtype; the contract of `ops.attention.mla_decode_reference`.
    """
    cfg = config or DEFAULT_CONFIG
    check_dims(q_latent.shape, q_pe.shape, cache.shape, q_positions.shape,
               (q_latent.dtype, q_pe.dtype, cache.dtype), cfg)
    b, t, h, c = q_latent.shape
    r = q_pe.shape[-1]
    slots = cache.shape[1]
    rows = t * h
    rows_t = row_tile(rows, q_latent.dtype, cfg)
    rp = _round_up(rows, rows_t)
    row_tiles = rp // rows_t
    bs = block_slots(slots, cfg)
    sp = _round_up(slots, bs)
    num_blocks = sp // bs
    splits = choose_splits(b, row_tiles, num_blocks, cfg)
    blocks_per_split = -(-num_blocks // splits)
    splits = -(-num_blocks // blocks_per_split)  # no empty split at the end

    qlat = _pad_axis(q_latent.reshape(b, rows, c), 1, rp)  # [B, THp, C]
    qpe = _pad_axis(q_pe.reshape(b, rows, r), 1, rp)  # [B, THp, R]
    pos = jnp.minimum(q_positions.astype(jnp.int32), slots - 1)
    pos = _pad_axis(jnp.repeat(pos, h, axis=1), 1, rp)  # [B, THp], row (t, h) -> t; padded: 0
    limit = jnp.max(pos.reshape(b, row_tiles, rows_t), axis=-1)  # [B, THp / rows_t]
    cache_p = _pad_axis(cache, 1, sp)  # a copy only when S is not a multiple of bs

    def cache_block(bi, i, s, j, limit_ref):
        # lax.div, not //: positions are >= 0, and floor division lowers through `sign`, whose TPU
        # lowering asks which TPU it runs on (and so fails to export without one)
        last = jnp.minimum(lax.div(limit_ref[bi, i], jnp.int32(bs)), num_blocks - 1)
        return bi, jnp.minimum(s * blocks_per_split + j, last), 0

    rows_block = lambda bi, i, s, j, limit_ref: (bi, i, 0)
    out_block = lambda bi, i, s, j, limit_ref: (s, bi, i, 0)
    part_dtype = q_latent.dtype if splits == 1 else jnp.float32
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, row_tiles, splits, blocks_per_split),
        in_specs=[pl.BlockSpec((None, rows_t, 1), rows_block),
                  pl.BlockSpec((None, rows_t, c), rows_block),
                  pl.BlockSpec((None, rows_t, r), rows_block),
                  pl.BlockSpec((None, bs, c + r), cache_block)],
        out_specs=[pl.BlockSpec((None, None, rows_t, c), out_block),
                   pl.BlockSpec((None, None, rows_t, 1), out_block)],
        scratch_shapes=[pltpu.VMEM((rows_t, 1), jnp.float32),
                        pltpu.VMEM((rows_t, 1), jnp.float32),
                        pltpu.VMEM((rows_t, c), jnp.float32)],
    )
    call = pl.pallas_call(
        functools.partial(_kernel, c=c, bs=bs, blocks_per_split=blocks_per_split,
                          num_blocks=num_blocks, scale=float(scale)),
        out_shape=(jax.ShapeDtypeStruct((splits, b, rp, c), part_dtype),
                   jax.ShapeDtypeStruct((splits, b, rp, 1), jnp.float32)),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=_interpret_params(interpret),
        name="mla_decode_tpu",
    )
    o_parts, lse_parts = call(limit, pos[..., None], qlat, qpe, cache_p)
    if splits == 1:
        out = o_parts[0]
    else:
        out = combine(o_parts, lse_parts[..., 0]).astype(q_latent.dtype)
    return out[:, :rows].reshape(b, t, h, c)


__all__ = ["DEFAULT_CONFIG", "DTYPES", "DecodeConfig", "block_slots", "check_dims",
           "choose_splits", "combine", "mla_decode", "row_tile", "supports", "vmem_bytes"]
