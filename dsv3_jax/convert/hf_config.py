"""config.json <-> ModelConfig: `config_from_hf` reads a Hugging Face DeepSeek-V3 config (the
release's or current transformers' style) and refuses, by key, what ModelConfig cannot express;
`config_to_hf` writes the current transformers style. `fp8_block` reads `quantization_config`.
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping

from absl import logging

from dsv3_jax.config import ConfigError, ModelConfig
from dsv3_jax.ops import fp8

CONFIG_FILE = "config.json"


class HFCheckpointError(ValueError):
    """A Hugging Face checkpoint (its config.json or its tensors) cannot be loaded or written."""


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
    rope, name = ((params, "rope_parameters") if params is not None
                  else ({} if scaling is None else scaling, "rope_scaling"))
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
    fp8_block(hf, source)  # validates quantization_config
    try:
        return ModelConfig(**fields)
    except ConfigError as e:
        raise HFCheckpointError(f"{source} maps to a model dsv3_jax cannot build: {e} (mapping: "
                                "see dsv3_jax.convert.config_from_hf).") from e


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


def fp8_block(hf: Mapping[str, Any], source: str) -> tuple[int, int] | None:
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
    block = q.get("weight_block_size", [fp8.BLOCK, fp8.BLOCK])
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise HFCheckpointError(f"{source}: quantization_config.weight_block_size={block!r}; "
                                "expected two positive integers such as [128, 128].")
    return int(block[0]), int(block[1])

