"""The portable grouped matmul: plain jnp row tiles, FLOPs for the rows actually routed.

Letters (dsv3_jax/NOTATION.md): M rows (sorted by group), I input dim, J output dim, E_loc held
groups, m rows per tile.

`lax.ragged_dot` off a Hopper or TPU kernel is expanded by XLA into a dense masked product over
every group (CPU), or reaches a few percent of a dense matmul (other GPUs): its cost grows with
E_loc x M. Here each held group's rows [starts[e], starts[e+1]) are cut into tiles of m rows (the
last one partial), and one `lax.fori_loop` runs over the tiles actually present (a traced trip
count, at most ceil(M/m) + E_loc):

  gmm   out[rows of tile] = x[rows of tile] @ w[e]    (or w[e]^T, transpose_rhs)
  tgmm  dw[e] += x[rows of tile]^T dy[rows of tile]   (fp32 sums; zeros for an empty group)

A tile reads m contiguous rows of x starting at its first row; rows past its group's end are
masked to zero before they are written (gmm) or summed (tgmm). gmm writes tiles in row order, so
the masked tail of a group's last tile is overwritten by the next group's first tile, and rows
outside the held groups (padding, other shards' groups) stay zero. Work: the routed rows plus at
most m - 1 rows per held group, never E_loc x M. x and dy are padded by m rows so that the last
tile's slice stays inside (dynamic_slice would otherwise shift it).

`starts` int32 [E_loc+1] gives the held groups' rows (grouped_matmul.local_starts), so a group
offset (an expert-parallel shard) costs nothing extra. Products accumulate in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def _plan(starts: jax.Array, rows: int, m: int):
    """(group [T], first row [T], end row [T], tiles present) for the static bound T tiles."""
    num_local = starts.shape[0] - 1
    sizes = starts[1:] - starts[:-1]
    tile_starts = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                   jnp.cumsum((sizes + m - 1) // m, dtype=jnp.int32)])
    bound = -(-rows // m) + num_local
    t = jnp.arange(bound, dtype=jnp.int32)
    group = jnp.clip(jnp.searchsorted(tile_starts, t, side="right").astype(jnp.int32) - 1,
                     0, num_local - 1)
    first = starts[group] + (t - tile_starts[group]) * m
    return group, first, starts[group + 1], tile_starts[-1]


def _pad(a, m):
    return jnp.pad(a, ((0, m), (0, 0)))


def _tile(a, first, end, m):
    """a[first : first + m] with rows at or past `end` set to zero."""
    rows = jax.lax.dynamic_slice_in_dim(a, first, m, axis=0)
    keep = (first + jnp.arange(m, dtype=jnp.int32)) < end
    return jnp.where(keep[:, None], rows, jnp.zeros((), a.dtype))


def _like(init, *arrays):
    """init cast to vary over the shard_map axes any of `arrays` varies over (a fori_loop carry
    must keep one type; outside shard_map this returns init)."""
    from dsv3_jax.ops.grouped_matmul import same_varying_axes

    return same_varying_axes(init, *arrays)[0]


def gmm(x: jax.Array, w: jax.Array, starts: jax.Array, *, m: int, transpose_rhs: bool = False,
        out_dtype=None) -> jax.Array:
    """x [M, I], w [E_loc, I, J] (transpose_rhs: [E_loc, J, I]), starts int32 [E_loc+1] -> [M, J]
    in out_dtype (default x's): rows of held group e get x @ w[e], every other row zero."""
    rows = x.shape[0]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    out_dtype = out_dtype or x.dtype
    w = w.astype(x.dtype)
    group, first, end, present = _plan(starts, rows, m)
    xp = _pad(x, m)
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def body(t, out):
        xt = _tile(xp, first[t], end[t], m)
        wt = jax.lax.dynamic_index_in_dim(w, group[t], keepdims=False)
        yt = jax.lax.dot_general(xt, wt, contract,
                                 preferred_element_type=jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(out, yt.astype(out_dtype), first[t], axis=0)

    init = _like(jnp.zeros((rows + m, n), out_dtype), x, w, starts)
    return jax.lax.fori_loop(0, present, body, init)[:rows]


def tgmm(x: jax.Array, dy: jax.Array, starts: jax.Array, *, m: int,
         out_dtype=jnp.float32) -> jax.Array:
    """x [M, I], dy [M, J], starts int32 [E_loc+1] -> [E_loc, I, J]: x[rows of e]^T dy[rows of e]
    summed in float32, returned in out_dtype (zeros for an empty group)."""
    num_local = starts.shape[0] - 1
    dy = dy.astype(x.dtype)
    group, first, end, present = _plan(starts, x.shape[0], m)
    xp, dyp = _pad(x, m), _pad(dy, m)

    def body(t, dw):
        xt = _tile(xp, first[t], end[t], m)
        dyt = jax.lax.dynamic_slice_in_dim(dyp, first[t], m, axis=0)
        upd = jax.lax.dot_general(xt, dyt, (((0,), (0,)), ((), ())),
                                  preferred_element_type=jnp.float32)
        cur = jax.lax.dynamic_index_in_dim(dw, group[t], keepdims=False)
        return jax.lax.dynamic_update_index_in_dim(dw, cur + upd, group[t], axis=0)

    init = _like(jnp.zeros((num_local, x.shape[1], dy.shape[1]), jnp.float32), x, dy, starts)
    return jax.lax.fori_loop(0, present, body, init).astype(out_dtype)


__all__ = ["gmm", "tgmm"]
