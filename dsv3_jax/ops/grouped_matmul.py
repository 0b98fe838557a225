"""Grouped (ragged) matmul for the routed experts: the one place that picks its implementation.

Legend: M rows (token-expert pairs, sorted by expert), K input dim, N output dim, G groups (experts).

`grouped_matmul(x, w, group_sizes)[m] = x[m] @ w[g(m)]`, where rows are laid out group after group:
the first group_sizes[0] rows belong to group 0, the next group_sizes[1] to group 1, and so on.
Rows past sum(group_sizes) (padding) come back as zeros. Products accumulate in float32 and are
returned in x's dtype.

Every platform uses `jax.lax.ragged_dot` for now (XLA's, with its own transpose rules for the
gradients); the Pallas kernels for GPU and TPU plug in here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def grouped_matmul_reference(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, K], w [G, K, N], group_sizes int32 [G] -> [M, N] in x's dtype."""
    out = jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes.astype(jnp.int32),
                             preferred_element_type=jnp.float32)
    return out.astype(x.dtype)


def grouped_matmul(x: jax.Array, w: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """x [M, K], w [G, K, N], group_sizes int32 [G] -> [M, N]; see the module docstring."""
    return grouped_matmul_reference(x, w, group_sizes)
