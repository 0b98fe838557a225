"""Routed experts, on one device or across a mesh (expert parallelism with shard_map).

Letters (`dsv3_jax/NOTATION.md`): U tokens (of one device inside shard_map), K experts per token,
E experts (E_loc per device of the `expert` axis), P = size of the `expert` axis, D model dim,
F expert hidden dim (F_loc per device of the `tensor` axis), M = U * K token-expert pairs on one
device, C the rows each device sends each peer (`exchange_capacity`). The mesh axes named here
are those the rules table (`parallel/mesh.py`) gives the expert weights' and the batch's logical
axes.

`routed_experts(x, indices, weights, w1, w2, w3, matmul, capacity_factor)[0][t]` =
sum_k weights[t, k] * SwiGLU_{indices[t, k]}(x[t]) over the pairs (t, k) the exchange kept is what
DeepSeekMoE needs; it picks the implementation from the mesh in context (`jax.set_mesh`):

- no mesh, or one device: `local_routed_experts`: sort the M pairs by expert, run
  `ops.grouped_matmul` (w1, w3, SwiGLU, w2), unsort, weight and sum over K. Never drops.
- a mesh: the same math inside `jax.shard_map`, where collectives are explicit:
    tokens     [U, D] per device, split over the batch axes (data, fsdp, expert), replicated over
               tensor;
    weights    w1, w3 [E_loc, D / fsdp, F_loc], w2 [E_loc, F_loc, D / fsdp]: experts split over
               `expert`, the hidden dim over `tensor`, D over `fsdp` (gathered here: FSDP);
    dispatch   each pair goes to the `expert`-axis peer that owns its expert: pairs bucketed by
               destination, in (token, k) order inside a bucket, into a [P, C, D] buffer,
               exchanged with one `all_to_all`, with each row's local expert id. C =
               ceil(capacity_factor x M / P) (at most M); capacity_factor 0 gives C = M, which
               any routing fits (dropless, P x the bytes of an even split). A pair whose rank in
               its bucket is >= C is dropped: it is not sent and contributes zero (its gate
               weight gets no gradient); the count is returned;
    experts    received rows sorted by local expert and run through `ops.grouped_matmul`
               (empty buffer rows sort last and are skipped);
    combine    results return with the reverse `all_to_all`, are weighted and summed per token,
               and the per-`tensor`-shard partial sums over F are added with one `psum`.
  `jax.lax.ragged_all_to_all` would send only the rows each peer needs on GPU/TPU, but it is
  unimplemented on CPU, where this is tested, and is not wired in yet.
The router's expert load (for the bias update) is computed outside, on the globally sharded
routing decisions (before any drop), so it is always the global count of routed pairs.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.ops.fp8 import fp8_grouped_matmul
from dsv3_jax.ops.grouped_matmul import grouped_matmul
from dsv3_jax.parallel.mesh import LOGICAL_AXIS_RULES, batch_ways

# The logical axes of the expert weights (DeepSeekMoE creates them with these); their mesh axes,
# and so every spec and collective below, come from the rules table.
W_IN_AXES = ("exp", "embed", "moe_mlp")  # w1, w3 [E, D, F]
W_OUT_AXES = ("exp", "moe_mlp", "embed")  # w2 [E, F, D]

GroupedMatmul = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def grouped_matmul_for(fp8: bool) -> GroupedMatmul:
    """The experts' grouped matmul: `ops.fp8.fp8_grouped_matmul` (FP8 Fprop, Dgrad and Wgrad with
    block scales; pass the fp32 master weights) or `ops.grouped_matmul` in the rows' dtype."""
    return fp8_grouped_matmul if fp8 else grouped_matmul


def _swiglu_experts(xs, group_sizes, w1, w2, w3, matmul: GroupedMatmul):
    """Rows xs [M, D] grouped by expert (group_sizes [E]) -> w2(silu(w1 x) * w3 x) [M, D]."""
    h = nn.silu(matmul(xs, w1, group_sizes)) * matmul(xs, w3, group_sizes)
    return matmul(h, w2, group_sizes)


def _combine(ys, weights, dtype):
    """ys [U, K, D] expert outputs, weights [U, K] -> weighted sum [U, D] (in float32)."""
    f32 = jnp.float32
    return jnp.einsum("ukd,uk->ud", ys.astype(f32), weights.astype(f32)).astype(dtype)


def local_routed_experts(x: jax.Array, indices: jax.Array, weights: jax.Array, w1: jax.Array,
                         w2: jax.Array, w3: jax.Array,
                         matmul: GroupedMatmul = grouped_matmul) -> jax.Array:
    """One device. x [U, D], indices / weights [U, K], w1 / w3 [E, D, F], w2 [E, F, D] -> [U, D]."""
    n, k = indices.shape
    flat = indices.reshape(-1)  # [M]
    order = jnp.argsort(flat, stable=True)  # pairs sorted by expert
    group_sizes = jnp.bincount(flat, length=w1.shape[0]).astype(jnp.int32)
    ys = _swiglu_experts(jnp.take(x, order // k, axis=0), group_sizes, w1, w2, w3, matmul)
    ys = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)  # back to token order
    return _combine(ys, weights, x.dtype)


def _gather(w, axes, axis):
    return jax.lax.all_gather(w, axes, axis=axis, tiled=True) if axes else w


def exchange_capacity(pairs: int, peers: int, capacity_factor: float) -> int:
    """C, the rows each device sends to each `expert`-axis peer (and so the exchange buffers'
    [P, C, D]): ceil(capacity_factor * M / P) for M = `pairs` token-expert pairs per device and
    P = `peers`, at most M; M (dropless: any routing fits) for capacity_factor 0 or one peer."""
    if not capacity_factor or peers == 1:
        return pairs
    return max(1, min(pairs, math.ceil(capacity_factor * pairs / peers)))


def _expert_parallel_body(x, indices, weights, w1, w2, w3, *, matmul, capacity_factor, expert,
                          fsdp, tensor):
    """Per device, inside shard_map (shapes in the module docstring); `expert`, `fsdp`, `tensor`
    are the mesh axes of the expert weights' experts, model dim and hidden dim. Returns (out
    [U, D], dropped pairs [1] int32)."""
    w1 = _gather(w1, fsdp, 1)  # [E_loc, D, F_loc]
    w3 = _gather(w3, fsdp, 1)
    w2 = _gather(w2, fsdp, 2)  # [E_loc, F_loc, D]
    peers, e_loc = jax.lax.axis_size(expert), w1.shape[0]
    n, k = indices.shape
    m = n * k
    cap = exchange_capacity(m, peers, capacity_factor)
    flat = indices.reshape(m)
    dest, local_expert = flat // e_loc, flat % e_loc
    # Bucket the pairs by destination peer, in pair order (token, then k) inside a bucket: a
    # pair's rank is its place in its destination's bucket, and ranks >= C are dropped.
    order = jnp.argsort(dest, stable=True)
    dest_sorted = dest[order]
    counts = jnp.bincount(dest, length=peers)
    rank = jnp.arange(m) - (jnp.cumsum(counts) - counts)[dest_sorted]
    dropped = jnp.sum(jnp.maximum(counts - cap, 0)).astype(jnp.int32)[None]
    # Rows past capacity fall outside the [P, C] buffer: scatter drops them, the gather back
    # fills them with zeros.
    send_x = jnp.zeros((peers, cap, x.shape[1]), x.dtype).at[dest_sorted, rank].set(
        x[order // k], mode="drop")
    send_e = jnp.full((peers, cap), e_loc, jnp.int32).at[dest_sorted, rank].set(
        local_expert[order], mode="drop")
    # Exchange: row block j of the result came from peer j.
    recv_x = jax.lax.all_to_all(send_x, expert, 0, 0).reshape(peers * cap, -1)
    recv_e = jax.lax.all_to_all(send_e, expert, 0, 0).reshape(peers * cap)
    by_expert = jnp.argsort(recv_e, stable=True)  # empty rows (id e_loc) last
    group_sizes = jnp.bincount(recv_e, length=e_loc + 1)[:e_loc].astype(jnp.int32)
    ys = _swiglu_experts(recv_x[by_expert], group_sizes, w1, w2, w3, matmul)
    ys = jnp.zeros_like(ys).at[by_expert].set(ys).reshape(peers, cap, -1)
    back = jax.lax.all_to_all(ys, expert, 0, 0)  # block j: my pairs that peer j computed
    returned = back.at[dest_sorted, rank].get(mode="fill", fill_value=0)  # dropped pairs: 0
    pair_out = jnp.zeros((m, x.shape[1]), ys.dtype).at[order].set(returned)
    out = _combine(pair_out.reshape(n, k, -1), weights, jnp.float32)
    if tensor:
        out = jax.lax.psum(out, tensor)  # sum the hidden-dim shards
    return out.astype(x.dtype), dropped


def routed_experts(x: jax.Array, indices: jax.Array, weights: jax.Array, w1: jax.Array,
                   w2: jax.Array, w3: jax.Array, matmul: GroupedMatmul = grouped_matmul,
                   capacity_factor: float = 0.0) -> tuple[jax.Array, jax.Array]:
    """x [U, D], indices / weights [U, K], w1 / w3 [E, D, F], w2 [E, F, D] -> (y [U, D] in x's
    dtype, dropped int32 []: the token-expert pairs left out by the exchange's capacity).

    matmul: `grouped_matmul_for(fp8)`. In FP8 under tensor parallelism each device quantizes its
    own F slice in 128x128 blocks, and the weight gradient's 128x1 token tiles restart at each
    device's rows of an expert: valid tiles of the recipe, not bit-equal to one device's.
    capacity_factor: of the expert-parallel exchange (`exchange_capacity`); 0 is dropless. The
    one-device path never drops."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or x.shape[0] % batch_ways(mesh.shape):
        # One device, or too few tokens to split (an init trace, a small decode batch): the
        # plain path, which XLA partitions as it can.
        return (local_routed_experts(x, indices, weights, w1, w2, w3, matmul),
                jnp.zeros([], jnp.int32))
    batch = nn.logical_to_mesh_axes(("activation_batch", None), LOGICAL_AXIS_RULES)
    w_in = nn.logical_to_mesh_axes(W_IN_AXES, LOGICAL_AXIS_RULES)  # P(expert, fsdp, tensor)
    w_out = nn.logical_to_mesh_axes(W_OUT_AXES, LOGICAL_AXIS_RULES)
    body = functools.partial(_expert_parallel_body, matmul=matmul,
                             capacity_factor=capacity_factor, expert=w_in[0], fsdp=w_in[1],
                             tensor=w_in[2])
    per_device = jax.sharding.PartitionSpec(batch[0])  # one dropped count per batch shard
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(batch, batch, batch, w_in, w_out, w_in),
                            out_specs=(batch, per_device))
    y, dropped = sharded(x, indices, weights, w1, w2, w3)
    return y, jnp.sum(dropped)
