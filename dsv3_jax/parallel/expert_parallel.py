"""Dropless routed experts, on one device or across a mesh (expert parallelism with shard_map).

Legend: N tokens (n on one device), K experts per token, E experts (E_loc per device of the
`expert` axis), P = size of the `expert` axis, D model dim, F expert hidden dim (F_loc per device
of the `tensor` axis), M = n * K token-expert pairs on one device.

`routed_experts(x, indices, weights, w1, w2, w3)` = sum_k weights[t, k] * SwiGLU_{indices[t, k]}(x[t])
is what DeepSeekMoE needs; it picks the implementation from the mesh in context (`jax.set_mesh`):

- no mesh, or one device: `local_routed_experts`: sort the M pairs by expert, run
  `ops.grouped_matmul` (w1, w3, SwiGLU, w2), unsort, weight and sum over K.
- a mesh: the same math inside `jax.shard_map`, where collectives are explicit:
    tokens     [n, D] per device, split over the batch axes (data, fsdp, expert), replicated over
               tensor;
    weights    w1, w3 [E_loc, D / fsdp, F_loc], w2 [E_loc, F_loc, D / fsdp]: experts split over
               `expert`, the hidden dim over `tensor`, D over `fsdp` (gathered here: FSDP);
    dispatch   each pair goes to the `expert`-axis peer that owns its expert: pairs bucketed by
               destination into a [P, M, D] buffer (capacity M per peer, so nothing is ever
               dropped), exchanged with one `all_to_all`, with each row's local expert id;
    experts    received rows sorted by local expert and run through `ops.grouped_matmul`
               (empty buffer rows sort last and are skipped);
    combine    results return with the reverse `all_to_all`, are weighted and summed per token,
               and the per-`tensor`-shard partial sums over F are added with one `psum`.
  The padded buffer costs P x the bytes of an exact exchange; `jax.lax.ragged_all_to_all` would
  send only the rows each peer needs on GPU/TPU, but it is unimplemented on CPU, where this is
  tested, and is not wired in yet.
The router's expert load (for the bias update) is computed outside, on the globally sharded
routing decisions, so it is always the global count.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from dsv3_jax.ops.fp8 import fp8_grouped_matmul
from dsv3_jax.ops.grouped_matmul import grouped_matmul

BATCH_AXES = ("data", "fsdp", "expert")


def _swiglu_experts(xs, group_sizes, w1, w2, w3, fp8=False):
    """Rows xs [R, D] grouped by expert (group_sizes [E]) -> w2(silu(w1 x) * w3 x) [R, D].

    fp8: the three products through `ops.fp8.fp8_grouped_matmul` (FP8 Fprop, Dgrad and Wgrad with
    block scales; the weights are the fp32 masters), else `ops.grouped_matmul` in xs's dtype."""
    matmul = fp8_grouped_matmul if fp8 else grouped_matmul
    h = nn.silu(matmul(xs, w1, group_sizes)) * matmul(xs, w3, group_sizes)
    return matmul(h, w2, group_sizes)


def _combine(ys, weights, dtype):
    """ys [n, K, D] expert outputs, weights [n, K] -> weighted sum [n, D] (in float32)."""
    return jnp.einsum("nkd,nk->nd", ys.astype(jnp.float32), weights.astype(jnp.float32)).astype(dtype)


def local_routed_experts(x: jax.Array, indices: jax.Array, weights: jax.Array, w1: jax.Array,
                         w2: jax.Array, w3: jax.Array, fp8: bool = False) -> jax.Array:
    """One device. x [N, D], indices / weights [N, K], w1 / w3 [E, D, F], w2 [E, F, D] -> [N, D]."""
    n, k = indices.shape
    flat = indices.reshape(-1)  # [M]
    order = jnp.argsort(flat, stable=True)  # pairs sorted by expert
    group_sizes = jnp.bincount(flat, length=w1.shape[0]).astype(jnp.int32)
    ys = _swiglu_experts(jnp.take(x, order // k, axis=0), group_sizes, w1, w2, w3, fp8)
    ys = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)  # back to token order
    return _combine(ys, weights, x.dtype)


def _expert_parallel_body(x, indices, weights, w1, w2, w3, fp8=False):
    """Per device, inside shard_map (shapes in the module docstring)."""
    w1 = jax.lax.all_gather(w1, "fsdp", axis=1, tiled=True)  # [E_loc, D, F_loc]
    w3 = jax.lax.all_gather(w3, "fsdp", axis=1, tiled=True)
    w2 = jax.lax.all_gather(w2, "fsdp", axis=2, tiled=True)  # [E_loc, F_loc, D]
    peers, e_loc = jax.lax.axis_size("expert"), w1.shape[0]
    n, k = indices.shape
    m = n * k
    flat = indices.reshape(m)
    dest, local_expert = flat // e_loc, flat % e_loc
    # Bucket the pairs by destination peer: rank of each pair inside its destination's bucket.
    order = jnp.argsort(flat, stable=True)  # by expert, hence by destination
    dest_sorted = dest[order]
    starts = jnp.cumsum(jnp.bincount(dest, length=peers)) - jnp.bincount(dest, length=peers)
    rank = jnp.arange(m) - starts[dest_sorted]
    send_x = jnp.zeros((peers, m, x.shape[1]), x.dtype).at[dest_sorted, rank].set(x[order // k])
    send_e = jnp.full((peers, m), e_loc, jnp.int32).at[dest_sorted, rank].set(local_expert[order])
    # Exchange: row block j of the result came from peer j.
    recv_x = jax.lax.all_to_all(send_x, "expert", 0, 0).reshape(peers * m, -1)
    recv_e = jax.lax.all_to_all(send_e, "expert", 0, 0).reshape(peers * m)
    by_expert = jnp.argsort(recv_e, stable=True)  # empty rows (id e_loc) last
    group_sizes = jnp.bincount(recv_e, length=e_loc + 1)[:e_loc].astype(jnp.int32)
    ys = _swiglu_experts(recv_x[by_expert], group_sizes, w1, w2, w3, fp8)
    ys = jnp.zeros_like(ys).at[by_expert].set(ys).reshape(peers, m, -1)
    back = jax.lax.all_to_all(ys, "expert", 0, 0)  # block j: my pairs that peer j computed
    pair_out = jnp.zeros((m, x.shape[1]), ys.dtype).at[order].set(back[dest_sorted, rank])
    out = _combine(pair_out.reshape(n, k, -1), weights, jnp.float32)
    return jax.lax.psum(out, "tensor").astype(x.dtype)  # sum the hidden-dim shards


def routed_experts(x: jax.Array, indices: jax.Array, weights: jax.Array, w1: jax.Array,
                   w2: jax.Array, w3: jax.Array, fp8: bool = False) -> jax.Array:
    """x [N, D], indices / weights [N, K], w1 / w3 [E, D, F], w2 [E, F, D] -> [N, D] in x's dtype.

    fp8: the experts' GEMMs in FP8 (`ops.fp8.fp8_grouped_matmul`); pass the fp32 master weights.
    Under tensor parallelism each device quantizes its own F slice in 128x128 blocks, and the
    weight gradient's 128x1 token tiles restart at each device's rows of an expert: valid tiles of
    the recipe, not bit-equal to one device's."""
    mesh = jax.sharding.get_abstract_mesh()
    batch_ways = 1 if mesh.empty else int(np.prod([mesh.shape[a] for a in BATCH_AXES]))
    if mesh.empty or mesh.size == 1 or x.shape[0] % batch_ways:
        # One device, or too few tokens to split (an init trace, a small decode batch): the
        # plain path, which XLA partitions as it can.
        return local_routed_experts(x, indices, weights, w1, w2, w3, fp8)
    batch = P(BATCH_AXES, None)
    w_in, w_out = P("expert", "fsdp", "tensor"), P("expert", "tensor", "fsdp")
    sharded = jax.shard_map(functools.partial(_expert_parallel_body, fp8=fp8), mesh=mesh,
                            in_specs=(batch, batch, batch, w_in, w_out, w_in), out_specs=batch)
    return sharded(x, indices, weights, w1, w2, w3)
