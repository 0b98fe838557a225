"""One transformer block and the stack of them.

Letters (`dsv3_jax/NOTATION.md`): L layers in a stack, B, T, S cache slots, D,
C + R one latent-cache row.

  Block:  x = x + attn(attn_norm(x));  x = x + ffn(ffn_norm(x))
  ffn = DeepSeekMoE, or a dense SwiGLU MLP for the first n_dense_layers.

`Stack` runs L blocks of one kind, either under `nn.scan` (parameters stacked on a leading "layers"
axis; compile time does not grow with depth) or unrolled (`layers_0`, `layers_1`, ...); both give
the same numbers. The remat policy wraps each block's training forward.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.layers import MLP, constrain_activation, rms_norm
from dsv3_jax.model.mla import MLA
from dsv3_jax.model.moe import MoE, Routing


class Block(nn.Module):
    cfg: ModelConfig
    moe: bool

    def setup(self):
        c = self.cfg
        self.attn_norm = rms_norm(c, "embed")
        self.attn = MLA(c)
        self.ffn_norm = rms_norm(c, "embed")
        self.ffn = MoE(c) if self.moe else MLP(c, c.inter_dim)

    def _ffn(self, x, valid):
        if self.moe:
            return self.ffn(x, valid)
        return self.ffn(x), None

    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, Routing | None]:
        """Training / prefill. x [B, T, D] -> (x [B, T, D], Routing for MoE blocks else None)."""
        with jax.named_scope("mla"):
            x = x + self.attn(self.attn_norm(x), positions, segment_ids)
        # valid [B, T]: True for real tokens. Segment id 0 marks padding; no segment ids: all real.
        valid = jnp.ones(x.shape[:2], bool) if segment_ids is None else segment_ids != 0
        with jax.named_scope("moe" if self.moe else "mlp"):
            y, routing = self._ffn(self.ffn_norm(x), valid)
        return constrain_activation(x + y), routing

    def decode(self, x: jax.Array, positions: jax.Array,
               cache: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Latent-cache path. x [B, T, D], positions [B, T], cache [B, S, C + R] -> (x, cache)."""
        with jax.named_scope("mla_decode"):
            a, cache = self.attn.decode(self.attn_norm(x), positions, cache)
            x = x + a
        with jax.named_scope("moe" if self.moe else "mlp"):
            y, _ = self._ffn(self.ffn_norm(x), jnp.ones(x.shape[:2], bool))
        return constrain_activation(x + y), cache


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat(target, cfg: ModelConfig, **kwargs):
    """`nn.remat(target)` per `cfg.remat_policy` ("none": target itself). The stacks wrap their
    blocks' training forward; the MTP modules wrap their Block class."""
    if cfg.remat_policy == "none":
        return target
    return nn.remat(target, policy=_REMAT_POLICIES[cfg.remat_policy], **kwargs)


def _scan(body, length: int, in_axes):
    return nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True},
                   in_axes=in_axes, length=length, metadata_params={nn.PARTITION_NAME: "layers"})


class Stack(nn.Module):
    """`n` blocks of one kind (dense or MoE)."""

    cfg: ModelConfig
    n: int
    moe: bool

    def setup(self):
        if self.cfg.scan_layers:
            self.layers = Block(self.cfg, self.moe)
        else:
            self.layers = [Block(self.cfg, self.moe) for _ in range(self.n)]

    def __call__(self, x: jax.Array, positions: jax.Array,
                 segment_ids: jax.Array | None = None) -> tuple[jax.Array, Routing | None]:
        """x [B, T, D] -> (x [B, T, D], Routing with a leading [L] axis, or None for dense)."""
        body = remat(lambda block, x, positions, segment_ids: block(x, positions, segment_ids),
                     self.cfg, prevent_cse=not self.cfg.scan_layers)
        if self.cfg.scan_layers:
            scanned = _scan(body, self.n, in_axes=(nn.broadcast, nn.broadcast))
            return scanned(self.layers, x, positions, segment_ids)
        routings = []
        for block in self.layers:
            x, routing = body(block, x, positions, segment_ids)
            routings.append(routing)
        return x, jax.tree.map(lambda *xs: jnp.stack(xs), *routings)  # dense: all None, None

    def decode(self, x: jax.Array, positions: jax.Array,
               cache: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x [B, T, D], positions [B, T], cache [L, B, S, C + R] -> (x, cache)."""
        if self.cfg.scan_layers:
            body = lambda block, x, positions, layer_cache: block.decode(x, positions, layer_cache)
            return _scan(body, self.n, in_axes=(nn.broadcast, 0))(self.layers, x, positions, cache)
        new_cache = []
        for i, block in enumerate(self.layers):
            x, layer_cache = block.decode(x, positions, cache[i])
            new_cache.append(layer_cache)
        return x, jnp.stack(new_cache)
