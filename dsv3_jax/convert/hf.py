"""Hugging Face DeepSeek-V3 checkpoints <-> dsv3_jax parameters (SPEC.md sections 1-3 and 5).

    cfg, params = load_hf_checkpoint("DeepSeek-V3/", jnp.bfloat16, mesh=mesh)
    save_hf_checkpoint("out/", cfg, params, fp8=True)

A Hugging Face checkpoint is a folder with `config.json` and either `model.safetensors` or shards
named by `model.safetensors.index.json`. Pickle checkpoints (`pytorch_model.bin`) are refused.

Tensor mapping (HF name -> our parameter path; `i` an HF layer, `e` an expert). HF linear weights are
[out, in] and our kernels [in, out], so every `.weight` of a linear layer is transposed; norm scales,
the embedding [V, D] and the router bias are copied as they are.

  model.embed_tokens.weight                          embed/embedding
  model.norm.weight                                  norm/weight
  lm_head.weight                                     head/kernel
  model.layers.{i}.input_layernorm.weight            <block>/attn_norm/weight
  model.layers.{i}.post_attention_layernorm.weight   <block>/ffn_norm/weight
    .self_attn.q_a_proj / q_a_layernorm / q_b_proj   <block>/attn/wq_a, q_norm, wq_b
    .self_attn.q_proj        (q_lora_rank null)      <block>/attn/wq
    .self_attn.kv_a_proj_with_mqa / kv_a_layernorm   <block>/attn/wkv_a, kv_norm
    .self_attn.kv_b_proj / o_proj                    <block>/attn/wkv_b, wo
    .mlp.gate_proj / down_proj / up_proj   (dense)   <block>/ffn/w1, w2, w3 /kernel
    .mlp.gate.weight, .mlp.gate.e_score_correction_bias  <block>/ffn/gate/kernel, e_score_correction_bias
    .mlp.experts.{e}.gate_proj / down_proj / up_proj <block>/ffn/w1[e], w2[e], w3[e]  ([E, D, F], [E, F, D])
    .mlp.shared_experts.gate_proj / down_proj / up_proj  <block>/ffn/shared_experts/w1, w2, w3 /kernel

`<block>` for HF layer i < n_dense_layers is `dense_layers/layers` at index i of the leading (scanned)
axis, and `moe_layers/layers` at index i - n_dense_layers after that; with `scan_layers=False` it is
`dense_layers/layers_{i}` (resp. `moe_layers/layers_{i - n_dense_layers}`) without a leading axis.
MTP module k is HF layer n_layers + k: its block tensors map to `mtp_{k}/block/...` as above, and

  model.layers.{n_layers+k}.enorm / hnorm / eh_proj  mtp_{k}/enorm, hnorm, eh_proj  ([2D, D]: input
                                                     concat[enorm(embedding), hnorm(hidden)])
  model.layers.{n_layers+k}.shared_head.norm.weight  mtp_{k}/norm/weight
  model.layers.{n_layers+k}.embed_tokens.weight, .shared_head.head.weight: copies of the shared
    embedding and head; on load they must equal them and are dropped, on save they are written back.

RoPE needs no permutation: the checkpoints hold DeepSeek's interleaved layout, which both our model
and transformers (`rope_interleave`) rotate as pairs (2i, 2i+1).

FP8 checkpoints (`quantization_config.quant_method == "fp8"`, e4m3) store a linear weight as
F8_E4M3 `q` [out, in] beside F32 `<name>_scale_inv` [ceil(out/128), ceil(in/128)], and
W[i, j] = q[i, j] * scale_inv[i // 128, j // 128] (edge blocks are partial). They are dequantized in
float32 and then cast to the requested dtype, unless `keep_fp8=True`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
from typing import Any, Mapping

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from tqdm.auto import tqdm

from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.convert import safetensors as st
from dsv3_jax.model import tree

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_FP8_BLOCK = (128, 128)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
_PARAM_DTYPES = ("float32", "bfloat16", "float16")
_FLOAT_CODES = ("F32", "BF16", "F16", "F64")
_PICKLE_PATTERNS = (r"pytorch_model.*\.bin", r".*\.pt", r".*\.pth", r".*\.ckpt", r".*\.pkl")


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint (its config.json or its tensors) cannot be loaded or written."""


# ================================================================================================
# config.json <-> ModelConfig
# ================================================================================================

# Keys that must be present: they fix the parameter shapes or the math, and transformers' defaults
# for them are the 671B model's, which a file that omits them almost certainly is not.
_REQUIRED_KEYS = (
    "model_type", "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
    "num_hidden_layers", "first_k_dense_replace", "num_attention_heads", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "routed_scaling_factor",
    "norm_topk_prob", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "max_position_embeddings", "rms_norm_eps")
# Keys that are read (and checked) when present.
_OPTIONAL_KEYS = (
    "scoring_func", "topk_method", "rope_theta", "rope_scaling", "rope_parameters",
    "num_nextn_predict_layers", "num_mtp_layers", "quantization_config", "num_key_value_heads",
    "head_dim", "qk_head_dim", "rope_interleave", "hidden_act", "attention_bias",
    "tie_word_embeddings", "moe_layer_freq")
# DeepSeek keys that do not change the forward pass (training-only settings, bookkeeping).
_IGNORED_KEYS = (
    "auto_map", "use_cache", "initializer_range", "attention_dropout", "pretraining_tp", "ep_size",
    "aux_loss_alpha", "seq_aux", "output_router_logits", "router_aux_loss_coef")
# The generic attributes every transformers config carries (`PretrainedConfig`, written by its
# `to_dict()` / `save_pretrained`, across 4.x and 5.x): output switches, task heads, token ids,
# encoder-decoder plumbing, bookkeeping and the legacy generation settings. None of them changes a
# decoder-only model's logits, so they are ignored without a word. (tie_word_embeddings, also
# generic, does change the model and is checked with the optional keys.)
_GENERIC_KEYS = (
    # bookkeeping
    "_name_or_path", "name_or_path", "transformers_version", "architectures",
    "_commit_hash", "_attn_implementation", "_attn_implementation_autoset",
    "_attn_implementation_internal", "attn_implementation", "_experts_implementation",
    "torch_dtype", "dtype", "use_bfloat16", "torchscript", "tf_legacy_loss",
    # what forward returns, not what it computes
    "output_attentions", "output_hidden_states", "return_dict", "output_scores",
    "return_dict_in_generate", "use_return_dict", "chunk_size_feed_forward", "pruned_heads",
    # encoder-decoder and task-head plumbing, unused by a causal LM
    "is_encoder_decoder", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "tie_encoder_decoder", "id2label", "label2id", "num_labels", "problem_type",
    "finetuning_task", "task_specific_params", "tokenizer_class", "prefix",
    # token ids
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    "forced_bos_token_id", "forced_eos_token_id",
    # generation settings (generation_config.json's, older files keep them here)
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups",
    "diversity_penalty", "temperature", "top_k", "top_p", "typical_p", "epsilon_cutoff",
    "eta_cutoff", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens",
    "begin_suppress_tokens", "max_new_tokens", "min_new_tokens", "guidance_scale")
_ROPE_KEYS = ("rope_type", "type", "rope_theta", "factor", "beta_fast", "beta_slow", "mscale",
              "mscale_all_dim", "original_max_position_embeddings", "attention_factor", "truncate",
              "partial_rotary_factor")
_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")


def _yarn_mscale(factor: float, mscale: float | None = 1.0) -> float:
    """transformers' / DeepSeek's `yarn_get_mscale`: 0.1 * mscale * ln(factor) + 1 (1 when factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * (mscale or 0.0) * math.log(factor) + 1.0


class _Keys:
    """Typed access to config.json values; every refusal names the file, the key and the value."""

    def __init__(self, hf: Mapping[str, Any], source: str):
        self.hf, self.source = hf, source

    def refuse(self, key: str, why: str, fix: str, value: Any = None):
        value = self.hf.get(key, "<absent>") if value is None else value
        raise HFCheckpointError(f"{self.source}: {key}={value!r} {why}; {fix}.")

    def int(self, key: str, *, none_as: int | None = None, minimum: int = 0) -> int:
        value = self.hf.get(key)
        if value is None and none_as is not None:
            return none_as
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            self.refuse(key, f"must be an integer >= {minimum}", "fix config.json")
        return value

    def float(self, key: str, value=None) -> float:
        value = self.hf.get(key) if value is None else value
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            self.refuse(key, "must be a finite number", "fix config.json", value)
        return float(value)

    def bool(self, key: str) -> bool:
        value = self.hf.get(key)
        if not isinstance(value, bool):
            self.refuse(key, "must be true or false", "fix config.json")
        return value


def _rope_fields(keys: _Keys) -> dict[str, Any]:
    """max_seq_len, original_seq_len, rope_theta and the YaRN fields from config.json.

    transformers applies YaRN whenever `rope_type == "yarn"`; dsv3_jax (as DeepSeek's reference code)
    applies it when max_seq_len > original_seq_len. A YaRN config maps exactly when
    max_position_embeddings > original_max_position_embeddings (or factor == 1, a no-op), and when
    transformers' cos/sin factor `attention_factor` is 1, i.e. mscale == mscale_all_dim: the softmax
    scale is then qk_head_dim^-0.5 * yarn_mscale(factor, mscale_all_dim)^2 in both.
    """
    hf, source = keys.hf, keys.source
    scaling, params = hf.get("rope_scaling"), hf.get("rope_parameters")
    if scaling is not None and params is not None and scaling != params:
        raise HFCheckpointError(f"{source}: rope_scaling={scaling!r} and rope_parameters={params!r} "
                                "disagree; keep one of them.")
    rope = params if params is not None else scaling
    name = "rope_parameters" if params is not None else "rope_scaling"
    if rope is None:
        rope = {}
    if not isinstance(rope, dict):
        keys.refuse(name, "must be an object", "write a JSON object or null")
    unknown = sorted(set(rope) - set(_ROPE_KEYS))
    if unknown:
        raise HFCheckpointError(f"{source}: {name} has unknown key(s) {unknown}; known: "
                                f"{list(_ROPE_KEYS)}. Remove them or check the checkpoint's model.")
    theta = rope.get("rope_theta", hf.get("rope_theta"))
    if theta is None:
        raise HFCheckpointError(f"{source}: rope_theta is missing (neither a top-level key nor in "
                                f"{name}); DeepSeek-V3 uses 10000.")
    if "rope_theta" in rope and "rope_theta" in hf and rope["rope_theta"] != hf["rope_theta"]:
        raise HFCheckpointError(f"{source}: rope_theta={hf['rope_theta']!r} but {name}.rope_theta="
                                f"{rope['rope_theta']!r}; keep one.")
    theta = keys.float("rope_theta", theta)
    if rope.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFCheckpointError(f"{source}: {name}.partial_rotary_factor="
                                f"{rope['partial_rotary_factor']!r}; MLA rotates all "
                                "qk_rope_head_dim dims, use 1.0.")
    max_pos = keys.int("max_position_embeddings", minimum=1)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    default = dict(max_seq_len=max_pos, original_seq_len=max(ModelConfig.original_seq_len, max_pos),
                   rope_theta=theta)
    if rope_type == "default":
        return default
    if rope_type != "yarn":
        raise HFCheckpointError(f"{source}: {name}.rope_type={rope_type!r} is not supported; "
                                "dsv3_jax implements plain RoPE (\"default\") and \"yarn\".")
    where = f"{source}: {name}"
    original = rope.get("original_max_position_embeddings")
    if not isinstance(original, int) or isinstance(original, bool) or original < 1:
        raise HFCheckpointError(f"{where}.original_max_position_embeddings={original!r}: YaRN needs "
                                "the pre-training context length (DeepSeek-V3: 4096).")
    factor = rope.get("factor")
    factor = max_pos / original if factor is None else keys.float("factor", factor)
    if factor < 1:
        raise HFCheckpointError(f"{where}.factor={factor!r}: YaRN stretches wavelengths by a factor "
                                ">= 1; use 40 (DeepSeek-V3) or drop rope scaling.")
    if not rope.get("truncate", True):
        raise HFCheckpointError(f"{where}.truncate=false is not supported: the reference code rounds "
                                "the YaRN correction range (floor/ceil); remove the key.")
    mscale, mscale_all_dim = rope.get("mscale"), rope.get("mscale_all_dim")
    attention_factor = rope.get("attention_factor")
    if factor == 1:  # every YaRN term is the identity at factor 1
        if attention_factor not in (None, 1, 1.0):
            raise HFCheckpointError(f"{where}.attention_factor={attention_factor!r} scales cos/sin, "
                                    "which dsv3_jax does not; remove it.")
        return default
    if attention_factor is None:
        attention_factor = (_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else _yarn_mscale(factor))
    if abs(attention_factor - 1.0) > 1e-12 or not mscale_all_dim:
        raise HFCheckpointError(
            f"{where} gives mscale={mscale!r}, mscale_all_dim={mscale_all_dim!r}, "
            f"attention_factor={rope.get('attention_factor')!r}: transformers would scale cos/sin by "
            f"{attention_factor:.6g}, which dsv3_jax (like DeepSeek's reference code) does not "
            "represent; it applies one mscale, to the softmax scale only. Set mscale and "
            "mscale_all_dim to the same value (DeepSeek-V3: 1.0, V2-Lite: 0.707).")
    if max_pos <= original:
        raise HFCheckpointError(
            f"{source}: {name}.rope_type='yarn' (factor {factor:g}) with max_position_embeddings="
            f"{max_pos} <= original_max_position_embeddings={original}: transformers applies YaRN "
            "at every length, dsv3_jax only when max_seq_len > original_seq_len (as DeepSeek's "
            f"reference code). Set max_position_embeddings to the extended length, e.g. "
            f"{int(original * factor)}.")
    return dict(max_seq_len=max_pos, original_seq_len=original, rope_theta=theta,
                rope_factor=factor, beta_fast=float(rope.get("beta_fast") or 32),
                beta_slow=float(rope.get("beta_slow") or 1), mscale=float(mscale_all_dim))


def _routing_fields(keys: _Keys) -> dict[str, Any]:
    """score_func, norm_topk_prob, groups and route_scale; refuses routers that ModelConfig cannot
    express.

    dsv3_jax's sigmoid router always selects with `e_score_correction_bias`, scores groups by their
    top-2 biased scores, and renormalises the chosen weights when norm_topk_prob (transformers'
    DeepseekV3, topk_method "noaux_tc"; both values of norm_topk_prob); its softmax router has no
    bias, scores groups by their max and does not renormalise (DeepSeek-V2's "greedy" /
    "group_limited_greedy", norm_topk_prob false; ModelConfig.norm_topk_prob is left at its
    default, which softmax routers ignore).
    """
    hf = keys.hf
    score_func = hf.get("scoring_func", "sigmoid")
    method = hf.get("topk_method", "noaux_tc")
    norm = keys.bool("norm_topk_prob")
    n_group, topk_group = keys.int("n_group", none_as=1, minimum=1), keys.int("topk_group", none_as=1, minimum=1)
    if score_func == "sigmoid":
        if method != "noaux_tc":
            keys.refuse("topk_method", "is not supported with scoring_func='sigmoid': dsv3_jax's "
                        "sigmoid router always selects with e_score_correction_bias",
                        "use topk_method 'noaux_tc' (DeepSeek-V3)")
    elif score_func == "softmax":
        if norm:
            keys.refuse("norm_topk_prob", "is not supported with scoring_func='softmax': dsv3_jax's "
                        "softmax router does not renormalise the chosen weights (SPEC.md 'Gate')",
                        "use false (DeepSeek-V2 / the 16B preset)")
        if method == "greedy":
            n_group = topk_group = 1  # greedy ignores groups
        elif method != "group_limited_greedy":
            keys.refuse("topk_method", "is not supported with scoring_func='softmax'",
                        "use 'greedy' or 'group_limited_greedy'")
    else:
        keys.refuse("scoring_func", "is not supported", "use 'sigmoid' (V3) or 'softmax' (V2)")
    fields = dict(score_func=score_func, n_expert_groups=n_group, n_limited_groups=topk_group,
                  route_scale=keys.float("routed_scaling_factor"))
    if score_func == "sigmoid":
        fields["norm_topk_prob"] = norm
    return fields


def config_from_hf(hf: Mapping[str, Any], *, source: str = CONFIG_FILE) -> ModelConfig:
    """The ModelConfig of a Hugging Face DeepSeek-V3 config.json (release or current transformers style).

    Key mapping: vocab_size, hidden_size -> dim, intermediate_size -> inter_dim,
    moe_intermediate_size -> moe_inter_dim, num_hidden_layers -> n_layers, first_k_dense_replace ->
    n_dense_layers, num_attention_heads -> n_heads, n_routed_experts, n_shared_experts (null: 0),
    num_experts_per_tok -> n_activated_experts, n_group / topk_group -> n_expert_groups /
    n_limited_groups, scoring_func -> score_func, routed_scaling_factor -> route_scale,
    q_lora_rank (null: 0), kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim, v_head_dim,
    max_position_embeddings -> max_seq_len, rope_theta and rope_scaling / rope_parameters -> the
    RoPE/YaRN fields, num_nextn_predict_layers -> mtp_depth, rms_norm_eps -> norm_eps,
    norm_topk_prob (sigmoid routers).

    Missing required keys and values the model cannot represent are refused by name. The generic
    keys every transformers config carries (`PretrainedConfig`'s: id2label, return_dict, token ids,
    generation settings, ...) are ignored silently; any other key dsv3_jax does not know is
    reported in one warning (it is ignored, so check that it does not change the model).
    """
    if not isinstance(hf, Mapping):
        raise HFCheckpointError(f"{source} holds a JSON {type(hf).__name__}; expected an object.")
    missing = [k for k in _REQUIRED_KEYS if k not in hf]
    if missing:
        raise HFCheckpointError(f"{source} lacks required key(s) {missing}; a DeepSeek-V3 "
                                "config.json sets them (see the model's release).")
    unknown = sorted(set(hf) - set(_REQUIRED_KEYS) - set(_OPTIONAL_KEYS) - set(_IGNORED_KEYS)
                     - set(_GENERIC_KEYS))
    if unknown:
        logging.warning("%s has key(s) dsv3_jax does not know, ignored: %s. If one of them changes "
                        "the model's math, the loaded model will not reproduce the checkpoint's "
                        "outputs.", source, unknown)
    keys = _Keys(hf, source)
    if hf["model_type"] not in _MODEL_TYPES:
        keys.refuse("model_type", "is not a DeepSeek-V3-family model", f"use one of {_MODEL_TYPES}")
    checks = (("hidden_act", "silu"), ("attention_bias", False), ("tie_word_embeddings", False),
              ("rope_interleave", True), ("moe_layer_freq", 1))
    for key, wanted in checks:
        if key in hf and hf[key] != wanted:
            keys.refuse(key, f"is not supported (dsv3_jax implements {key}={wanted!r} only)",
                        f"use {json.dumps(wanted)}")
    n_heads, rope_dim = keys.int("num_attention_heads", minimum=1), keys.int("qk_rope_head_dim", minimum=1)
    nope = keys.int("qk_nope_head_dim", minimum=1)
    for key, wanted in (("num_key_value_heads", n_heads), ("head_dim", rope_dim),
                        ("qk_head_dim", nope + rope_dim)):
        if hf.get(key) is not None and hf[key] != wanted:
            keys.refuse(key, f"disagrees with the MLA shapes (expected {wanted})", "fix config.json")
    n_layers = keys.int("num_hidden_layers", minimum=1)
    mtp_key = "num_nextn_predict_layers" if "num_nextn_predict_layers" in hf else "num_mtp_layers"
    fields = dict(
        vocab_size=keys.int("vocab_size", minimum=1), dim=keys.int("hidden_size", minimum=1),
        inter_dim=keys.int("intermediate_size", minimum=1),
        moe_inter_dim=keys.int("moe_intermediate_size", minimum=1), n_layers=n_layers,
        n_dense_layers=min(keys.int("first_k_dense_replace"), n_layers), n_heads=n_heads,
        n_routed_experts=keys.int("n_routed_experts", minimum=1),
        n_shared_experts=keys.int("n_shared_experts", none_as=0),
        n_activated_experts=keys.int("num_experts_per_tok", minimum=1),
        q_lora_rank=keys.int("q_lora_rank", none_as=0), kv_lora_rank=keys.int("kv_lora_rank", minimum=1),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope_dim,
        v_head_dim=keys.int("v_head_dim", minimum=1),
        mtp_depth=keys.int(mtp_key, none_as=0) if mtp_key in hf else 0,
        norm_eps=keys.float("rms_norm_eps"),
        **_routing_fields(keys), **_rope_fields(keys))
    _fp8_block(hf, source)  # validates quantization_config
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise HFCheckpointError(f"{source} maps to a model dsv3_jax cannot build: {e} (mapping: "
                                "see dsv3_jax.convert.hf.config_from_hf).") from e


def config_to_hf(cfg: ModelConfig, *, dtype: str = "float32",
                 quantization_config: dict | None = None) -> dict[str, Any]:
    """config.json in the style current transformers writes (`rope_parameters`), for `cfg`.

    `scoring_func` / `topk_method` are written too (the release's keys); transformers' DeepseekV3
    implements the sigmoid router only.
    """
    if cfg.use_yarn:
        rope = {"rope_type": "yarn", "rope_theta": cfg.rope_theta, "factor": cfg.rope_factor,
                "beta_fast": cfg.beta_fast, "beta_slow": cfg.beta_slow, "mscale": cfg.mscale,
                "mscale_all_dim": cfg.mscale,
                "original_max_position_embeddings": cfg.original_seq_len}
    else:
        rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    sigmoid = cfg.score_func == "sigmoid"
    hf = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.inter_dim,
        "moe_intermediate_size": cfg.moe_inter_dim, "num_hidden_layers": cfg.n_layers,
        "first_k_dense_replace": cfg.n_dense_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_heads, "n_routed_experts": cfg.n_routed_experts,
        "n_shared_experts": cfg.n_shared_experts, "num_experts_per_tok": cfg.n_activated_experts,
        "n_group": cfg.n_expert_groups, "topk_group": cfg.n_limited_groups,
        "scoring_func": cfg.score_func,
        "topk_method": "noaux_tc" if sigmoid else ("group_limited_greedy" if cfg.n_expert_groups > 1 else "greedy"),
        "norm_topk_prob": sigmoid and cfg.norm_topk_prob,  # softmax routers never renormalise
        "routed_scaling_factor": cfg.route_scale,
        "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim, "head_dim": cfg.qk_rope_head_dim,
        "max_position_embeddings": cfg.max_seq_len, "rope_parameters": rope,
        "rope_interleave": True, "rms_norm_eps": cfg.norm_eps,
        "num_nextn_predict_layers": cfg.mtp_depth, "hidden_act": "silu", "attention_bias": False,
        "tie_word_embeddings": False, "initializer_range": cfg.init_std, "dtype": dtype,
        "use_cache": True,
    }
    if quantization_config:
        hf["quantization_config"] = quantization_config
    return hf


def _fp8_block(hf: Mapping[str, Any], source: str) -> tuple[int, int] | None:
    """The (rows, cols) weight block of an FP8 checkpoint, None when not quantized."""
    q = hf.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise HFCheckpointError(f"{source}: quantization_config={q!r} must be an object.")
    method = q.get("quant_method")
    if method != "fp8":
        raise HFCheckpointError(
            f"{source}: quantization_config.quant_method={method!r} is not supported; dsv3_jax "
            "reads unquantized checkpoints and DeepSeek's block-scaled FP8 (quant_method 'fp8', "
            "fmt 'e4m3', weight_block_size [128, 128]). Dequantize the checkpoint first.")
    if q.get("fmt", "e4m3") != "e4m3":
        raise HFCheckpointError(f"{source}: quantization_config.fmt={q['fmt']!r}; only 'e4m3' "
                                "(float8_e4m3fn) weights are supported.")
    block = q.get("weight_block_size", list(DEFAULT_FP8_BLOCK))
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise HFCheckpointError(f"{source}: quantization_config.weight_block_size={block!r}; "
                                "expected two positive integers such as [128, 128].")
    return int(block[0]), int(block[1])


# ================================================================================================
# FP8 block quantization (SPEC.md section 3)
# ================================================================================================

def dequantize_fp8(q: np.ndarray, scale_inv: np.ndarray,
                   block_size: tuple[int, int] = DEFAULT_FP8_BLOCK) -> np.ndarray:
    """W = q * scale_inv[i // bm, j // bn] in float32.

    Args:
      q: [M, N] float8_e4m3fn (HF orientation: [out, in]).
      scale_inv: [ceil(M / bm), ceil(N / bn)]; the last row/column of blocks may be partial.
    Returns:
      float32 [M, N].
    """
    out = np.empty(q.shape, np.float32)
    _dequantize_into(out, q, np.asarray(scale_inv, np.float32), 0, 0, block_size, transpose=False)
    return out


def _dequantize_into(dst: np.ndarray, q_region: np.ndarray, scale_inv: np.ndarray, row0: int,
                     col0: int, block: tuple[int, int], transpose: bool) -> None:
    """Dequantizes q_region = q[row0:, col0:] (a view, any size) into dst (dst = result.T when
    `transpose`), one band of block rows at a time: temporaries hold at most bm x N values."""
    bm, bn = block
    rows, cols = q_region.shape
    col_scales = (np.arange(col0, col0 + cols) // bn)
    r = 0
    while r < rows:
        block_row = (row0 + r) // bm
        end = min(rows, (block_row + 1) * bm - row0)
        band = q_region[r:end].astype(np.float32) * scale_inv[block_row, col_scales][None, :]
        if transpose:
            dst[:, r:end] = band.T
        else:
            dst[r:end] = band
        r = end


def quantize_fp8(w: np.ndarray, block_size: tuple[int, int] = DEFAULT_FP8_BLOCK
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Block-scaled e4m3 quantization: scale_inv[b] = amax(|w| over block b) / 448 (1 for an
    all-zero block), q = e4m3(w / scale_inv) rounded to nearest. w [M, N] (HF orientation) ->
    (q float8_e4m3fn [M, N], scale_inv float32 [ceil(M / bm), ceil(N / bn)])."""
    bm, bn = block_size
    m, n = w.shape
    mb, nb = -(-m // bm), -(-n // bn)
    padded = np.zeros((mb * bm, nb * bn), np.float32)
    padded[:m, :n] = w
    blocks = padded.reshape(mb, bm, nb, bn)
    amax = np.abs(blocks).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / np.float32(FP8_MAX), np.float32(1.0)).astype(np.float32)
    scaled = np.clip(blocks / scale[:, None, :, None], -FP8_MAX, FP8_MAX)
    q = scaled.reshape(mb * bm, nb * bn)[:m, :n].astype(ml_dtypes.float8_e4m3fn)
    return q, scale


# ================================================================================================
# The checkpoint folder
# ================================================================================================

class _Checkpoint:
    """The safetensors files of an HF folder: which file holds each tensor, headers checked.

    Tensors are read one at a time, mapped from their file (`st.SafetensorsFile.read`).
    """

    def __init__(self, path: str):
        self.path = path
        self.files: dict[str, st.SafetensorsFile] = {}
        self.where: dict[str, str] = {}
        index = os.path.join(path, INDEX_FILE)
        if os.path.isfile(index):
            self._open_index(index)
        elif os.path.isfile(os.path.join(path, SINGLE_FILE)):
            f = self._open(SINGLE_FILE)
            self.where = {name: SINGLE_FILE for name in f.keys()}
        else:
            self._refuse_folder()

    def _open(self, name: str) -> st.SafetensorsFile:
        if name not in self.files:
            try:
                self.files[name] = st.SafetensorsFile(os.path.join(self.path, name))
            except st.SafetensorsError as e:
                raise HFCheckpointError(str(e)) from e
        return self.files[name]

    def _open_index(self, index: str) -> None:
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
        except (OSError, json.JSONDecodeError, AttributeError) as e:
            raise HFCheckpointError(f"{index} is not a JSON object with a weight_map ({e}); "
                                    "rewrite it or remove it next to a single model.safetensors.") from e
        if not isinstance(weight_map, dict) or not weight_map:
            raise HFCheckpointError(f"{index}: weight_map must be a non-empty object "
                                    "{tensor name: shard file}.")
        by_file: dict[str, list[str]] = {}
        for tensor, fname in weight_map.items():
            if (not isinstance(fname, str) or os.path.basename(fname) != fname
                    or not fname.endswith(".safetensors")):
                raise HFCheckpointError(f"{index}: tensor {tensor!r} is mapped to {fname!r}; "
                                        "expected a .safetensors file name in the same folder.")
            by_file.setdefault(fname, []).append(tensor)
        missing = sorted(f for f in by_file if not os.path.isfile(os.path.join(self.path, f)))
        if missing:
            f = missing[0]
            raise HFCheckpointError(
                f"{index} names shard file {f} (holding {len(by_file[f])} tensors, e.g. "
                f"{by_file[f][0]!r}), which does not exist in {self.path}"
                + (f" (missing shards: {missing})" if len(missing) > 1 else "")
                + "; the download is incomplete: fetch the missing file(s).")
        for fname, tensors in by_file.items():
            f = self._open(fname)
            for tensor in tensors:
                if tensor not in f:
                    raise HFCheckpointError(f"{index} maps tensor {tensor!r} to {fname}, but that "
                                            "file holds no such tensor; the shard or the index is "
                                            "from another checkpoint.")
                self.where[tensor] = fname

    def _refuse_folder(self):
        names = sorted(os.listdir(self.path))
        pickles = [n for n in names if any(re.fullmatch(p, n) for p in _PICKLE_PATTERNS)]
        shards = [n for n in names if n.endswith(".safetensors")]
        if shards:
            raise HFCheckpointError(
                f"{self.path} holds {shards[:3]} but neither {SINGLE_FILE} nor {INDEX_FILE}; a "
                f"sharded checkpoint needs its index (which tensor is in which file): copy "
                f"{INDEX_FILE} from the checkpoint's release.")
        if pickles:
            raise HFCheckpointError(
                f"{self.path} holds {pickles[0]}, a pickle checkpoint: only safetensors are read "
                "(unpickling can run arbitrary code). Convert it with transformers "
                "(`model.save_pretrained(dir, safe_serialization=True)`) and load that folder.")
        raise HFCheckpointError(f"{self.path} holds no {SINGLE_FILE} and no {INDEX_FILE}; it is "
                                "not a Hugging Face safetensors checkpoint.")

    def __contains__(self, name: str) -> bool:
        return name in self.where

    def names(self) -> list[str]:
        return list(self.where)

    def file_of(self, name: str) -> str:
        return self.where[name]

    def info(self, name: str) -> st.TensorInfo:
        return self.files[self.where[name]].info(name)

    def read(self, name: str, rows: slice | None = None) -> np.ndarray:
        return self.files[self.where[name]].read(name, rows)


def _open_folder(path: str) -> tuple[dict, _Checkpoint]:
    """(config.json as a dict, the checkpoint's tensors); refuses what is not an HF checkpoint."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise HFCheckpointError(f"{path} does not exist; pass a Hugging Face checkpoint folder "
                                f"({CONFIG_FILE} + *.safetensors).")
    if not os.path.isdir(path):
        raise HFCheckpointError(f"{path} is a file; pass the folder that holds {CONFIG_FILE} and "
                                "the *.safetensors files.")
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        pickles = [n for n in sorted(os.listdir(path)) if any(re.fullmatch(p, n) for p in _PICKLE_PATTERNS)]
        hint = (f" It holds {pickles[0]}, a pickle checkpoint: only safetensors are read." if pickles else "")
        raise HFCheckpointError(f"{path} is not a Hugging Face checkpoint: it has no {CONFIG_FILE}."
                                f"{hint} Expected {CONFIG_FILE} with {SINGLE_FILE} or {INDEX_FILE} "
                                "and its shards.")
    try:
        with open(config_path, encoding="utf-8") as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise HFCheckpointError(f"{config_path} is not valid JSON ({e}).") from e
    return hf, _Checkpoint(path)


# ================================================================================================
# The mapping: one plan for load and save
# ================================================================================================

@dataclasses.dataclass
class _Leaf:
    """One parameter array and the HF tensors that fill it.

    The array's shape is lead + item: `lead` the stacked axes (scanned layers, then experts), each
    index of which is one HF tensor of shape `item` (or item reversed when `transpose`).
    """

    path: tuple[str, ...]
    shape: tuple[int, ...]
    n_lead: int
    transpose: bool
    sources: dict[tuple[int, ...], str] = dataclasses.field(default_factory=dict)

    @property
    def item_shape(self) -> tuple[int, ...]:
        return self.shape[self.n_lead:]

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.item_shape[::-1] if self.transpose else self.item_shape

    @property
    def is_router_bias(self) -> bool:
        return self.path[-1] == "e_score_correction_bias"


# (our path under a block, HF name under model.layers.{i}., transposed, one per expert)
_ATTN = [(("attn_norm", "weight"), "input_layernorm.weight", False),
         (("attn", "wkv_a", "kernel"), "self_attn.kv_a_proj_with_mqa.weight", True),
         (("attn", "kv_norm", "weight"), "self_attn.kv_a_layernorm.weight", False),
         (("attn", "wkv_b", "kernel"), "self_attn.kv_b_proj.weight", True),
         (("attn", "wo", "kernel"), "self_attn.o_proj.weight", True),
         (("ffn_norm", "weight"), "post_attention_layernorm.weight", False)]
_Q_LORA = [(("attn", "wq_a", "kernel"), "self_attn.q_a_proj.weight", True),
           (("attn", "q_norm", "weight"), "self_attn.q_a_layernorm.weight", False),
           (("attn", "wq_b", "kernel"), "self_attn.q_b_proj.weight", True)]
_Q_FULL = [(("attn", "wq", "kernel"), "self_attn.q_proj.weight", True)]
_MLP = [(("w1", "kernel"), "gate_proj.weight", True), (("w2", "kernel"), "down_proj.weight", True),
        (("w3", "kernel"), "up_proj.weight", True)]
_EXPERTS = [(("ffn", "w1"), "mlp.experts.{e}.gate_proj.weight", True),
            (("ffn", "w2"), "mlp.experts.{e}.down_proj.weight", True),
            (("ffn", "w3"), "mlp.experts.{e}.up_proj.weight", True)]
# Linear weights quantized in DeepSeek's FP8 release (the router, eh_proj, embedding and head are not).
_FP8_WEIGHT = re.compile(r"model\.layers\.\d+\.(self_attn\.(q_a_proj|q_b_proj|q_proj|"
                         r"kv_a_proj_with_mqa|kv_b_proj|o_proj)|mlp\.(experts\.\d+\.|"
                         r"shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight")
_IGNORABLE = re.compile(r".*\.rotary_emb\.inv_freq")


def _block_entries(cfg: ModelConfig, moe: bool) -> list[tuple[tuple[str, ...], str, bool, bool]]:
    entries = [(p, n, t, False) for p, n, t in _ATTN + (_Q_LORA if cfg.q_lora_rank else _Q_FULL)]
    if not moe:
        return entries + [(("ffn",) + p, "mlp." + n, t, False) for p, n, t in _MLP]
    entries.append((("ffn", "gate", "kernel"), "mlp.gate.weight", True, False))
    if cfg.has_score_correction_bias:
        entries.append((("ffn", "gate", "e_score_correction_bias"), "mlp.gate.e_score_correction_bias",
                        False, False))
    entries += [(p, n, t, True) for p, n, t in _EXPERTS]
    if cfg.n_shared_experts:
        entries += [(("ffn", "shared_experts") + p, "mlp.shared_experts." + n, t, False) for p, n, t in _MLP]
    return entries


def _flat_shapes(cfg: ModelConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    return {tuple(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree.abstract_params(cfg))[0]}


def _plan(cfg: ModelConfig) -> list[_Leaf]:
    """Every parameter leaf of DeepSeekV3(cfg), with the HF tensor behind each of its items."""
    shapes = _flat_shapes(cfg)
    leaves: dict[tuple[str, ...], _Leaf] = {}

    def add(path, lead, name, transpose):
        if path not in leaves:
            if path not in shapes:
                raise AssertionError(f"mapping names {path}, which DeepSeekV3({cfg}) lacks")
            leaves[path] = _Leaf(path, tuple(shapes[path].shape), len(lead), transpose)
        leaves[path].sources[lead] = name

    add(("embed", "embedding"), (), "model.embed_tokens.weight", False)
    add(("norm", "weight"), (), "model.norm.weight", False)
    add(("head", "kernel"), (), "lm_head.weight", True)

    def add_block(prefix, lead, layer, moe):
        for rel, name, transpose, per_expert in _block_entries(cfg, moe):
            hf = f"model.layers.{layer}.{name}"
            if per_expert:
                for e in range(cfg.n_routed_experts):
                    add(prefix + rel, lead + (e,), hf.format(e=e), transpose)
            else:
                add(prefix + rel, lead, hf, transpose)

    for block in tree.blocks(cfg):
        for j, layer in enumerate(block.layers):
            add_block(block.path, (j,) if block.scanned else (), layer, block.moe)
    for k in range(cfg.mtp_depth):
        layer, prefix = cfg.n_layers + k, tree.mtp_path(k)
        add(prefix + ("enorm", "weight"), (), f"model.layers.{layer}.enorm.weight", False)
        add(prefix + ("hnorm", "weight"), (), f"model.layers.{layer}.hnorm.weight", False)
        add(prefix + ("eh_proj", "kernel"), (), f"model.layers.{layer}.eh_proj.weight", True)
        add(prefix + ("norm", "weight"), (), f"model.layers.{layer}.shared_head.norm.weight", False)
    uncovered = sorted(set(shapes) - set(leaves))
    incomplete = [l.path for l in leaves.values()
                  if len(l.sources) != math.prod(l.shape[:l.n_lead])]
    if uncovered or incomplete:
        raise AssertionError(f"the HF mapping misses parameters {uncovered} / items of {incomplete}")
    return list(leaves.values())


def _mtp_copies(cfg: ModelConfig) -> list[tuple[str, str, bool]]:
    """(MTP layer's copy, the shared tensor it copies, transposed in our tree) per MTP module."""
    out = []
    for k in range(cfg.mtp_depth):
        layer = cfg.n_layers + k
        out.append((f"model.layers.{layer}.embed_tokens.weight", "model.embed_tokens.weight", False))
        out.append((f"model.layers.{layer}.shared_head.head.weight", "lm_head.weight", True))
    return out


# ================================================================================================
# Loading
# ================================================================================================

def _present_mtp_depth(cfg: ModelConfig, ckpt: _Checkpoint, source: str) -> ModelConfig:
    """cfg with mtp_depth set to the MTP layers the checkpoint holds (config may declare more)."""
    present = [k for k in range(cfg.mtp_depth)
               if f"model.layers.{cfg.n_layers + k}.eh_proj.weight" in ckpt]
    if len(present) == cfg.mtp_depth:
        return cfg
    if not present:
        logging.warning("%s declares num_nextn_predict_layers=%d but the checkpoint holds no MTP "
                        "layer (model.layers.%d.eh_proj.weight is absent); loading without MTP "
                        "(mtp_depth=0).", source, cfg.mtp_depth, cfg.n_layers)
        return cfg.replace(mtp_depth=0)
    absent = sorted(set(range(cfg.mtp_depth)) - set(present))
    raise HFCheckpointError(
        f"{source} declares num_nextn_predict_layers={cfg.mtp_depth} but the checkpoint lacks MTP "
        f"layer(s) {[cfg.n_layers + k for k in absent]} (no model.layers.<i>.eh_proj.weight); the "
        "shards are incomplete, or set num_nextn_predict_layers to the layers present.")


def _check_tensors(plan: list[_Leaf], ckpt: _Checkpoint, cfg: ModelConfig,
                   fp8_block: tuple[int, int] | None, source: str) -> None:
    """Every tensor the plan needs is present with its shape and a float (or scaled FP8) dtype, and
    the checkpoint holds nothing else. Refusals name the tensor, its file and what was expected."""
    used: set[str] = set()
    missing: list[str] = []
    for leaf in plan:
        for name in leaf.sources.values():
            if name not in ckpt:
                missing.append(name)
                continue
            used.add(name)
            info, where = ckpt.info(name), f"tensor {name!r} in {ckpt.file_of(name)}"
            if tuple(info.shape) != leaf.hf_shape:
                raise HFCheckpointError(
                    f"{where} has shape {list(info.shape)}; expected {list(leaf.hf_shape)} for "
                    f"{'/'.join(leaf.path)} from {source} ({_shape_hint(cfg)}). The tensors "
                    "and config.json belong to different models.")
            if info.dtype == "F8_E4M3":
                used.add(_check_fp8(name, info, ckpt, fp8_block, source))
            elif info.dtype not in _FLOAT_CODES:
                raise HFCheckpointError(f"{where} has dtype {info.dtype}; expected a floating-point "
                                        f"dtype ({', '.join(_FLOAT_CODES)}, or F8_E4M3 with a "
                                        "weight_scale_inv).")
    if missing:
        raise HFCheckpointError(
            f"the checkpoint in {ckpt.path} lacks {len(missing)} tensor(s) that {source} implies, "
            f"e.g. {missing[:8]}; the shards are incomplete or belong to another model.")
    for copy, shared, _ in _mtp_copies(cfg):
        if copy in ckpt:
            used.add(copy)
            _check_copy(ckpt, copy, shared)
    unexpected = sorted(n for n in ckpt.names() if n not in used and not _IGNORABLE.fullmatch(n))
    if unexpected:
        raise HFCheckpointError(
            f"the checkpoint in {ckpt.path} holds {len(unexpected)} tensor(s) that {source} does "
            f"not account for, e.g. {unexpected[:8]} (in {ckpt.file_of(unexpected[0])}); it is not "
            "a DeepSeek-V3 checkpoint of that config (check num_hidden_layers, "
            "num_nextn_predict_layers, n_routed_experts, q_lora_rank).")


def _shape_hint(cfg: ModelConfig) -> str:
    return (f"hidden_size={cfg.dim}, vocab_size={cfg.vocab_size}, q_lora_rank={cfg.q_lora_rank}, "
            f"kv_lora_rank={cfg.kv_lora_rank}, num_attention_heads={cfg.n_heads}")


def _check_fp8(name: str, info: st.TensorInfo, ckpt: _Checkpoint,
               fp8_block: tuple[int, int] | None, source: str) -> str:
    where = f"tensor {name!r} in {ckpt.file_of(name)}"
    if fp8_block is None:
        raise HFCheckpointError(f"{where} is F8_E4M3 but {source} has no quantization_config; add "
                                "DeepSeek's {\"quant_method\": \"fp8\", \"fmt\": \"e4m3\", "
                                "\"weight_block_size\": [128, 128]}.")
    if len(info.shape) != 2 or not name.endswith(".weight"):
        raise HFCheckpointError(f"{where} is F8_E4M3 with shape {list(info.shape)}; only 2-D "
                                "linear weights can be block-quantized.")
    scale = name + "_scale_inv"
    if scale not in ckpt:
        raise HFCheckpointError(f"{where} is F8_E4M3 but the checkpoint has no {scale!r}, the "
                                "block scales needed to dequantize it.")
    bm, bn = fp8_block
    want = (-(-info.shape[0] // bm), -(-info.shape[1] // bn))
    s_info = ckpt.info(scale)
    if tuple(s_info.shape) != want or s_info.dtype not in _FLOAT_CODES:
        raise HFCheckpointError(
            f"tensor {scale!r} in {ckpt.file_of(scale)} is {s_info.dtype} {list(s_info.shape)}; "
            f"expected a float tensor of shape {list(want)} (one scale per {bm}x{bn} block of "
            f"{name}, {list(info.shape)}).")
    return scale


def _check_copy(ckpt: _Checkpoint, copy: str, shared: str, rows_per_chunk: int = 1024) -> None:
    """The MTP layer's copy of the embedding / head equals the shared tensor, compared in chunks of
    rows (each chunk mapped on its own, so the check holds a few chunks in memory, not the tensors)."""
    a_info, b_info = ckpt.info(copy), ckpt.info(shared)
    if a_info.shape != b_info.shape:
        raise HFCheckpointError(f"{copy!r} has shape {list(a_info.shape)} but {shared!r}, which it "
                                f"should copy, has {list(b_info.shape)}.")
    for r in range(0, a_info.shape[0], rows_per_chunk):
        rows = slice(r, r + rows_per_chunk)
        if not np.array_equal(np.asarray(ckpt.read(copy, rows), np.float32),
                              np.asarray(ckpt.read(shared, rows), np.float32)):
            raise HFCheckpointError(
                f"{copy!r} ({ckpt.file_of(copy)}) differs from {shared!r} (rows from {r}): "
                "dsv3_jax's MTP modules share the main embedding and output head (SPEC.md "
                "'Multi-token prediction'), so this checkpoint cannot be represented.")


def _normalize_index(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(*s.indices(d)[:2]) for s, d in zip(index, shape))


def _fill(out: np.ndarray, leaf: _Leaf, index: tuple[slice, ...], ckpt: _Checkpoint,
          fp8_block: tuple[int, int] | None, keep_fp8: bool, scales: bool = False) -> None:
    """Writes the part `index` of `leaf` into `out` (its shape), reading one source region at a time.

    With `scales`, `leaf` describes the FP8 scale leaf (sources are the `_scale_inv` tensors).
    """
    lead, item = index[:leaf.n_lead], index[leaf.n_lead:]
    hf_region = item[::-1] if leaf.transpose else item
    for pos, name in leaf.sources.items():
        if not all(s.start <= p < s.stop for p, s in zip(pos, lead)):
            continue
        dst = out[tuple(p - s.start for p, s in zip(pos, lead))]
        # Map only the rows of the region, then take its columns.
        region = ckpt.read(name + "_scale_inv" if scales else name, hf_region[0])[(slice(None),) + hf_region[1:]]
        if not scales and region.dtype == ml_dtypes.float8_e4m3fn and not keep_fp8:
            s = np.asarray(ckpt.read(name + "_scale_inv"), np.float32)
            _dequantize_into(dst, region, s, hf_region[0].start, hf_region[1].start, fp8_block,
                             leaf.transpose)
        else:
            dst[...] = region.T if leaf.transpose else region
        del region


def _put(shape: tuple[int, ...], dtype, sharding: jax.sharding.Sharding, fill) -> jax.Array:
    """A jax.Array of `shape` with `sharding`, built one addressable shard at a time: each unique
    shard is filled on the host, put on its first device, and copied device-to-device to the others
    that hold the same index, so the host holds one shard at a time."""
    by_index: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple((s.start, s.stop) for s in _normalize_index(index, shape))
        by_index.setdefault(key, []).append(device)
    arrays = []
    for key, devices in by_index.items():
        index = tuple(slice(a, b) for a, b in key)
        host = np.empty(tuple(b - a for a, b in key), dtype)
        fill(host, index)
        first = jax.device_put(host, devices[0])
        first.block_until_ready()
        del host
        arrays.append(first)
        arrays += [jax.device_put(first, d) for d in devices[1:]]
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def _shardings(cfg: ModelConfig, mesh) -> dict[tuple[str, ...], jax.sharding.Sharding]:
    """Each parameter's NamedSharding on `mesh`, from its logical axis names and the rules table."""
    from dsv3_jax.parallel.mesh import abstract_with_shardings

    _, shardings = abstract_with_shardings(tree.boxed_init(cfg), mesh)
    flat = jax.tree_util.tree_flatten_with_path(
        shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))[0]
    return {tuple(k.key for k in path): s for path, s in flat}


def _set(nested: dict, path: tuple[str, ...], value) -> None:
    for key in path[:-1]:
        nested = nested.setdefault(key, {})
    nested[path[-1]] = value


def load_hf_checkpoint(path: str, dtype=jnp.float32, *, mesh: jax.sharding.Mesh | None = None,
                       keep_fp8: bool = False, scan_layers: bool = True,
                       progress: bool = False) -> tuple[ModelConfig, dict]:
    """Reads a Hugging Face DeepSeek-V3 checkpoint folder into (ModelConfig, params).

    Args:
      path: folder with config.json and model.safetensors, or shards + model.safetensors.index.json.
      dtype: float32, bfloat16 or float16: the parameters' dtype (ModelConfig.param_dtype is set to
        it); the router's e_score_correction_bias stays float32 as in the model. FP8 weights are
        dequantized in float32, then cast. The compute dtype (ModelConfig.dtype) keeps its default.
      mesh: when given, each parameter is placed straight into its NamedSharding on the mesh (its
        logical axes through dsv3_jax.parallel.mesh.LOGICAL_AXIS_RULES); otherwise on the default
        device.
      keep_fp8: keep FP8 weights quantized. Each parameter filled from F8_E4M3 tensors stays
        float8_e4m3fn in our [in, out] layout (stacked as usual), and a float32 sibling named
        `<leaf>_scale_inv` (`attn/wq_a/kernel_scale_inv`, `ffn/w1_scale_inv`, ...) holds its block
        scales in the same orientation: shape lead + [ceil(in/128), ceil(out/128)], with
        W[..., i, j] = q[..., i, j] * scale_inv[..., i // 128, j // 128]; the scales are replicated
        across the mesh. Such a tree is not accepted by `DeepSeekV3.apply` until an FP8 path exists.
        Without FP8 tensors in the checkpoint this flag changes nothing.
      scan_layers: the layout of the returned tree (ModelConfig.scan_layers): stacked
        `dense_layers/layers/...` (True) or `dense_layers/layers_{i}/...` (False).
      progress: show a tqdm bar over the parameters.

    Returns:
      (cfg, params): params is a nested dict of jax.Arrays with exactly the tree of
      `DeepSeekV3(cfg).init(...)["params"]` (unboxed), plus the scale siblings under keep_fp8.

    Memory: parameters are streamed one at a time and each is assembled one addressable shard at a
    time (a stacked expert array [L, E, D, F] included): a shard is filled on the host from the
    source tensors it covers, one source region at a time, put on its device, then released. Host
    memory beyond the loaded parameters is therefore bounded by one output shard plus the mapped pages
    of one source tensor (only the rows a shard needs are mapped; FP8 dequantization adds a band of
    128 rows in float32); with no mesh the "shard" is the whole parameter. Headers, shapes and dtypes are all checked before any weight is
    read; the MTP layer's copies of the embedding and head are compared with the shared ones, chunk
    by chunk, and dropped.

    Raises:
      HFCheckpointError: naming the file, key or tensor and what was expected.
    """
    dtype_name = np.dtype(dtype).name
    if dtype_name not in _PARAM_DTYPES:
        raise HFCheckpointError(f"load_hf_checkpoint: dtype={dtype_name!r}; use one of {_PARAM_DTYPES}.")
    hf, ckpt = _open_folder(path)
    source = os.path.join(os.fspath(path), CONFIG_FILE)
    cfg = config_from_hf(hf, source=source).replace(param_dtype=dtype_name, scan_layers=scan_layers)
    fp8_block = _fp8_block(hf, source)
    cfg = _present_mtp_depth(cfg, ckpt, source)
    plan = _plan(cfg)
    _check_tensors(plan, ckpt, cfg, fp8_block, source)
    shardings = _shardings(cfg, mesh) if mesh is not None else {}
    default = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    params: dict = {}
    for leaf in tqdm(plan, desc="loading", unit="param", disable=not progress):
        names = list(leaf.sources.values())
        fp8 = [ckpt.info(n).dtype == "F8_E4M3" for n in names]
        quantized = keep_fp8 and any(fp8)
        if quantized and not all(fp8):
            raise HFCheckpointError(f"keep_fp8: {'/'.join(leaf.path)} mixes F8_E4M3 and other "
                                    f"tensors (e.g. {names[fp8.index(False)]!r}); load with "
                                    "keep_fp8=False to dequantize.")
        if quantized:
            out_dtype = np.dtype(ml_dtypes.float8_e4m3fn)
        elif leaf.is_router_bias:
            out_dtype = np.dtype(np.float32)
        else:
            out_dtype = np.dtype(dtype_name)
        sharding = shardings.get(leaf.path, default)
        fill = lambda out, index, leaf=leaf, q=quantized: _fill(out, leaf, index, ckpt, fp8_block, q)
        _set(params, leaf.path, _put(leaf.shape, out_dtype, sharding, fill))
        if quantized:
            _set(params, leaf.path[:-1] + (leaf.path[-1] + "_scale_inv",),
                 _load_scales(leaf, ckpt, fp8_block, mesh, default))
    return cfg, params


def _load_scales(leaf: _Leaf, ckpt: _Checkpoint, fp8_block, mesh, default) -> jax.Array:
    """The FP8 scale sibling of `leaf` (see load_hf_checkpoint, keep_fp8): float32, replicated."""
    bm, bn = fp8_block
    rows, cols = leaf.hf_shape
    hf_grid = (-(-rows // bm), -(-cols // bn))
    item = hf_grid[::-1] if leaf.transpose else hf_grid
    scale_leaf = dataclasses.replace(leaf, shape=leaf.shape[:leaf.n_lead] + item)
    sharding = (jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
                if mesh is not None else default)
    fill = lambda out, index: _fill(out, scale_leaf, index, ckpt, fp8_block, True, scales=True)
    return _put(scale_leaf.shape, np.dtype(np.float32), sharding, fill)


# ================================================================================================
# Saving
# ================================================================================================

@dataclasses.dataclass(frozen=True)
class _Out:
    """One tensor of the exported checkpoint: item `lead` of parameter `path`."""

    name: str
    path: tuple[str, ...]
    lead: tuple[int, ...]
    transpose: bool
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    role: str = "plain"  # "plain", "fp8" (the quantized weight) or "scale" (its weight_scale_inv)


def _sort_key(name: str):
    """Embedding, layers in order (numbers compared as numbers), final norm, head; a weight's
    `_scale_inv` right after it."""
    group = 1 if name.startswith("model.layers.") else {"model.embed_tokens.weight": 0,
                                                        "model.norm.weight": 2}.get(name, 3)
    return (group, [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split(".")])


def _check_params(cfg: ModelConfig, params) -> dict[tuple[str, ...], Any]:
    params = nn.unbox(params)
    flat = {tuple(getattr(k, "key", str(k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    shapes = _flat_shapes(cfg)
    missing, extra = sorted(set(shapes) - set(flat)), sorted(set(flat) - set(shapes))
    if missing or extra:
        raise HFCheckpointError(
            "save_hf_checkpoint: params do not match DeepSeekV3(cfg): "
            + (f"missing {['/'.join(p) for p in missing[:5]]} " if missing else "")
            + (f"unexpected {['/'.join(p) for p in extra[:5]]} " if extra else "")
            + "(is cfg the config these params were built with, incl. scan_layers?).")
    for p, want in shapes.items():
        if tuple(np.shape(flat[p])) != tuple(want.shape):
            raise HFCheckpointError(f"save_hf_checkpoint: params {'/'.join(p)} has shape "
                                    f"{tuple(np.shape(flat[p]))}; cfg implies {tuple(want.shape)}.")
    return flat


def _outputs(cfg: ModelConfig, flat: dict, fp8: bool, dtype: str | None) -> list[_Out]:
    outs = []
    for leaf in _plan(cfg):
        array = flat[leaf.path]
        if leaf.is_router_bias:
            code = "F32"
        else:
            code = st.dtype_code(dtype or np.dtype(array.dtype))
        for lead, name in sorted(leaf.sources.items()):
            if fp8 and _FP8_WEIGHT.fullmatch(name):
                rows, cols = leaf.hf_shape
                grid = (-(-rows // DEFAULT_FP8_BLOCK[0]), -(-cols // DEFAULT_FP8_BLOCK[1]))
                outs.append(_Out(name, leaf.path, lead, leaf.transpose, "F8_E4M3", leaf.hf_shape, "fp8"))
                outs.append(_Out(name + "_scale_inv", leaf.path, lead, leaf.transpose, "F32", grid, "scale"))
            else:
                outs.append(_Out(name, leaf.path, lead, leaf.transpose, code, leaf.hf_shape))
    by_name = {o.name: o for o in outs}
    for copy, shared, _ in _mtp_copies(cfg):
        outs.append(dataclasses.replace(by_name[shared], name=copy))
    return sorted(outs, key=lambda o: _sort_key(o.name))


class _HostReader:
    """Host copies of parameter items: a parameter on one CPU device is viewed without a copy;
    otherwise each item is sliced on its devices and only that slice is brought to the host."""

    def __init__(self, flat: dict):
        self.flat = flat
        self._last: tuple[str, np.ndarray, np.ndarray] | None = None  # FP8 quantization cache

    def item(self, out: _Out) -> np.ndarray:
        array = self.flat[out.path]
        if isinstance(array, jax.Array) and not (
                len(array.devices()) == 1 and next(iter(array.devices())).platform == "cpu"):
            value = np.asarray(array[out.lead]) if out.lead else np.asarray(array)
        else:
            value = np.asarray(array)[out.lead]
        return value.T if out.transpose else value

    def tensor(self, out: _Out) -> np.ndarray:
        if out.role == "plain":
            return self.item(out)
        weight = out.name[:-len("_scale_inv")] if out.role == "scale" else out.name
        if self._last is None or self._last[0] != weight:
            self._last = (weight, *quantize_fp8(np.asarray(self.item(out), np.float32)))
        return self._last[1] if out.role == "fp8" else self._last[2]


def _shards(outs: list[_Out], max_shard_bytes: int) -> list[list[_Out]]:
    shards: list[list[_Out]] = [[]]
    size = 0
    for out in outs:
        nbytes = math.prod(out.shape) * st.DTYPES[out.dtype].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes and out.role != "scale":
            shards.append([])
            size = 0
        shards[-1].append(out)
        size += nbytes
    return shards


def save_hf_checkpoint(path: str, cfg: ModelConfig, params, *,
                       max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, fp8: bool = False,
                       dtype=None, progress: bool = False) -> str:
    """Writes `params` as a Hugging Face DeepSeek-V3 checkpoint folder that transformers'
    `DeepseekV3ForCausalLM.from_pretrained` loads (and `load_hf_checkpoint` reads back bit for bit).

    Layout: config.json (current transformers style, `rope_parameters`; see `config_to_hf`), and
    model.safetensors, or model-0000i-of-0000N.safetensors + model.safetensors.index.json when the
    tensors exceed `max_shard_bytes` (a shard holds at least one tensor). Tensor names and
    orientation follow the module docstring; routed experts are written one tensor per expert, as
    in DeepSeek's release; the MTP layers get their copies of the embedding and head back.

    Args:
      path: a folder that does not exist yet (or is empty); written under a temporary name and
        renamed when complete, so a failed save leaves nothing behind under `path`.
      cfg, params: the model; params unboxed or boxed, on any devices (`scan_layers` either way).
      max_shard_bytes: the size above which a new shard file starts.
      fp8: write the linear weights of the blocks (attention, dense MLP, experts, shared experts) as
        F8_E4M3 with 128x128 float32 block scales `<name>_scale_inv` (scale = block amax / 448) and
        DeepSeek's `quantization_config`; the router, eh_proj, norms, embedding and head stay as they are.
      dtype: the dtype of the written (unquantized) tensors; None keeps each parameter's own dtype.
        The router bias is always float32.
      progress: show a tqdm bar over the tensors.

    Host memory: one tensor (one expert's matrix, one layer's norm, ...) at a time, plus its FP8
    quantization when `fp8`.

    Returns:
      the folder path.
    """
    path = os.fspath(path)
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise HFCheckpointError(f"save_hf_checkpoint: {path} already exists and is not an empty "
                                "folder; choose a new path (nothing is overwritten).")
    if not isinstance(max_shard_bytes, int) or max_shard_bytes < 1:
        raise HFCheckpointError(f"save_hf_checkpoint: max_shard_bytes={max_shard_bytes!r}; use a "
                                "positive number of bytes, e.g. 5 * 2**30.")
    if dtype is not None and np.dtype(dtype).name not in _PARAM_DTYPES:
        raise HFCheckpointError(f"save_hf_checkpoint: dtype={np.dtype(dtype).name!r}; use one of "
                                f"{_PARAM_DTYPES} or None.")
    if cfg.score_func != "sigmoid":
        logging.warning("save_hf_checkpoint: score_func=%r: the checkpoint records scoring_func and "
                        "topk_method, but transformers' DeepseekV3 implements sigmoid routing only "
                        "and will not reproduce this model's logits.", cfg.score_func)
    flat = _check_params(cfg, params)
    outs = _outputs(cfg, flat, fp8, None if dtype is None else np.dtype(dtype))
    shards = _shards(outs, max_shard_bytes)
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    write_dtype = np.dtype(dtype).name if dtype is not None else np.dtype(flat[("embed", "embedding")].dtype).name
    quant = ({"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
              "weight_block_size": list(DEFAULT_FP8_BLOCK)} if fp8 else None)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    partial = os.path.join(parent, f".{os.path.basename(path)}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    reader = _HostReader(flat)
    try:
        bar = tqdm(total=len(outs), desc="saving", unit="tensor", disable=not progress)
        total = 0
        for fname, shard in zip(names, shards):
            specs = [st.TensorSpec(o.name, o.dtype, o.shape) for o in shard]
            by_name = {o.name: o for o in shard}

            def produce(spec, by_name=by_name):
                bar.update(1)
                return reader.tensor(by_name[spec.name])

            total += st.write_file(os.path.join(partial, fname), specs, produce, {"format": "pt"})
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": sum(math.prod(o.shape) * st.DTYPES[o.dtype].itemsize
                                                    for o in outs)},
                     "weight_map": {o.name: f for f, shard in zip(names, shards) for o in shard}}
            with open(os.path.join(partial, INDEX_FILE), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        with open(os.path.join(partial, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config_to_hf(cfg, dtype=write_dtype, quantization_config=quant), f, indent=2)
        if os.path.isdir(path):
            os.rmdir(path)  # empty, checked above
        os.rename(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    logging.info("wrote %s: %d tensors in %d file(s), %.1f MB", path, len(outs), len(shards), total / 1e6)
    return path

