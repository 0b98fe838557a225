"""Multi-token prediction module (DeepSeek-V3 report section 2.2; SPEC.md "Multi-token prediction").

Letters (`dsv3_jax/NOTATION.md`): B, T, D.

Module k (k = 1..mtp_depth) combines the previous depth's hidden state h^{k-1}_i (the main model's
last hidden state, before its final norm, for k = 1) with the embedding of token t_{i+k}:

  h'_i = eh_proj(concat[enorm(Emb(t_{i+k})), hnorm(h^{k-1}_i)])      embedding first, as released
  h^k  = Block(h')                                                   one full MLA + MoE block
  logits^k = head(norm(h^k))     (norm = HF `shared_head.norm`; Emb and head shared with the model)

and predicts t_{i+k+1}. The module returns h^k and norm(h^k); the parent applies the shared head.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.block import Block, remat
from dsv3_jax.model.layers import Linear, rms_norm
from dsv3_jax.model.moe import Routing


class MTPModule(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.enorm = rms_norm(c, "embed")
        self.hnorm = rms_norm(c, "embed")
        self.eh_proj = Linear(2 * c.dim, c.dim, ("mtp_concat", "embed"), c)
        self.block = remat(Block, c)(c, moe=True)
        self.norm = rms_norm(c, "embed")

    def __call__(self, h_prev: jax.Array, next_embeddings: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array, Routing]:
        """h_prev [B, T, D], next_embeddings [B, T, D] (Emb(t_{i+k})), positions [B, T] ->
        (h^k [B, T, D], norm(h^k) [B, T, D], Routing of the block's MoE)."""
        h, routing = self.block(self._merge(h_prev, next_embeddings), positions, segment_ids)
        return h, self.norm(h), routing

    def _merge(self, h_prev, next_embeddings):
        merged = jnp.concatenate([self.enorm(next_embeddings), self.hnorm(h_prev)], axis=-1)
        return self.eh_proj(merged)

    def decode(self, h_prev: jax.Array, next_embeddings: jax.Array, positions: jax.Array,
               cache: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The same over this module's own latent cache [B, S, C + R] (its block attends to the
        module's earlier positions): -> (h^k, norm(h^k), updated cache)."""
        h, cache = self.block.decode(self._merge(h_prev, next_embeddings), positions, cache)
        return h, self.norm(h), cache
