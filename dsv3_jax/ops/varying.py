"""Inside shard_map: the mesh axes an array varies over, and the casts that make a custom_vjp's
inputs (or a loop's carry) agree on them. Outside shard_map there are none and these are no-ops.
"""

from __future__ import annotations

import jax


def varying_axes(a) -> frozenset:
    """The shard_map mesh axes `a` varies over (empty outside shard_map)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)  # jax 0.11: aval.mat.varying; earlier releases: aval.vma
    return frozenset(getattr(mat, "varying", None) or getattr(aval, "vma", None) or ())


def same_varying_axes(*arrays):
    """Inside shard_map: casts every array to vary over the union of the mesh axes any of them
    varies over. A custom_vjp must return each cotangent with its input's varying axes, and dw,
    made from x and dy, varies wherever x does (e.g. over the batch axes, where the weights are
    replicated); with w cast up front, autodiff transposes the cast, i.e. sums dw over those axes.
    A fori_loop's carry must keep one type, so its zeros are cast to vary like the operands.
    Outside shard_map there are none and this returns the arrays unchanged."""
    vmas = [varying_axes(a) for a in arrays]
    union = frozenset().union(*vmas)
    return [jax.lax.pcast(a, tuple(sorted(union - v)), to="varying") if union - v else a
            for a, v in zip(arrays, vmas)]


__all__ = ["same_varying_axes", "varying_axes"]
