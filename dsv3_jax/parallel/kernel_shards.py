"""The attention cores and the FP8 linear, one device per shard (shard_map over the mesh in context).

Letters (`dsv3_jax/NOTATION.md`): B, T, S, H, A, O, C, R as in `ops/attention.py`; M rows, I, J the
contracted and output dims of a matmul. "Batch axes" are the mesh axes of `activation_batch`, "heads
axes" those the rules table gives `heads` beside them: every spec here comes from
`parallel/mesh.py` LOGICAL_AXIS_RULES.

On a Hopper GPU `ops.attention` and `ops.fp8` run Pallas Mosaic kernels, which XLA cannot partition:
called on sharded activations it gathers their inputs and every device computes the whole batch.
Each wrapper here calls the ops function inside `jax.shard_map`, so each device runs it on its own
shard; the body is whatever the ops function picks (kernel or reference), the math unchanged:

- `mla_attention(q, k, v, segment_ids)`: q, k [B, T, H, A], v [B, T, H, O] split over the batch
  axes (B) and the heads axes (H), segment ids [B, T] over the batch axes. Attention is independent
  per sequence and per head, so no collective is needed.
- `mla_decode(q_latent, q_pe, cache, positions)`: q_latent [B, T, H, C], q_pe [B, T, H, R] over
  batch and heads; the latent cache [B, S, C + R] and positions [B, T] over batch (the cache row
  is shared by all heads, so each heads shard reads all of its sequences' rows).
- `fp8_linear(x, w, w_axes)`: x [..., I] rows (dim 0) over the batch axes; w [I, J] enters split as
  its logical axes `w_axes` say. A weight dim's batch axes (FSDP: fsdp, expert) are gathered for
  the call, as XLA does for a plain matmul; its other axes (tensor) stay split:
    column-parallel (J over tensor):  y [..., J / tensor] comes out split; dx = sum over the tensor
                                      shards of dy_j w_j^T, a psum in x's dtype (each shard's
                                      Dgrad GEMM rounds to it first, as a tensor-parallel all-reduce
                                      of bf16 activation gradients does);
    row-parallel (I over tensor):     x enters split along I too, and the partial products
                                      x_i w_i [..., J] come out of the GEMM in float32
                                      (`fp8_linear(out_dtype=float32)`), are psum'ed over tensor
                                      and rounded to x's dtype once.
  dw: autodiff sums the per-shard x^T dy over the batch axes; over the axes w is replicated on, the
  shard_map transpose does it (it psums an input's cotangent over the mesh axes its spec leaves
  out), over the gathered ones the gather's transpose (a psum_scatter), which hands dw back with
  w's own sharding. dx of a column-parallel call is summed over tensor the first way (x is
  replicated there).

The shard_maps run with check_vma=False: the bodies are opaque kernels or references that do not
type their values by the mesh axes they vary over (`ops.fp8.fp8_gemm_reference` starts its
fori_loop from an invariant zero accumulator, which a varying operand makes a type error), and the
only collectives are the ones above, whose transposes are the sums just described.

FP8 tiles and shards: 1x128 activation tiles run along I (whole rows), so splitting rows changes
nothing; 128x128 weight blocks and the 1x128 tiles of a tensor-split dim (J for column-parallel: dy
in Dgrad; I for row-parallel: x in Fprop) land on one device's boundaries when that dim's shard is
a multiple of 128; the Wgrad 128x1 tiles along the rows restart at each device's first row, and
coincide with one device's when each device holds a multiple of 128 rows. With those sizes the
wrapped call equals one device's up to fp32 summation order (and a column-parallel dx in bf16, up
to the rounding of each shard's part); otherwise it runs valid tiles of the
recipe, a different quantization of the same product (as the expert-parallel experts do).

When nothing is split, the ops function is called directly: no mesh, a 1-device mesh, inside
another shard_map, or dims that do not divide their mesh axes (attention: a dim that does not
divide is left whole, e.g. a 1-sequence decode batch still splits its heads; the FP8 linear is
called directly unless its rows and both weight dims divide).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dsv3_jax.ops import attention, fp8
from dsv3_jax.parallel.mesh import LOGICAL_AXIS_RULES

P = jax.sharding.PartitionSpec

# The logical axes of the attention operands [B, T, H, *]; their mesh axes come from the table.
HEADS_ACTIVATION_AXES = ("activation_batch", "activation_length", "heads", None)


def _mesh_to_split():
    """The abstract mesh in context, or None where nothing can be split over it here (none, one
    device, or already inside a shard_map: its axes are manual)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or mesh.manual_axes:
        return None
    return mesh


def _axes(entry) -> tuple[str, ...]:
    """One PartitionSpec entry as a tuple of mesh axes (None -> ())."""
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def _ways(mesh, axes: Sequence[str]) -> int:
    return int(np.prod([mesh.shape[a] for a in axes]))


def _spec_entry(axes: Sequence[str]):
    return tuple(axes) if axes else None


def _logical_axes(logical: Sequence[str | None], mesh) -> list[tuple[str, ...]]:
    """Mesh axes of each logical dim (rules table), keeping only the axes this mesh has."""
    spec = nn.logical_to_mesh_axes(tuple(logical), LOGICAL_AXIS_RULES)
    return [tuple(a for a in _axes(e) if a in mesh.axis_names) for e in spec]


def _fitting(mesh, axes: tuple[str, ...], size: int) -> tuple[str, ...]:
    """`axes` if a dim of `size` divides over them, else () (the dim is left whole)."""
    return axes if size % _ways(mesh, axes) == 0 else ()


# ------------------------------------------------------------------------------------------------
# Attention cores
# ------------------------------------------------------------------------------------------------
def _batch_and_heads(mesh, b: int, h: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The mesh axes B and H are split over here (each () when it does not divide)."""
    batch, _, heads, _ = _logical_axes(HEADS_ACTIVATION_AXES, mesh)
    return _fitting(mesh, batch, b), _fitting(mesh, heads, h)


def mla_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                  segment_ids: jax.Array | None = None) -> jax.Array:
    """`ops.attention.mla_attention` per (batch, heads) shard: q, k [B, T, H, A], v [B, T, H, O],
    segment_ids int [B, T] or None -> [B, T, H, O] in q's dtype, split as q (module docstring)."""
    mesh = _mesh_to_split()
    batch, heads = _batch_and_heads(mesh, q.shape[0], q.shape[2]) if mesh else ((), ())
    if not (batch or heads):
        return attention.mla_attention(q, k, v, scale=scale, segment_ids=segment_ids)
    qkv = P(_spec_entry(batch), None, _spec_entry(heads), None)
    rows = P(_spec_entry(batch), None)

    def body(q, k, v, *seg):
        return attention.mla_attention(q, k, v, scale=scale, segment_ids=seg[0] if seg else None)

    seg = () if segment_ids is None else (segment_ids,)
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(qkv, qkv, qkv) + (rows,) * len(seg),
                            out_specs=qkv, check_vma=False)
    return sharded(q, k, v, *seg)


def mla_decode(q_latent: jax.Array, q_pe: jax.Array, cache: jax.Array, q_positions: jax.Array, *,
               scale: float) -> jax.Array:
    """`ops.attention.mla_decode` per (batch, heads) shard: q_latent [B, T, H, C], q_pe [B, T, H, R],
    cache [B, S, C + R], q_positions int [B, T] -> [B, T, H, C] in q_latent's dtype."""
    mesh = _mesh_to_split()
    batch, heads = _batch_and_heads(mesh, q_latent.shape[0], q_latent.shape[2]) if mesh else ((), ())
    if not (batch or heads):
        return attention.mla_decode(q_latent, q_pe, cache, q_positions, scale=scale)
    queries = P(_spec_entry(batch), None, _spec_entry(heads), None)
    body = lambda ql, qp, c, pos: attention.mla_decode(ql, qp, c, pos, scale=scale)
    sharded = jax.shard_map(
        body, mesh=mesh, in_specs=(queries, queries, P(_spec_entry(batch), None, None), P(_spec_entry(batch), None)),
        out_specs=queries, check_vma=False)
    return sharded(q_latent, q_pe, cache, q_positions)


# ------------------------------------------------------------------------------------------------
# FP8 linear
# ------------------------------------------------------------------------------------------------
def _split_weight_dim(mesh, axes: tuple[str, ...], batch: tuple[str, ...]):
    """A weight dim's mesh axes -> (kept, gathered): its batch axes are gathered (FSDP), the others
    stay split. None when the kept axes do not all come first in the dim's order (gathering a minor
    axis then leaves each device a contiguous block only in that case)."""
    kept = tuple(a for a in axes if a not in batch)
    gathered = tuple(a for a in axes if a in batch)
    return (kept, gathered) if axes == kept + gathered else None


def _gather(w: jax.Array, axes: tuple[str, ...], axis: int) -> jax.Array:
    return jax.lax.all_gather(w, axes, axis=axis, tiled=True) if axes else w


def _fp8_linear_body(x, w, *, gather_in, gather_out, psum_axes):
    """Per device: x [M_loc, ..., I or I_loc], w shard -> y [M_loc, ..., J or J_loc] in x's dtype."""
    w = _gather(_gather(w, gather_in, 0), gather_out, 1)  # [I or I_loc, J or J_loc]
    y = fp8.fp8_linear(x, w, out_dtype=jnp.float32 if psum_axes else None)
    if psum_axes:
        y = jax.lax.psum(y, psum_axes)  # row-parallel: partial products over I's tensor shards
    return y.astype(x.dtype)


def fp8_linear(x: jax.Array, w: jax.Array, w_axes: Sequence[str | None]) -> jax.Array:
    """`ops.fp8.fp8_linear(x, w)` per shard (module docstring): x [..., I] in the compute dtype,
    w [I, J] the fp32 master kernel whose dims have the logical axes `w_axes` (in, out) ->
    [..., J] in x's dtype; dw fp32, with w's sharding."""
    mesh = _mesh_to_split()
    if mesh is None or x.ndim < 2 or w.ndim != 2:
        return fp8.fp8_linear(x, w)
    if len(w_axes) != 2:
        raise ValueError(f"fp8_linear: w_axes={tuple(w_axes)!r} must name the 2 dims (in, out) of "
                         f"w {w.shape}.")
    batch = _logical_axes(("activation_batch",), mesh)[0]
    w_in, w_out = _logical_axes(w_axes, mesh)
    split_in = _split_weight_dim(mesh, w_in, batch)
    split_out = _split_weight_dim(mesh, w_out, batch)
    fits = (split_in and split_out and x.shape[0] % _ways(mesh, batch) == 0
            and w.shape[0] % _ways(mesh, w_in) == 0 and w.shape[1] % _ways(mesh, w_out) == 0)
    if not (fits and batch):
        return fp8.fp8_linear(x, w)
    (kept_in, gather_in), (kept_out, gather_out) = split_in, split_out
    middle = (None,) * (x.ndim - 2)
    x_spec = P(_spec_entry(batch), *middle, _spec_entry(kept_in))
    y_spec = P(_spec_entry(batch), *middle, _spec_entry(kept_out))
    body = functools.partial(_fp8_linear_body, gather_in=gather_in, gather_out=gather_out,
                             psum_axes=kept_in)
    w_spec = P(_spec_entry(w_in), _spec_entry(w_out))
    sharded = jax.shard_map(body, mesh=mesh, in_specs=(x_spec, w_spec), out_specs=y_spec,
                            check_vma=False)
    return sharded(x, w)
