"""DeepSeekMoE: sigmoid / softmax router with group-limited top-k, dropless routed experts, shared
experts (SPEC.md section 2, "Gate" and "Load balance").

Letters (`dsv3_jax/NOTATION.md`): B, T, D, F expert hidden dim, E routed experts,
G expert groups, K activated experts per token, M = B*T*K token-expert pairs.

Routing (`Gate`):
  s     = sigmoid(x W_gate) or softmax(x W_gate)             [B, T, E], float32
  sel   = s + stop_gradient(e_score_correction_bias)         selection only (sigmoid routers)
  group score = sum of the top-2 sel per group (max when there is no bias); all but the best
  n_limited_groups groups set to -inf; indices = top-K of sel
  weights = s[indices] (/ their sum for sigmoid when cfg.norm_topk_prob) * route_scale
The bias is a parameter (checkpoints carry it) that no gradient reaches; the balance rule in the
training loop updates it from `expert_load`.

Experts (`MoE`): token-expert pairs are sorted by expert, pushed through `ops.grouped_matmul`
(w1, w3, SwiGLU, w2; `ops.fp8.fp8_grouped_matmul` when cfg.fp8), unsorted and summed with their
weights; on one device no token is dropped. Under a device mesh the same runs expert-parallel
(`dsv3_jax/parallel/expert_parallel.py`), whose exchange drops the pairs past each peer's capacity
when cfg.moe_capacity_factor is set (their share is Routing.dropped_fraction). The shared experts
form one SwiGLU MLP of width n_shared_experts * moe_inter_dim, added to every token.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers import MLP, param_with_axes
from dsv3_jax.parallel.expert_parallel import (W_IN_AXES, W_OUT_AXES, grouped_matmul_for,
                                              routed_experts)


@flax.struct.dataclass
class Routing:
    """What the gate decides for a batch, and the statistics the balance rules need."""

    weights: jax.Array  # [B, T, K] float32 gate values (route_scale applied)
    indices: jax.Array  # [B, T, K] int32 chosen experts
    expert_load: jax.Array  # [E] int32 count of valid tokens routed to each expert
    balance_loss: jax.Array  # [] sum_i f_i P_i averaged over sequences (alpha not applied)
    # [] float32 share of the B*T*K token-expert pairs (padding included) the expert-parallel
    # exchange dropped for capacity (MoE sets it; 0 when dropless).
    dropped_fraction: jax.Array | None = None


def sequence_balance_loss(scores: jax.Array, indices: jax.Array, valid: jax.Array,
                          n_experts: int) -> jax.Array:
    """Complementary sequence-wise balance loss, without alpha (SPEC.md "Load balance").

    Per sequence of T valid tokens: f_i = E / (K T) sum_t 1[i in TopK(t)],
    P_i = (1/T) sum_t s_{i,t} / sum_j s_{j,t}, loss = sum_i f_i P_i; averaged over sequences that
    hold at least one valid token.

    Args:
      scores: [B, T, E] router scores s (sigmoid or softmax), float32.
      indices: [B, T, K] chosen experts.
      valid: [B, T] bool, False for padding.
    """
    k = indices.shape[-1]
    validf = valid.astype(jnp.float32)
    n_tokens = validf.sum(axis=1)  # [B]
    per_seq_tokens = jnp.maximum(n_tokens, 1.0)[:, None]
    chosen = jax.nn.one_hot(indices, n_experts, dtype=jnp.float32).sum(axis=2)  # [B, T, E]
    f = n_experts / (k * per_seq_tokens) * jnp.einsum("bte,bt->be", chosen, validf)
    normed = scores / jnp.sum(scores, axis=-1, keepdims=True)
    p = jnp.einsum("bte,bt->be", normed, validf) / per_seq_tokens
    per_seq = jnp.sum(jax.lax.stop_gradient(f) * p, axis=-1)  # [B]
    has_tokens = (n_tokens > 0).astype(jnp.float32)
    return jnp.sum(per_seq * has_tokens) / jnp.maximum(has_tokens.sum(), 1.0)


class Gate(nn.Module):
    """The router. Parameters: `kernel` [D, E] and, for sigmoid routers, `e_score_correction_bias` [E]."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array) -> Routing:
        """x [B, T, D], valid bool [B, T] -> Routing. Scores are computed in float32."""
        c = self.cfg
        e, g = c.n_routed_experts, c.n_expert_groups
        kernel = param_with_axes(self, "kernel", nn.initializers.normal(c.init_std),
                                 (c.dim, e), ("embed", None), jnp.dtype(c.param_dtype))
        logits = jnp.dot(x.astype(jnp.float32), kernel.astype(jnp.float32))
        scores = jax.nn.sigmoid(logits) if c.score_func == "sigmoid" else jax.nn.softmax(logits)
        selection = scores
        if c.has_score_correction_bias:
            bias = param_with_axes(self, "e_score_correction_bias", nn.initializers.zeros, (e,),
                                   (None,), jnp.float32)
            selection = scores + jax.lax.stop_gradient(bias)
        selection = jax.lax.stop_gradient(selection)
        if g > 1:
            grouped = selection.reshape(selection.shape[:-1] + (g, e // g))
            group_scores = (jax.lax.top_k(grouped, 2)[0].sum(axis=-1)
                            if c.has_score_correction_bias else grouped.max(axis=-1))
            kept = jax.nn.one_hot(jax.lax.top_k(group_scores, c.n_limited_groups)[1], g,
                                  dtype=jnp.bool_).any(axis=-2)  # [B, T, G]
            selection = jnp.where(kept[..., None], grouped, -jnp.inf).reshape(selection.shape)
        indices = jax.lax.top_k(selection, c.n_activated_experts)[1]
        weights = jnp.take_along_axis(scores, indices, axis=-1)
        if c.score_func == "sigmoid" and c.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights * c.route_scale
        load = jnp.einsum("btke,bt->e", jax.nn.one_hot(indices, e, dtype=jnp.int32),
                          valid.astype(jnp.int32))
        return Routing(weights=weights, indices=indices.astype(jnp.int32), expert_load=load,
                       balance_loss=sequence_balance_loss(scores, indices, valid, e))


class MoE(nn.Module):
    """Shared experts + routed experts. Expert weights are stacked: w1, w3 [E, D, F], w2 [E, F, D]."""

    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.gate = Gate(c)
        init = nn.initializers.normal(c.init_std)
        pdt = jnp.dtype(c.param_dtype)
        e, d, f = c.n_routed_experts, c.dim, c.moe_inter_dim
        self.w1 = param_with_axes(self, "w1", init, (e, d, f), W_IN_AXES, pdt)
        self.w2 = param_with_axes(self, "w2", init, (e, f, d), W_OUT_AXES, pdt)
        self.w3 = param_with_axes(self, "w3", init, (e, d, f), W_IN_AXES, pdt)
        if c.n_shared_experts:
            self.shared_experts = MLP(c, c.n_shared_experts * c.moe_inter_dim)

    def __call__(self, x: jax.Array, valid: jax.Array) -> tuple[jax.Array, Routing]:
        """x [B, T, D], valid bool [B, T] -> (y [B, T, D], Routing)."""
        c = self.cfg
        dtype = jnp.dtype(c.dtype)
        with jax.named_scope("gate"):
            routing = self.gate(x, valid)
        b, t, d = x.shape
        with jax.named_scope("routed_experts"):
            # FP8 quantizes the fp32 master weights itself; bf16 runs cast them first.
            cast = (lambda w: w) if c.fp8 else (lambda w: w.astype(dtype))
            y, dropped = routed_experts(x.reshape(b * t, d).astype(dtype),
                                        routing.indices.reshape(b * t, -1),
                                        routing.weights.reshape(b * t, -1),
                                        cast(self.w1), cast(self.w2), cast(self.w3),
                                        grouped_matmul_for(c.fp8), c.moe_capacity_factor)
            y = y.reshape(b, t, d)
            routing = routing.replace(
                dropped_fraction=dropped.astype(jnp.float32) / routing.indices.size)
        if c.n_shared_experts:
            with jax.named_scope("shared_experts"):
                y = y + self.shared_experts(x)
        return y, routing
