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

A tile reads the m rows from its first row (a tile that would run past the last row reads the
last m rows instead); rows of that window outside the tile are masked: gmm writes the tile's
products into its own rows only (the others keep what they hold), tgmm zeroes them in x before
the product. So rows outside the held groups (padding, other shards' groups) stay zero, and the
work is the routed rows plus at most m - 1 rows per held group, never E_loc x M. tgmm runs one
group at a time (`lax.map`), its tiles summed in an fp32 [I, J] carry, each dw[e] written once.
No operand is copied or padded (except a call with fewer than m rows).

`starts` int32 [E_loc+1] gives the held groups' rows (grouped_matmul.local_starts), so a group
offset (an expert-parallel shard) costs nothing extra. Products accumulate in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv3_jax.ops.varying import same_varying_axes


def _plan(starts: jax.Array, rows: int, m: int):
    """(group [T], first row [T], tiles present) for the static bound of T tiles, and the tile
    starts of each group [E_loc+1]."""
    num_local = starts.shape[0] - 1
    sizes = starts[1:] - starts[:-1]
    tile_starts = jnp.concatenate([jnp.zeros((1,), jnp.int32),
                                   jnp.cumsum((sizes + m - 1) // m, dtype=jnp.int32)])
    bound = -(-rows // m) + num_local
    t = jnp.arange(bound, dtype=jnp.int32)
    group = jnp.clip(jnp.searchsorted(tile_starts, t, side="right").astype(jnp.int32) - 1,
                     0, num_local - 1)
    first = starts[group] + (t - tile_starts[group]) * m
    return group, first, tile_starts


def _window(first, rows: int, m: int):
    """The first row of the m-row window a tile reads: the tile's first row, or earlier for a tile
    that would run past the last row (dynamic_slice would shift it anyway); `_rows_in` masks the
    window's rows that belong to the tile."""
    return jnp.minimum(first, rows - m)


def _rows_in(lo, first, end, m):
    row = lo + jnp.arange(m, dtype=jnp.int32)
    return (row >= first) & (row < end)


def _small(a, m):
    """Pads a [rows, ...] operand with fewer than m rows up to m (tiny calls only)."""
    return jnp.pad(a, ((0, m - a.shape[0]), (0, 0))) if a.shape[0] < m else a


def _like(init, *arrays):
    """init cast to vary over the shard_map axes any of `arrays` varies over (a fori_loop carry
    must keep one type; outside shard_map this returns init)."""
    return same_varying_axes(init, *arrays)[0]


def gmm(x: jax.Array, w: jax.Array, starts: jax.Array, *, m: int, transpose_rhs: bool = False,
        out_dtype=None) -> jax.Array:
    """x [M, I], w [E_loc, I, J] (transpose_rhs: [E_loc, J, I]), starts int32 [E_loc+1] -> [M, J]
    in out_dtype (default x's): rows of held group e get x @ w[e], every other row zero."""
    rows = x.shape[0]
    n = w.shape[1] if transpose_rhs else w.shape[2]
    out_dtype = out_dtype or x.dtype
    w = w.astype(x.dtype)
    x = _small(x, m)
    padded = x.shape[0]
    group, first, tile_starts = _plan(starts, padded, m)
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def body(t, out):
        g, f = group[t], first[t]
        lo = _window(f, padded, m)
        keep = _rows_in(lo, f, starts[g + 1], m)[:, None]
        xt = jax.lax.dynamic_slice_in_dim(x, lo, m, axis=0)
        wt = jax.lax.dynamic_index_in_dim(w, g, keepdims=False)
        yt = jax.lax.dot_general(xt, wt, contract, preferred_element_type=jnp.float32)
        # Rows of the window outside the tile keep what they hold (an earlier tile's rows, or
        # zeros); the tile's own rows get its products.
        old = jax.lax.dynamic_slice_in_dim(out, lo, m, axis=0)
        new = jnp.where(keep, yt.astype(out_dtype), old)
        return jax.lax.dynamic_update_slice_in_dim(out, new, lo, axis=0)

    init = _like(jnp.zeros((padded, n), out_dtype), x, w, starts)
    out = jax.lax.fori_loop(0, tile_starts[-1], body, init)
    return out[:rows] if padded != rows else out


def tgmm(x: jax.Array, dy: jax.Array, starts: jax.Array, *, m: int,
         out_dtype=jnp.float32) -> jax.Array:
    """x [M, I], dy [M, J], starts int32 [E_loc+1] -> [E_loc, I, J]: x[rows of e]^T dy[rows of e]
    summed in float32, returned in out_dtype (zeros for an empty group)."""
    num_local = starts.shape[0] - 1
    dy = _small(dy.astype(x.dtype), m)
    x = _small(x, m)
    padded = x.shape[0]
    _, _, tile_starts = _plan(starts, padded, m)

    def group_sum(e):
        """One group's x_e^T dy_e: its tiles in turn, summed in float32."""
        g_first, g_end = starts[e], starts[e + 1]

        def body(t, acc):
            f = g_first + t * m
            lo = _window(f, padded, m)
            keep = _rows_in(lo, f, g_end, m)[:, None]
            xt = jnp.where(keep, jax.lax.dynamic_slice_in_dim(x, lo, m, axis=0),
                           jnp.zeros((), x.dtype))
            dyt = jax.lax.dynamic_slice_in_dim(dy, lo, m, axis=0)
            return acc + jax.lax.dot_general(xt, dyt, (((0,), (0,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        init = _like(jnp.zeros((x.shape[1], dy.shape[1]), jnp.float32), x, dy, starts)
        n_tiles = tile_starts[e + 1] - tile_starts[e]
        return jax.lax.fori_loop(0, n_tiles, body, init).astype(out_dtype)

    return jax.lax.map(group_sum, jnp.arange(num_local, dtype=jnp.int32))


__all__ = ["gmm", "tgmm"]
