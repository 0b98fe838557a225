"""The parameter tree's layout: the one owner of where each block of DeepSeekV3 lives in `params`.

  embed/embedding, norm/weight, head/kernel
  dense_layers/layers/<block>       the first n_dense_layers blocks, scanned: leaves [L, ...]
  dense_layers/layers_{j}/<block>   the same, unrolled (scan_layers=False): block j, no [L] axis
  moe_layers/layers/<block>         the MoE blocks (HF layers n_dense_layers..n_layers-1), scanned
  moe_layers/layers_{j}/<block>     unrolled: block j is HF layer n_dense_layers + j
  mtp_{k}/block/<block>             MTP module k (HF layer n_layers + k), with mtp_{k}/enorm,
                                    hnorm, eh_proj, norm beside its block
  <block>/ffn/gate/e_score_correction_bias   a MoE block's router bias [E] (or [L, E] scanned)
  <block>/ffn/w1, w2, w3                     a MoE block's routed experts [E, ...]

Everything that walks blocks asks this module: the HF mapping `blocks(cfg)` (the layout a config
builds), the router-bias rule and the logged router biases `router_bias_paths(params)` (the routers
a tree holds, in layer order), the parameter counts `is_routed_expert` and `is_mtp`.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dsv3_jax.config import ModelConfig

STACKS = ("dense_layers", "moe_layers")
SCANNED = "layers"
ROUTER_BIAS = "e_score_correction_bias"
ROUTER_BIAS_PATH = ("ffn", "gate", ROUTER_BIAS)  # under a MoE block
ROUTED_EXPERT_WEIGHTS = ("w1", "w2", "w3")  # stacked [E, ...] arrays directly under a MoE `ffn`
MTP_PREFIX = "mtp_"


class BlockPath(NamedTuple):
    """A block, or a scanned stack of blocks (leaves [L, ...]), and the HF layers it holds."""

    path: tuple[str, ...]  # keys from the root of `params` to the block's tree
    layers: tuple[int, ...]  # HF layer indices, in order
    moe: bool  # its ffn is DeepSeekMoE (else a dense MLP)

    @property
    def scanned(self) -> bool:
        return self.path[-1] == SCANNED


def mtp_path(k: int) -> tuple[str, ...]:
    """MTP module k's tree (its block, enorm, hnorm, eh_proj, norm)."""
    return (f"{MTP_PREFIX}{k}",)


def blocks(cfg: ModelConfig) -> list[BlockPath]:
    """Every block of DeepSeekV3(cfg) in HF layer order: dense, MoE, then the MTP modules."""
    out = []
    layers = (range(cfg.n_dense_layers), range(cfg.n_dense_layers, cfg.n_layers))
    for stack, layers, moe in zip(STACKS, layers, (False, True)):
        if cfg.scan_layers and layers:
            out.append(BlockPath((stack, SCANNED), tuple(layers), moe))
        elif not cfg.scan_layers:
            out += [BlockPath((stack, f"layers_{j}"), (i,), moe) for j, i in enumerate(layers)]
    return out + [BlockPath(mtp_path(k) + ("block",), (cfg.n_layers + k,), True)
                  for k in range(cfg.mtp_depth)]


def _index(key: str) -> int:
    return int(key.rsplit("_", 1)[1])


def block_paths(params) -> list[tuple[str, ...]]:
    """The block trees present in `params`, in layer order (a scanned stack is one entry): dense
    blocks, MoE blocks, then MTP modules; unrolled blocks are ordered by their number."""
    out = []
    for stack in STACKS:
        if stack in params:
            keys = params[stack]
            out += ([(stack, SCANNED)] if SCANNED in keys else
                    [(stack, k) for k in sorted(keys, key=_index)])
    return out + [(k, "block") for k in sorted(filter(is_mtp, params), key=_index)]


def router_bias_paths(params) -> list[tuple[str, ...]]:
    """Every router bias in `params`, in the routers' order: ModelOutput's `expert_load` rows
    (the main model's MoE layers; a scanned bias [L, E] holds L rows), then `mtp_expert_load`'s."""
    return [p + ROUTER_BIAS_PATH for p in block_paths(params)
            if ROUTER_BIAS in get(params, p).get("ffn", {}).get("gate", {})]


def get(tree, path: tuple[str, ...]):
    for key in path:
        tree = tree[key]
    return tree


def replace(tree, path: tuple[str, ...], value):
    """A copy of the nested dict `tree` with `path` set to `value` (the rest shared, not copied)."""
    return {**tree, path[0]: replace(tree[path[0]], path[1:], value)} if path else value


def is_routed_expert(path) -> bool:
    """True for a MoE block's stacked expert weights (`.../ffn/w1`, w2, w3), a tree_util path."""
    names = [getattr(k, "key", str(k)) for k in path]
    return len(names) >= 2 and names[-1] in ROUTED_EXPERT_WEIGHTS and names[-2] == "ffn"


def is_mtp(name: str) -> bool:
    """True for a top-level key of an MTP module's tree."""
    return name.startswith(MTP_PREFIX)


def boxed_init(cfg: ModelConfig, seed: int = 0):
    """A function building DeepSeekV3(cfg)'s params with their logical axes (boxed leaves); pass it
    to `jax.eval_shape` for shapes without allocating."""
    from dsv3_jax.model.transformer import DeepSeekV3  # local: the model imports nothing from here

    return lambda: DeepSeekV3(cfg).init(jax.random.key(seed),
                                        jnp.zeros((1, 1), jnp.int32))["params"]


def abstract_params(cfg: ModelConfig):
    """Parameter shapes (ShapeDtypeStruct, unboxed) of `DeepSeekV3(cfg)`, without allocating."""
    return nn.unbox(jax.eval_shape(boxed_init(cfg)))
