"""Hugging Face checkpoints: logits against transformers' own (tests/fixtures/hf, made by
tests/fixtures/make_hf_fixtures.py with torch + transformers, which these tests never import),
export -> import bit for bit, export against the fixture files byte for byte, FP8 dequantization
against a numpy block loop, loading onto an 8-device mesh, the CLI, and every refused input."""

from __future__ import annotations

import functools
import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
from absl import logging

import dsv3_jax as ds
from dsv3_jax import convert
from dsv3_jax.convert import HFCheckpointError, load_hf_checkpoint, save_hf_checkpoint
from dsv3_jax.convert import safetensors as st
from dsv3_jax.model.transformer import DeepSeekV3
from dsv3_jax.ops import fp8

from conftest import COMPILATION_CACHE, TINY32, V2_STYLE, init_params

ROOT = pathlib.Path(__file__).resolve().parent.parent
FIXTURES = pathlib.Path(__file__).resolve().parent / "fixtures" / "hf"
NAMES = ("yarn_mtp_fp32", "noq_dense_bf16", "fp8")
_RAW_DTYPES = {"F32": np.float32, "BF16": ml_dtypes.bfloat16, "F8_E4M3": ml_dtypes.float8_e4m3fn,
               "I32": np.int32}


def _rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    assert ours.shape == theirs.shape, (ours.shape, theirs.shape)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def _raw_tensors(folder) -> dict[str, tuple[str, bytes]]:
    """{name: (dtype code, raw bytes)} of every *.safetensors in folder, parsed here from the format
    itself (8-byte length, JSON header, data), independently of dsv3_jax.convert.safetensors."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*.safetensors"))):
        data = pathlib.Path(path).read_bytes()
        n = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + n])
        header.pop("__metadata__", None)
        for name, entry in header.items():
            begin, end = entry["data_offsets"]
            out[name] = (entry["dtype"], tuple(entry["shape"]), data[8 + n + begin:8 + n + end])
    return out


def _raw_array(entry) -> np.ndarray:
    code, shape, raw = entry
    return np.frombuffer(raw, _RAW_DTYPES[code]).reshape(shape)


@functools.lru_cache(maxsize=None)
def _fixture(name):
    cfg, params = load_hf_checkpoint(FIXTURES / name)
    golden = dict(np.load(FIXTURES / name / "golden.npz"))
    return cfg.replace(dtype="float32"), params, golden


@functools.lru_cache(maxsize=None)
def _forward(cfg):
    return jax.jit(lambda p, t: DeepSeekV3(cfg).apply({"params": p}, t, return_mtp=cfg.mtp_depth > 0))


def _flat(params) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _assert_same_params(a, b):
    fa, fb = _flat(a), _flat(b)
    assert fa.keys() == fb.keys()
    for k in fa:
        assert fa[k].dtype == fb[k].dtype and fa[k].shape == fb[k].shape, k
        assert fa[k].tobytes() == fb[k].tobytes(), k


def _copy(name, tmp_path) -> pathlib.Path:
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def _edit_config(folder, **changes):
    path = pathlib.Path(folder) / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is _DELETE:
            del config[key]
        else:
            config[key] = value
    path.write_text(json.dumps(config))


_DELETE = object()


# ------------------------------------------------------------------------------------ parity

@pytest.mark.parametrize("name", NAMES)
def test_logits_match_transformers(name):
    cfg, params, golden = _fixture(name)
    out = _forward(cfg)(params, jnp.asarray(golden["tokens"]))
    logits = out[0] if cfg.mtp_depth else out
    assert _rel_err(logits, golden["logits"]) <= 1e-5


def test_mtp_logits_match_transformers_decoder_layer():
    """The golden MTP logits come from transformers' DeepseekV3DecoderLayer and RMSNorms on
    concat[enorm(emb(t_{i+1})), hnorm(h_i)] (positions with a next token only)."""
    cfg, params, golden = _fixture("yarn_mtp_fp32")
    _, mtp_logits = _forward(cfg)(params, jnp.asarray(golden["tokens"]))
    assert _rel_err(mtp_logits[0][:, :-1], golden["mtp_logits"]) <= 1e-5


def test_fixtures_cover_what_they_claim():
    yarn, _, _ = _fixture("yarn_mtp_fp32")
    assert yarn.use_yarn and yarn.rope_factor == 4 and yarn.mscale == 0.707
    assert yarn.n_expert_groups == 4 and yarn.n_limited_groups == 2 and yarn.q_lora_rank == 48
    assert yarn.mtp_depth == 1 and yarn.n_dense_layers == 1 and yarn.n_moe_layers == 2
    bias = _raw_array(_raw_tensors(FIXTURES / "yarn_mtp_fp32")["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert np.all(bias != 0)
    noq, _, _ = _fixture("noq_dense_bf16")
    assert noq.q_lora_rank == 0 and noq.n_dense_layers == 3 and not noq.use_yarn
    assert len(glob.glob(str(FIXTURES / "noq_dense_bf16" / "model-*.safetensors"))) > 1
    raw = _raw_tensors(FIXTURES / "fp8")
    q = raw["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert q[0] == "F8_E4M3" and q[1] == (140, 144)  # 2 x 2 blocks, both edges partial
    assert raw["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"][1] == (2, 2)


def test_mtp_params_equal_the_stored_tensors():
    _, params, _ = _fixture("yarn_mtp_fp32")
    raw = _raw_tensors(FIXTURES / "yarn_mtp_fp32")
    mtp = params["mtp_0"]
    pairs = [("enorm.weight", mtp["enorm"]["weight"], False),
             ("hnorm.weight", mtp["hnorm"]["weight"], False),
             ("eh_proj.weight", mtp["eh_proj"]["kernel"], True),
             ("shared_head.norm.weight", mtp["norm"]["weight"], False),
             ("self_attn.q_b_proj.weight", mtp["block"]["attn"]["wq_b"]["kernel"], True),
             ("mlp.gate.e_score_correction_bias", mtp["block"]["ffn"]["gate"]["e_score_correction_bias"], False),
             ("mlp.experts.5.down_proj.weight", mtp["block"]["ffn"]["w2"][5], True),
             ("mlp.shared_experts.up_proj.weight", mtp["block"]["ffn"]["shared_experts"]["w3"]["kernel"], True)]
    for name, ours, transpose in pairs:
        stored = _raw_array(raw["model.layers.3." + name])
        np.testing.assert_array_equal(np.asarray(ours), stored.T if transpose else stored, err_msg=name)
    # The MTP layer's copies of the embedding and head are checked and dropped.
    np.testing.assert_array_equal(_raw_array(raw["model.layers.3.embed_tokens.weight"]),
                                  np.asarray(params["embed"]["embedding"]))
    assert "embed" not in mtp and "head" not in mtp


# ------------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("cfg", [
    TINY32, V2_STYLE.replace(n_dense_layers=0),
    TINY32.replace(scan_layers=False, param_dtype="bfloat16", n_layers=4, n_dense_layers=2)],
    ids=["v3-mtp", "v2-softmax-noq-yarn-no-dense", "unscanned-bf16-2-dense"])
def test_export_then_import_is_bitwise(cfg, tmp_path):
    params = init_params(cfg)
    save_hf_checkpoint(tmp_path / "hf", cfg, params, max_shard_bytes=300_000)
    assert (tmp_path / "hf" / convert.INDEX_FILE).is_file()  # sharded
    cfg2, params2 = load_hf_checkpoint(tmp_path / "hf", np.dtype(cfg.param_dtype), scan_layers=cfg.scan_layers)
    _assert_same_params(params, params2)
    # dtype, init_std and moe_capacity_factor are run settings config.json does not hold.
    assert cfg2.replace(dtype=cfg.dtype, init_std=cfg.init_std,
                        moe_capacity_factor=cfg.moe_capacity_factor) == cfg


@pytest.mark.parametrize("name", NAMES)
def test_export_reproduces_the_fixture_files(name, tmp_path):
    """Load, save, and compare every tensor with the fixture's bytes (names, dtypes, values);
    FP8 weights are requantized to the same bytes and scales."""
    fp8 = name == "fp8"
    dtype = ml_dtypes.bfloat16 if name == "noq_dense_bf16" else np.float32
    cfg, params = load_hf_checkpoint(FIXTURES / name, dtype)
    save_hf_checkpoint(tmp_path / "out", cfg, params, fp8=fp8, dtype=ml_dtypes.bfloat16 if fp8 else None)
    theirs, ours = _raw_tensors(FIXTURES / name), _raw_tensors(tmp_path / "out")
    assert theirs.keys() == ours.keys()
    for key in theirs:
        assert ours[key][:2] == theirs[key][:2], key
        assert ours[key][2] == theirs[key][2], key


def test_exported_config_is_the_current_transformers_style(tmp_path):
    save_hf_checkpoint(tmp_path / "hf", TINY32, init_params(TINY32))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert "rope_scaling" not in config and "rope_theta" not in config
    assert config["num_nextn_predict_layers"] == 1 and config["q_lora_rank"] == 96
    assert convert.config_from_hf(config).replace(
        dtype="float32", init_std=0.05, moe_capacity_factor=TINY32.moe_capacity_factor) == TINY32


# ------------------------------------------------------------------------------------ config mapping

_V3_RELEASE = {  # DeepSeek-V3's published config.json (FP8 release)
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config"}, "aux_loss_alpha": 0.001,
    "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02,
    "intermediate_size": 18432, "kv_lora_rank": 512, "max_position_embeddings": 163840,
    "model_type": "deepseek_v3", "moe_intermediate_size": 2048, "moe_layer_freq": 1,
    "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1, "norm_topk_prob": True,
    "num_attention_heads": 128, "num_experts_per_tok": 8, "num_hidden_layers": 61,
    "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                     "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
    "v_head_dim": 128, "vocab_size": 129280}


def test_release_config_maps_to_the_671b_preset():
    cfg = convert.config_from_hf(_V3_RELEASE)
    assert cfg == ds.get_model_config("deepseek-v3-671b")
    assert abs(cfg.softmax_scale - 0.1352338) < 1e-7  # SPEC.md section 2


def test_v2_lite_style_config_maps_to_the_16b_preset():
    v2 = dict(_V3_RELEASE, model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
              intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
              first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
              n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1,
              topk_group=1, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
              routed_scaling_factor=1.0, q_lora_rank=None, num_nextn_predict_layers=0,
              rope_scaling=dict(_V3_RELEASE["rope_scaling"], mscale=0.707, mscale_all_dim=0.707))
    del v2["quantization_config"]
    assert convert.config_from_hf(v2) == ds.get_model_config("deepseek-v3-16b")


@pytest.mark.parametrize("preset", ["tiny", "small", "deepseek-v3-16b", "deepseek-v3-671b"])
def test_config_to_hf_and_back(preset):
    cfg = ds.get_model_config(preset)
    assert convert.config_from_hf(convert.config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("change, message", [
    (dict(kv_lora_rank=_DELETE), r"lacks required key\(s\) \['kv_lora_rank'\]"),
    (dict(rope_theta=_DELETE), r"rope_theta is missing"),
    (dict(scoring_func="softmax", topk_method="greedy"),
     r"norm_topk_prob=True is not supported with scoring_func='softmax'.*does not renormalise"),
    (dict(norm_topk_prob="false"), r"norm_topk_prob='false' must be true or false; fix config.json"),
    (dict(topk_method="greedy"), r"topk_method='greedy' is not supported with scoring_func='sigmoid'"),
    (dict(rope_scaling=dict(_V3_RELEASE["rope_scaling"], mscale=0.707)),
     r"mscale=0.707, mscale_all_dim=1.0.*cos/sin by 0\.9"),
    (dict(rope_scaling=dict(_V3_RELEASE["rope_scaling"], type="dynamic")), r"rope_type='dynamic' is not supported"),
    (dict(max_position_embeddings=4096), r"max_position_embeddings=4096 <= original_max_position_embeddings=4096"),
    (dict(quantization_config={"quant_method": "awq", "bits": 4}), r"quant_method='awq' is not supported"),
    (dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (dict(tie_word_embeddings=True), r"tie_word_embeddings=True is not supported"),
    (dict(rope_interleave=False), r"rope_interleave=False is not supported"),
    (dict(model_type="llama"), r"model_type='llama' is not a DeepSeek-V3-family model"),
    (dict(num_key_value_heads=8), r"num_key_value_heads=8 disagrees with the MLA shapes \(expected 128\)"),
    (dict(hidden_size="7168"), r"hidden_size='7168' must be an integer"),
    (dict(n_group=7), r"n_expert_groups=7 is invalid: does not divide n_routed_experts=256"),
])
def test_bad_config_is_refused_by_name(change, message):
    config = dict(_V3_RELEASE)
    for key, value in change.items():
        if value is _DELETE:
            del config[key]
        else:
            config[key] = value
    with pytest.raises(HFCheckpointError, match=message):
        convert.config_from_hf(config)


# What PretrainedConfig.to_dict() adds to every transformers config.json (transformers 4.x / 5.x),
# written out by hand: none of it changes the model.
_GENERIC = {
    "_name_or_path": "deepseek-ai/DeepSeek-V3", "add_cross_attention": False,
    "architectures": ["DeepseekV3ForCausalLM"], "bad_words_ids": None, "begin_suppress_tokens": None,
    "bos_token_id": 0, "chunk_size_feed_forward": 0, "cross_attention_hidden_size": None,
    "decoder_start_token_id": None, "diversity_penalty": 0.0, "do_sample": False,
    "dtype": "bfloat16", "early_stopping": False, "encoder_no_repeat_ngram_size": 0,
    "eos_token_id": 1, "exponential_decay_length_penalty": None, "finetuning_task": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"}, "is_decoder": False, "is_encoder_decoder": False,
    "label2id": {"LABEL_0": 0, "LABEL_1": 1}, "length_penalty": 1.0, "max_length": 20,
    "min_length": 0, "no_repeat_ngram_size": 0, "num_beam_groups": 1, "num_beams": 1,
    "num_return_sequences": 1, "output_attentions": False, "output_hidden_states": False,
    "output_scores": False, "pad_token_id": None, "prefix": None, "problem_type": None,
    "pruned_heads": {}, "remove_invalid_values": False, "repetition_penalty": 1.0,
    "return_dict": True, "return_dict_in_generate": False, "sep_token_id": None,
    "suppress_tokens": None, "task_specific_params": None, "temperature": 1.0,
    "tf_legacy_loss": False, "tie_encoder_decoder": False, "tokenizer_class": None, "top_k": 50,
    "top_p": 1.0, "torch_dtype": "bfloat16", "torchscript": False, "transformers_version": "4.46.3",
    "typical_p": 1.0, "use_bfloat16": False, "use_cache": True}


def _warnings_of(monkeypatch) -> list[str]:
    """Collects the messages dsv3_jax.convert logs with absl logging.warning."""
    seen = []
    monkeypatch.setattr(logging, "warning", lambda msg, *args: seen.append(msg % args))
    return seen


def test_generic_transformers_keys_are_ignored_silently(monkeypatch):
    warnings = _warnings_of(monkeypatch)
    assert convert.config_from_hf(dict(_V3_RELEASE, **_GENERIC)) == ds.get_model_config("deepseek-v3-671b")
    assert warnings == []


def test_unknown_keys_give_one_warning_that_lists_them(monkeypatch):
    warnings = _warnings_of(monkeypatch)
    config = dict(_V3_RELEASE, **_GENERIC, foo_bar=1, some_new_knob={"a": 2})
    assert convert.config_from_hf(config, source="x/config.json") == ds.get_model_config("deepseek-v3-671b")
    assert len(warnings) == 1
    assert "x/config.json" in warnings[0] and "['foo_bar', 'some_new_knob']" in warnings[0]
    assert "id2label" not in warnings[0]


def test_unknown_key_warns_once_per_load(tmp_path, monkeypatch):
    folder = _copy("fp8", tmp_path)
    _edit_config(folder, some_new_knob=3, **_GENERIC)
    warnings = _warnings_of(monkeypatch)
    cfg, _ = load_hf_checkpoint(folder)
    assert cfg == _fixture("fp8")[0].replace(dtype=cfg.dtype)
    assert len(warnings) == 1 and "['some_new_knob']" in warnings[0]
    load_hf_checkpoint(folder)
    assert len(warnings) == 2  # one per load, not one per process


def test_norm_topk_prob_false_maps_both_ways():
    cfg = convert.config_from_hf(dict(_V3_RELEASE, norm_topk_prob=False))
    assert cfg == ds.get_model_config("deepseek-v3-671b", norm_topk_prob=False)
    written = convert.config_to_hf(cfg)
    assert written["norm_topk_prob"] is False and written["scoring_func"] == "sigmoid"
    assert convert.config_from_hf(written) == cfg
    assert convert.config_to_hf(TINY32)["norm_topk_prob"] is True
    # Softmax routers never renormalise: written as false whatever the (ignored) field holds.
    assert convert.config_to_hf(V2_STYLE)["norm_topk_prob"] is False
    assert convert.config_from_hf(convert.config_to_hf(V2_STYLE)) == V2_STYLE.replace(
        dtype="bfloat16", init_std=0.006, moe_capacity_factor=ds.ModelConfig().moe_capacity_factor)


def test_export_then_import_keeps_norm_topk_prob_false(tmp_path):
    cfg = TINY32.replace(norm_topk_prob=False, mtp_depth=0, n_layers=2)
    save_hf_checkpoint(tmp_path / "hf", cfg, init_params(cfg))
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["norm_topk_prob"] is False
    cfg2, _ = load_hf_checkpoint(tmp_path / "hf")
    assert cfg2.norm_topk_prob is False


# ------------------------------------------------------------------------------------ FP8

def test_fp8_dequant_with_partial_edge_blocks_matches_a_numpy_block_loop():
    rng = np.random.default_rng(0)
    m, n = 300, 200  # blocks of 128: 3 x 2, the last row and column partial
    q = (rng.standard_normal((m, n)) * 100).clip(-448, 448).astype(ml_dtypes.float8_e4m3fn)
    s = rng.uniform(0.001, 0.01, (3, 2)).astype(np.float32)
    expected = np.empty((m, n), np.float32)
    for bi in range(3):
        for bj in range(2):
            rows, cols = slice(bi * 128, (bi + 1) * 128), slice(bj * 128, (bj + 1) * 128)
            expected[rows, cols] = q[rows, cols].astype(np.float32) * s[bi, bj]
    np.testing.assert_array_equal(fp8.weight_dequant(q, s), expected)


def test_fp8_quantization_uses_block_amax_over_448():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((130, 260)).astype(np.float32)
    q, s = convert.quantize_fp8(w)
    assert q.dtype == ml_dtypes.float8_e4m3fn and s.shape == (2, 3)
    for bi in range(2):
        for bj in range(3):
            block = w[bi * 128:(bi + 1) * 128, bj * 128:(bj + 1) * 128]
            assert s[bi, bj] == np.float32(np.abs(block).max()) / np.float32(448)
    back = fp8.weight_dequant(q, s)
    assert np.max(np.abs(back - w)) <= np.max(np.abs(w)) / 448 * 16  # e4m3: 3 mantissa bits


def test_fp8_fixture_loads_dequantized_or_kept():
    cfg, params = load_hf_checkpoint(FIXTURES / "fp8")
    _, kept = load_hf_checkpoint(FIXTURES / "fp8", keep_fp8=True)
    raw = _raw_tensors(FIXTURES / "fp8")
    ffn = kept["moe_layers"]["layers"]["ffn"]
    assert ffn["w1"].dtype == ml_dtypes.float8_e4m3fn and ffn["w1_scale_inv"].shape == (1, 4, 2, 1)
    attn = kept["dense_layers"]["layers"]["attn"]
    assert attn["wkv_a"]["kernel_scale_inv"].shape == (1, 2, 2)
    # Our layout: W[..., i, j] = q[..., i, j] * scale_inv[..., i // 128, j // 128] ([in, out]).
    for q, s, w in [(ffn["w1"], ffn["w1_scale_inv"], params["moe_layers"]["layers"]["ffn"]["w1"]),
                    (attn["wkv_a"]["kernel"], attn["wkv_a"]["kernel_scale_inv"],
                     params["dense_layers"]["layers"]["attn"]["wkv_a"]["kernel"])]:
        q, s = np.asarray(q).astype(np.float32), np.asarray(s)
        i = np.arange(q.shape[-2])[:, None] // 128
        j = np.arange(q.shape[-1])[None, :] // 128
        np.testing.assert_array_equal(q * s[..., i, j], np.asarray(w))
    assert str(kept["embed"]["embedding"].dtype) == "float32"  # never quantized
    stored = _raw_array(raw["model.layers.1.mlp.experts.2.up_proj.weight"])
    np.testing.assert_array_equal(np.asarray(ffn["w3"][0, 2]), stored.T)



def test_fp8_export_is_ops_fp8s_quantizer_an_all_zero_block_included(tmp_path):
    """save_hf_checkpoint(fp8=True) writes fp8.weight_quant's blocks: an all-zero block gets its
    scale 1e-4 / 448 (no longer 1.0) and q = 0, and loads back as zeros."""
    cfg = TINY32.replace(mtp_depth=0)
    params = jax.tree.map(np.array, init_params(cfg))  # writable copies
    kernel = params["dense_layers"]["layers"]["ffn"]["w1"]["kernel"]  # [1, I, J] = [1, 128, 384]
    kernel[0, :, 128:256] = 0  # the HF gate_proj [J, I]'s second 128x128 block
    save_hf_checkpoint(tmp_path / "hf", cfg, params, fp8=True)
    raw = st.read_file(str(tmp_path / "hf" / "model.safetensors"))
    q, s = raw["model.layers.0.mlp.gate_proj.weight"], raw["model.layers.0.mlp.gate_proj.weight_scale_inv"]
    w = kernel[0].T
    ops_q, ops_s = (np.asarray(a) for a in fp8.weight_quant(w))
    assert s.shape == (3, 1) and s[1, 0] == ops_s[1, 0] == np.float32(1e-4) / np.float32(448)
    assert q[128:256].astype(np.float32).tolist() == ops_q[128:256].astype(np.float32).tolist()
    assert not np.any(q[128:256].astype(np.float32))
    # Every block: fp8.weight_quant's definition with its divisions exactly rounded (the default
    # XLA compile multiplies by 1 / s instead: scales within one ulp, values within one e4m3 step).
    exact_q, exact_s = convert.quantize_fp8(w)
    assert q.tobytes() == exact_q.tobytes() and s.tobytes() == exact_s.tobytes()
    for b in (0, 2):
        assert s[b, 0] == np.float32(np.abs(w[b * 128:(b + 1) * 128]).max()) / np.float32(448)
    np.testing.assert_array_max_ulp(s, ops_s, maxulp=1)
    np.testing.assert_allclose(q.astype(np.float32), ops_q.astype(np.float32), rtol=2 ** -3, atol=2 ** -9)
    _, back = load_hf_checkpoint(tmp_path / "hf")
    loaded = np.asarray(back["dense_layers"]["layers"]["ffn"]["w1"]["kernel"][0])  # [I, J]
    assert not np.any(loaded[:, 128:256])
    np.testing.assert_array_equal(loaded, np.asarray(fp8.weight_dequant(q, s)).T)
    np.testing.assert_allclose(loaded, kernel[0], atol=np.abs(kernel).max() / 448 * 16)

# ------------------------------------------------------------------------------------ mesh

_MESH_SCRIPT = r"""
import sys, jax, numpy as np, jax.numpy as jnp
import dsv3_jax as ds
from dsv3_jax.convert import load_hf_checkpoint
from dsv3_jax.parallel.mesh import make_mesh
assert jax.device_count() == 8
mesh = make_mesh({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2})
folder = sys.argv[1]
cfg, sharded = load_hf_checkpoint(folder, mesh=mesh)
_, plain = load_hf_checkpoint(folder)
w1 = sharded["moe_layers"]["layers"]["ffn"]["w1"]
assert w1.sharding.spec == jax.sharding.PartitionSpec(None, "expert", "fsdp", "tensor"), w1.sharding
assert {s.data.shape for s in w1.addressable_shards} == {(w1.shape[0], w1.shape[1] // 2, w1.shape[2] // 2, w1.shape[3] // 2)}
for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(sharded)[0], jax.tree.leaves(plain)):
    assert len(a.sharding.device_set) == 8, path
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))
print("ok")
"""


def test_load_straight_into_mesh_shardings():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(COMPILATION_CACHE))
    out = subprocess.run([sys.executable, "-c", _MESH_SCRIPT, str(FIXTURES / "fp8")], env=env,
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


# ------------------------------------------------------------------------------------ CLI

def test_cli_hf_to_orbax_to_hf_round_trip(tmp_path):
    src = _copy("yarn_mtp_fp32", tmp_path)
    (src / "tokenizer.model").write_bytes(b"sentencepiece model bytes")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    for args in (["hf-to-orbax", f"--hf_dir={src}", f"--out={tmp_path / 'orbax'}"],
                 ["orbax-to-hf", f"--orbax_dir={tmp_path / 'orbax'}", f"--out={tmp_path / 'back'}"]):
        out = subprocess.run([sys.executable, "-m", "dsv3_jax.convert", *args], env=env, cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "wrote" in out.stdout
    # The Orbax layout generation restores.
    import orbax.checkpoint as ocp

    saved_cfg = ds.ModelConfig(**json.loads((tmp_path / "orbax" / "model_config.json").read_text()))
    restored = ocp.StandardCheckpointer().restore(tmp_path / "orbax" / "params")
    cfg, params = load_hf_checkpoint(src)
    assert saved_cfg == cfg
    _assert_same_params(params, restored)
    assert _raw_tensors(tmp_path / "back") == _raw_tensors(src)
    for folder in ("orbax", "back"):
        assert (tmp_path / folder / "tokenizer.model").read_bytes() == b"sentencepiece model bytes"


def test_orbax_to_hf_reads_the_newest_training_checkpoint(tmp_path):
    from dsv3_jax.convert import __main__ as cli
    from dsv3_jax.train.checkpoint import Checkpointer

    cfg = TINY32.replace(mtp_depth=0)
    params = init_params(cfg)
    older = jax.tree.map(lambda x: x * 2, params)
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"), keep=3, async_save=False)
    meta = {"model": cfg.to_dict(), "tokenizer_vocab_size": cfg.vocab_size}
    for step, p in ((5, older), (10, params)):
        state = {"step": jnp.asarray(step), "params": p, "opt_state": {"mu": p}, "rng": jnp.zeros(2, jnp.uint32)}
        ckpt.save(step, state, {"position": step}, meta)
    ckpt.wait()
    ckpt.close()
    (tmp_path / "run" / "tokenizer.model").write_bytes(b"tok")
    cli.orbax_to_hf(str(tmp_path / "run"), str(tmp_path / "hf"), progress=False)
    cfg2, params2 = load_hf_checkpoint(tmp_path / "hf")
    _assert_same_params(params, params2)
    assert cfg2.replace(dtype="float32", init_std=0.05,
                        moe_capacity_factor=cfg.moe_capacity_factor) == cfg
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == b"tok"


def test_conversions_refuse_bad_paths_and_leave_nothing(tmp_path):
    from dsv3_jax.convert import __main__ as cli

    with pytest.raises(HFCheckpointError, match="does not exist; pass a Hugging Face checkpoint folder"):
        cli.hf_to_orbax(str(tmp_path / "nothing"), str(tmp_path / "o"), progress=False)
    with pytest.raises(cli.ConversionError, match="is neither a converted Orbax folder"):
        cli.orbax_to_hf(str(tmp_path), str(tmp_path / "o"), progress=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(cli.ConversionError, match="already exists and is not an empty folder"):
        cli.hf_to_orbax(str(FIXTURES / "fp8"), str(tmp_path / "full"), progress=False)
    assert not (tmp_path / "o").exists() and os.listdir(tmp_path / "full") == ["x"]


# ------------------------------------------------------------------------------------ safetensors files

def _hand_made(path, header: dict, data: bytes, n: int | None = None) -> str:
    """A safetensors file written byte by byte: 8-byte length, JSON header padded to 8, data."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path = str(path)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") if n is None else n.to_bytes(8, "little"))
        f.write(raw + data)
    return path


def _f32(offsets, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


_BAD_FILES = {
    # kind: (header, data bytes, what the message must say)
    "overlapping offsets": ({"a": _f32([0, 8]), "b": _f32([4, 12])}, bytes(12),
                            r"tensors 'a' \(data_offsets \[0, 8\]\) and 'b' \(\[4, 12\]\) overlap"),
    "the same offsets twice": ({"a": _f32([0, 8]), "b": _f32([0, 8])}, bytes(8),
                               r"tensors 'a' .* and 'b' \(\[0, 8\]\) overlap"),
    "a hole": ({"a": _f32([0, 8]), "b": _f32([12, 20])}, bytes(20),
               r"bytes \[8, 12\) of the data section belong to no tensor \(after 'a'\)"),
    "offsets past the end": ({"a": _f32([0, 8]), "b": _f32([8, 16])}, bytes(8),
                             r"tensor 'b': data_offsets \[8, 16\] run past the end of the 8-byte data section"),
    "a size that disagrees with the shape": ({"a": _f32([0, 8], shape=(3,))}, bytes(8),
                                             r"tensor 'a' has data_offsets \[0, 8\] \(8 bytes\), but a F32 tensor of shape \[3\] takes 12 bytes"),
    "trailing bytes": ({"a": _f32([0, 8])}, bytes(12),
                       r"the data section holds 12 bytes but the tensors cover only 8: 4 trailing bytes belong to no tensor"),
    "an unknown dtype": ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8),
                         r"tensor 'a' has dtype 'F33', which this reader does not know"),
}


@pytest.mark.parametrize("kind", list(_BAD_FILES))
def test_invalid_safetensors_layout_is_refused_by_the_library_and_named(kind, tmp_path):
    header, data, detail = _BAD_FILES[kind]
    path = _hand_made(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(safetensors.SafetensorError):  # the library refuses it ...
        safetensors.safe_open(path, framework="numpy")
    with pytest.raises(st.SafetensorsError,  # ... and so do we, naming the file and the fault
                       match=rf"{path} is not a valid safetensors file \(the safetensors library "
                             rf"refuses it: .*\): {detail}.*; the file is truncated or damaged"):
        st.SafetensorsFile(path)


def test_truncated_and_garbage_files_are_refused_with_our_error(tmp_path):
    good = _hand_made(tmp_path / "good.safetensors", {"a": _f32([0, 8]), "b": _f32([8, 16])},
                      np.arange(4, dtype=np.float32).tobytes())
    np.testing.assert_array_equal(st.SafetensorsFile(good).read("b"), [2.0, 3.0])
    data = pathlib.Path(good).read_bytes()
    cases = {
        "truncated": (data[:-3], r"tensor 'b': data_offsets \[8, 16\] run past the end of the 13-byte data section"),
        "cut in the header": (data[:20], r"header length of \d+ bytes but the file holds 20 bytes"),
        "shorter than 8 bytes": (data[:5], r"the file is 5 bytes long, too short for a safetensors file"),
        "empty": (b"", r"the file is 0 bytes long"),
        "garbage header": ((24).to_bytes(8, "little") + b"this is not JSON at all!" + bytes(8),
                           r"invalid JSON in header.*the header is not UTF-8 JSON"),
        "not UTF-8": ((8).to_bytes(8, "little") + b'{"\xff":1} ' + bytes(8), r"invalid UTF-8 in header"),
        "a JSON list": ((8).to_bytes(8, "little") + b"[1, 2] " + b" ", r"the header is a JSON list"),
        "a huge header length": ((2**40).to_bytes(8, "little") + b"{}      ", r"header too large"),
        "pickle bytes": (b"\x80\x04\x95" + bytes(40), r"invalid header length\): its first 8 bytes give a header length of 9766016 bytes but the file holds 43 bytes"),
    }
    for kind, (content, message) in cases.items():
        path = tmp_path / f"{kind}.safetensors"
        path.write_bytes(content)
        with pytest.raises(st.SafetensorsError, match=rf"{path} is not a valid safetensors file .*{message}"):
            st.SafetensorsFile(str(path))
    with pytest.raises(st.SafetensorsError, match=r"cannot read .*nothing.safetensors: No such file"):
        st.SafetensorsFile(str(tmp_path / "nothing.safetensors"))


def test_overlapping_tensor_in_a_checkpoint_is_refused_not_misread(tmp_path):
    """A checkpoint whose ffn_norm entry points at attn_norm's bytes (same dtype and shape): the
    old reader returned attn_norm's values for it; now the load is refused, naming both."""
    folder = _copy("yarn_mtp_fp32", tmp_path)
    path = folder / "model.safetensors"
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    assert header[a]["shape"] == header[b]["shape"] and header[a]["dtype"] == header[b]["dtype"]
    header[b]["data_offsets"] = header[a]["data_offsets"]
    _hand_made(path, header, data[8 + n:])
    with pytest.raises(HFCheckpointError, match=rf"{path} is not a valid safetensors file .*"
                                                rf"tensors '{a}' .* and '{b}' .* overlap"):
        load_hf_checkpoint(folder)


def test_duplicate_tensor_names_are_refused(tmp_path):
    raw = b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}'
    raw += b" " * (-len(raw) % 8)
    path = tmp_path / "dup.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    with pytest.raises(st.SafetensorsError, match=r"names tensor 'a' twice"):
        st.SafetensorsFile(str(path))


def _values(code: str, shape, rng) -> np.ndarray:
    dtype = st.DTYPES[code]
    if code == "BOOL":
        return rng.random(shape) > 0.5
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, shape, dtype=dtype, endpoint=True)
    return (rng.standard_normal(shape) * 10).astype(dtype)


def test_every_dtype_we_write_is_read_back_by_the_library(tmp_path):
    """st.save_file (the streaming writer) -> safetensors.safe_open: the same names, dtypes, shapes
    and bytes; and our reader, rows included, returns the same bytes."""
    rng = np.random.default_rng(0)
    tensors = {f"t_{code}": _values(code, (5, 3), rng) for code in st.DTYPES}
    tensors["scalar"] = np.float32(1.5).reshape(())
    tensors["empty"] = np.zeros((0, 4), ml_dtypes.bfloat16)
    path = str(tmp_path / "all.safetensors")
    st.save_file(tensors, path, {"format": "pt"})
    ours = st.SafetensorsFile(path)
    with safetensors.safe_open(path, framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}
        assert sorted(f.keys()) == sorted(tensors)
        for name, want in tensors.items():
            code = st.dtype_code(want.dtype)
            assert f.get_slice(name).get_dtype() == code, name
            assert tuple(f.get_slice(name).get_shape()) == want.shape, name
            got = ours.read(name)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), name
            if not code.startswith("F8_"):  # the library's numpy path cannot build float8 arrays
                theirs = f.get_tensor(name)
                assert theirs.dtype == want.dtype and theirs.tobytes() == want.tobytes(), name
    assert {k: v[2] for k, v in _raw_tensors(tmp_path).items()} == {k: v.tobytes() for k, v in tensors.items()}
    rows = ours.read("t_F8_E4M3", rows=slice(1, 3))
    assert rows.tobytes() == tensors["t_F8_E4M3"][1:3].tobytes()
    root = rows
    while not isinstance(root, np.memmap):
        root = root.base
    assert root.nbytes == 2 * 3  # only the two rows asked for are mapped


def test_library_cannot_return_float8_with_numpy():
    """The measurement behind dsv3_jax/convert/safetensors.py reading tensors itself: with the
    pinned safetensors, framework="numpy" cannot build F8_E4M3 arrays. If this starts failing,
    the library can read FP8 now: reconsider reading through it."""
    path = str(FIXTURES / "fp8" / "model.safetensors")
    name = "model.layers.0.self_attn.o_proj.weight"
    with safetensors.safe_open(path, framework="numpy") as f:
        assert f.get_slice(name).get_dtype() == "F8_E4M3"
        with pytest.raises(AttributeError, match="float8_e4m3fn"):
            f.get_tensor(name)
        with pytest.raises(AttributeError, match="float8_e4m3fn"):
            f.get_slice(name)[0:1]


# ------------------------------------------------------------------------------------ bad inputs

def test_missing_shard_is_named(tmp_path):
    folder = _copy("noq_dense_bf16", tmp_path)
    (folder / "model-00003-of-00007.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match=r"names shard file model-00003-of-00007.safetensors "
                                                r"\(holding \d+ tensors, e.g. 'model.layers.*does not exist"):
        load_hf_checkpoint(folder)


def test_index_naming_a_missing_file_or_tensor(tmp_path):
    folder = _copy("noq_dense_bf16", tmp_path)
    index_path = folder / convert.INDEX_FILE
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-00009-of-00009.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(HFCheckpointError, match=r"names shard file model-00009-of-00009.safetensors "
                                                r"\(holding 1 tensors, e.g. 'model.norm.weight'\), which does not exist"):
        load_hf_checkpoint(folder)
    index["weight_map"]["model.norm.weight"] = "model-00001-of-00007.safetensors"
    index_path.write_text(json.dumps(index))
    first = _raw_tensors(folder).get("model.norm.weight")
    assert first is not None
    with pytest.raises(HFCheckpointError, match=r"maps tensor 'model.norm.weight' to "
                                                r"model-00001-of-00007.safetensors, but that file holds no such tensor"):
        load_hf_checkpoint(folder)


def _rewrite_single_file(folder, change):
    path = folder / "model.safetensors"
    tensors = st.read_file(str(path))
    change(tensors)
    path.unlink()
    st.save_file(tensors, str(path), {"format": "pt"})


def test_tensor_of_the_wrong_shape_is_named(tmp_path):
    folder = _copy("yarn_mtp_fp32", tmp_path)
    name = "model.layers.1.self_attn.kv_b_proj.weight"
    _rewrite_single_file(folder, lambda t: t.__setitem__(name, np.ascontiguousarray(t[name].T)))
    with pytest.raises(HFCheckpointError, match=rf"tensor '{name}' in model.safetensors has shape "
                                                r"\[32, 128\]; expected \[128, 32\] for moe_layers/layers/attn/wkv_b/kernel"):
        load_hf_checkpoint(folder)


def test_tensor_of_the_wrong_dtype_is_named(tmp_path):
    folder = _copy("yarn_mtp_fp32", tmp_path)
    name = "model.layers.0.input_layernorm.weight"
    _rewrite_single_file(folder, lambda t: t.__setitem__(name, t[name].astype(np.int32)))
    with pytest.raises(HFCheckpointError, match=rf"tensor '{name}' in model.safetensors has dtype I32; "
                                                r"expected a floating-point dtype"):
        load_hf_checkpoint(folder)


def test_fp8_weight_without_its_scale_is_named(tmp_path):
    folder = _copy("fp8", tmp_path)
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    _rewrite_single_file(folder, lambda t: t.pop(name))
    with pytest.raises(HFCheckpointError, match=r"'model.layers.0.self_attn.o_proj.weight' in "
                                                r"model.safetensors is F8_E4M3 but the checkpoint has no "
                                                r"'model.layers.0.self_attn.o_proj.weight_scale_inv'"):
        load_hf_checkpoint(folder)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    folder = _copy("yarn_mtp_fp32", tmp_path)
    _rewrite_single_file(folder, lambda t: t.pop("model.layers.2.mlp.experts.7.up_proj.weight"))
    with pytest.raises(HFCheckpointError, match=r"lacks 1 tensor\(s\).*'model.layers.2.mlp.experts.7.up_proj.weight'"):
        load_hf_checkpoint(folder)
    folder = _copy("yarn_mtp_fp32", tmp_path / "b")
    _rewrite_single_file(folder, lambda t: t.__setitem__("model.layers.9.foo.weight", np.ones(3, np.float32)))
    with pytest.raises(HFCheckpointError, match=r"holds 1 tensor\(s\) that .*config.json does not "
                                                r"account for, e.g. \['model.layers.9.foo.weight'\] \(in model.safetensors\)"):
        load_hf_checkpoint(folder)


def test_mtp_copy_that_differs_is_refused(tmp_path):
    folder = _copy("yarn_mtp_fp32", tmp_path)
    name = "model.layers.3.embed_tokens.weight"
    _rewrite_single_file(folder, lambda t: t.__setitem__(name, t[name] * 2))
    with pytest.raises(HFCheckpointError, match=rf"'{name}' \(model.safetensors\) differs from "
                                                r"'model.embed_tokens.weight'.*share the main embedding"):
        load_hf_checkpoint(folder)


def test_config_without_mtp_weights_loads_without_mtp(tmp_path):
    folder = _copy("noq_dense_bf16", tmp_path)
    _edit_config(folder, num_nextn_predict_layers=1)
    cfg, params = load_hf_checkpoint(folder)
    assert cfg.mtp_depth == 0 and "mtp_0" not in params


def test_bad_config_file_is_refused_with_the_file_named(tmp_path):
    folder = _copy("fp8", tmp_path)
    _edit_config(folder, quantization_config={"quant_method": "gptq", "bits": 4})
    with pytest.raises(HFCheckpointError, match=rf"{folder / 'config.json'}: quantization_config."
                                                r"quant_method='gptq' is not supported"):
        load_hf_checkpoint(folder)
    _edit_config(folder, quantization_config=_DELETE)
    with pytest.raises(HFCheckpointError, match=r"is F8_E4M3 but .*config.json has no quantization_config"):
        load_hf_checkpoint(folder)
    _edit_config(folder, quantization_config=json.loads((FIXTURES / "fp8" / "config.json").read_text())["quantization_config"],
                 hidden_act="relu")
    with pytest.raises(HFCheckpointError, match=rf"{folder / 'config.json'}: hidden_act='relu' is not supported"):
        load_hf_checkpoint(folder)


def test_pickle_checkpoint_is_refused(tmp_path):
    folder = tmp_path / "pickle"
    folder.mkdir()
    shutil.copy(FIXTURES / "fp8" / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(HFCheckpointError, match=r"holds pytorch_model.bin, a pickle checkpoint: only "
                                                r"safetensors are read"):
        load_hf_checkpoint(folder)


@pytest.mark.parametrize("kind", ["missing", "file", "empty folder", "truncated", "sharded without index"])
def test_path_that_is_not_a_checkpoint(kind, tmp_path):
    path = tmp_path / "x"
    if kind == "missing":
        message = r"does not exist; pass a Hugging Face checkpoint folder"
    elif kind == "file":
        path.write_text("{}")
        message = r"is a file; pass the folder that holds config.json"
    elif kind == "empty folder":
        path.mkdir()
        message = r"is not a Hugging Face checkpoint: it has no config.json"
    elif kind == "truncated":
        path = _copy("fp8", tmp_path)
        data = (path / "model.safetensors").read_bytes()
        (path / "model.safetensors").write_bytes(data[:len(data) // 2])
        message = (r"model.safetensors is not a valid safetensors file \(the safetensors library refuses "
                   r"it: .*\): tensor '.*': data_offsets .* run past the end of the \d+-byte data "
                   r"section; the file is truncated or damaged")
    else:
        path = _copy("noq_dense_bf16", tmp_path)
        (path / convert.INDEX_FILE).unlink()
        message = r"holds \['model-00001-of-00007.safetensors'.* but neither model.safetensors nor model.safetensors.index.json"
    with pytest.raises(HFCheckpointError, match=message):
        load_hf_checkpoint(path)


def test_save_refuses_an_existing_checkpoint_and_mismatched_params(tmp_path):
    params = init_params(TINY32)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    with pytest.raises(HFCheckpointError, match=r"already exists and is not an empty folder"):
        save_hf_checkpoint(tmp_path / "full", TINY32, params)
    with pytest.raises(HFCheckpointError, match=r"params do not match DeepSeekV3\(cfg\): unexpected \['mtp_0/"):
        save_hf_checkpoint(tmp_path / "new", TINY32.replace(mtp_depth=0), params)
    assert not (tmp_path / "new").exists()
