"""DeepSeek-V3: embedding, n_dense_layers dense blocks, MoE blocks, final norm, output head, and
mtp_depth multi-token-prediction modules sharing the embedding and the head.

Letters (`dsv3_jax/NOTATION.md`): B, T, S cache slots, D, V, L layers, E routed
experts, X MTP depth, C + R one latent-cache row (kv_lora_rank + qk_rope_head_dim).

  logits = model.apply({"params": params}, tokens)                      # [B, T, V] float32
  logits, mtp_logits = model.apply(..., tokens, return_mtp=True)        # mtp_logits [X, B, T, V]
  out = model.apply(..., tokens, method=DeepSeekV3.forward)             # ModelOutput, for training
  out = model.apply(..., tokens, with_logits=False, method=DeepSeekV3.forward)
      # no logits: out.head_input [B, T, D], out.mtp_head_input [X, B, T, D] and out.head_kernel
      # [D, V] are what the head would take (train/losses.py's chunked cross-entropy uses them)
  logits, hidden, cache = model.apply(..., tokens, positions, cache, method=DeepSeekV3.decode)

`mtp_logits[k-1][:, i]` predicts token t_{i+k+1}; positions i >= T - k have no input token t_{i+k}
(it lies past the sequence) and their outputs must be ignored by the loss.
"""

from __future__ import annotations

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig
from dsv3_jax.model.block import Stack
from dsv3_jax.model.layers import Embed, Linear, constrain_activation, rms_norm
from dsv3_jax.model.mtp import MTPModule


@flax.struct.dataclass
class ModelOutput:
    """Everything one training forward pass produces."""

    logits: jax.Array | None  # [B, T, V] float32, main head; None with with_logits=False
    hidden: jax.Array  # [B, T, D] last hidden state before the final norm
    mtp_logits: jax.Array | None = None  # [X, B, T, V] float32, None when not computed
    # What the shared head takes: logits = head_input @ head_kernel in the compute dtype with
    # float32 accumulation (Linear with fp8=False), and likewise for each MTP depth.
    head_input: jax.Array | None = None  # [B, T, D] compute dtype, the final-normed hidden state
    mtp_head_input: jax.Array | None = None  # [X, B, T, D] each MTP module's normed output
    head_kernel: jax.Array | None = None  # [D, V] the head's (float32 master) kernel
    expert_load: jax.Array | None = None  # [n_moe_layers, E] int32 valid tokens per expert
    balance_loss: jax.Array | None = None  # [n_moe_layers] sequence-wise balance loss (no alpha)
    mtp_expert_load: jax.Array | None = None  # [X, E]
    mtp_balance_loss: jax.Array | None = None  # [X]
    # Share of each MoE layer's token-expert pairs the expert-parallel exchange dropped for
    # capacity (ModelConfig.moe_capacity_factor), float32; 0 when dropless.
    dropped_fraction: jax.Array | None = None  # [n_moe_layers]
    mtp_dropped_fraction: jax.Array | None = None  # [X]


def init_latent_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> jax.Array:
    """An empty latent cache [n_layers, batch, max_len, kv_lora_rank + qk_rope_head_dim]."""
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return jnp.zeros((cfg.n_layers, batch, max_len, width), dtype or jnp.dtype(cfg.dtype))


def init_mtp_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> jax.Array:
    """An empty latent cache for the first MTP module's block [batch, max_len, C + R]."""
    width = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    return jnp.zeros((batch, max_len, width), dtype or jnp.dtype(cfg.dtype))


def _check_tokens(cfg: ModelConfig, tokens: jax.Array) -> None:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(f"tokens must be an integer array [batch, seq_len]; got shape "
                         f"{tuple(tokens.shape)} and dtype {tokens.dtype}.")
    if tokens.shape[1] > cfg.max_seq_len:
        raise ValueError(f"tokens hold {tokens.shape[1]} positions but ModelConfig.max_seq_len="
                         f"{cfg.max_seq_len}; shorten the sequence or raise max_seq_len.")


def _shift_left(tokens: jax.Array, k: int) -> jax.Array:
    """t_{i+k} at position i; the last k positions get token 0 (their outputs are ignored)."""
    return jnp.pad(tokens, ((0, 0), (0, k)))[:, k:]


class DeepSeekV3(nn.Module):
    cfg: ModelConfig

    def setup(self):
        c = self.cfg
        self.embed = Embed(c)
        if c.n_dense_layers:
            self.dense_layers = Stack(c, c.n_dense_layers, moe=False)
        if c.n_moe_layers:
            self.moe_layers = Stack(c, c.n_moe_layers, moe=True)
        self.norm = rms_norm(c, "embed")
        self.head = Linear(c.dim, c.vocab_size, ("embed", "vocab"), c, out_dtype="float32",
                           fp8=False)
        self.mtp = [MTPModule(c) for _ in range(c.mtp_depth)]

    def __call__(self, tokens: jax.Array, positions: jax.Array | None = None,
                 segment_ids: jax.Array | None = None, return_mtp: bool = False):
        """tokens int [B, T] -> logits [B, T, V], or (logits, mtp_logits [X, B, T, V])."""
        if return_mtp and not self.cfg.mtp_depth:
            raise ValueError("return_mtp=True but ModelConfig.mtp_depth=0: this model has no MTP "
                             "module; use a config with mtp_depth >= 1.")
        out = self.forward(tokens, positions, segment_ids,
                           with_mtp=return_mtp or self.is_initializing())
        return (out.logits, out.mtp_logits) if return_mtp else out.logits

    def forward(self, tokens: jax.Array, positions: jax.Array | None = None,
                segment_ids: jax.Array | None = None, with_mtp: bool = True,
                with_logits: bool = True) -> ModelOutput:
        """The training forward pass.

        Args:
          tokens: int [B, T].
          positions: int [B, T] rope positions; default 0..T-1 in every row. With packed documents,
            pass each token's position within its document.
          segment_ids: int [B, T] document ids for packing; attention stays within a segment and
            segment 0 marks padding (left out of the expert load and the balance loss).
          with_mtp: also run the MTP modules (when the config has them).
          with_logits: apply the head. False leaves `logits` and `mtp_logits` None (no [B, T, V]
            array is made); `head_input`, `mtp_head_input` and `head_kernel` are given either way,
            for a loss that applies the head itself chunk by chunk.
        """
        c = self.cfg
        _check_tokens(c, tokens)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        h = constrain_activation(self.embed(tokens))
        loads = losses = dropped = None
        if c.n_dense_layers:
            h, _ = self.dense_layers(h, positions, segment_ids)
        if c.n_moe_layers:
            h, routing = self.moe_layers(h, positions, segment_ids)
            loads, losses = routing.expert_load, routing.balance_loss
            dropped = routing.dropped_fraction
        normed = self.norm(h)
        out = ModelOutput(logits=self.head(normed) if with_logits else None, hidden=h,
                          head_input=normed, head_kernel=self.head.kernel, expert_load=loads,
                          balance_loss=losses, dropped_fraction=dropped)
        if with_mtp and c.mtp_depth:
            h_prev, mtp_normed, mtp_logits, mtp_loads, mtp_losses, mtp_dropped = (
                h, [], [], [], [], [])
            for k, module in enumerate(self.mtp, start=1):
                with jax.named_scope(f"mtp_{k}"):
                    next_emb = self.embed(_shift_left(tokens, k))
                    h_prev, normed, routing = module(h_prev, next_emb, positions, segment_ids)
                    mtp_normed.append(normed)
                    if with_logits:
                        mtp_logits.append(self.head(normed))
                    mtp_loads.append(routing.expert_load)
                    mtp_losses.append(routing.balance_loss)
                    mtp_dropped.append(routing.dropped_fraction)
            return out.replace(
                mtp_logits=jnp.stack(mtp_logits) if with_logits else None,
                mtp_head_input=jnp.stack(mtp_normed), mtp_expert_load=jnp.stack(mtp_loads),
                mtp_balance_loss=jnp.stack(mtp_losses),
                mtp_dropped_fraction=jnp.stack(mtp_dropped))
        return out

    def decode(self, tokens: jax.Array, positions: jax.Array,
               cache: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Main model over the latent cache (absorbed MLA), for prefill chunks and decoding.

        Args:
          tokens: int [B, T] new tokens; positions: int [B, T] their absolute positions (< S).
          cache: [n_layers, B, S, C + R] from `init_latent_cache` or a previous call.
        Returns:
          (logits [B, T, V] float32, hidden [B, T, D] before the final norm, updated cache).
        """
        c = self.cfg
        _check_tokens(c, tokens)
        h = constrain_activation(self.embed(tokens))
        caches = []
        if c.n_dense_layers:
            h, dense_cache = self.dense_layers.decode(h, positions, cache[:c.n_dense_layers])
            caches.append(dense_cache)
        if c.n_moe_layers:
            h, moe_cache = self.moe_layers.decode(h, positions, cache[c.n_dense_layers:])
            caches.append(moe_cache)
        return self.head(self.norm(h)), h, jnp.concatenate(caches, axis=0)

    def mtp_decode(self, hidden: jax.Array, next_tokens: jax.Array, positions: jax.Array,
                   cache: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The first MTP module over its latent cache, for drafting tokens.

        Args:
          hidden: [B, T, D] main-model hidden states (before the final norm) at `positions`.
          next_tokens: int [B, T], the token after each position (t_{i+1}).
          positions: int [B, T]; cache: [B, S, C + R] from `init_mtp_cache`.
        Returns:
          (logits [B, T, V] float32 predicting t_{i+2}, updated cache).
        """
        if not self.cfg.mtp_depth:
            raise ValueError("mtp_decode needs an MTP module, but ModelConfig.mtp_depth=0.")
        _, normed, cache = self.mtp[0].decode(hidden, self.embed(next_tokens), positions, cache)
        return self.head(normed), cache
