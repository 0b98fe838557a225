"""ModelConfig: presets hold the official values; bad values are refused with the field, the value
and a fix in the message."""

from __future__ import annotations

import pytest

import dsv3_jax as ds
from dsv3_jax.config import ConfigError


def test_671b_preset_is_the_official_config():
    c = ds.get_model_config("deepseek-v3-671b")
    assert (c.vocab_size, c.dim, c.inter_dim, c.moe_inter_dim) == (129280, 7168, 18432, 2048)
    assert (c.n_layers, c.n_dense_layers, c.n_heads) == (61, 3, 128)
    assert (c.n_routed_experts, c.n_shared_experts, c.n_activated_experts) == (256, 1, 8)
    assert (c.n_expert_groups, c.n_limited_groups, c.score_func, c.route_scale) == (8, 4, "sigmoid", 2.5)
    assert (c.q_lora_rank, c.kv_lora_rank) == (1536, 512)
    assert (c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (128, 64, 128)
    assert (c.rope_theta, c.original_seq_len, c.rope_factor) == (10000.0, 4096, 40.0)
    assert (c.beta_fast, c.beta_slow, c.mscale, c.mtp_depth, c.norm_eps) == (32, 1, 1.0, 1, 1e-6)
    assert c.use_yarn and c.has_score_correction_bias and c.norm_topk_prob is True
    assert (c.dtype, c.param_dtype) == ("bfloat16", "float32")


def test_16b_preset_is_the_official_config():
    c = ds.get_model_config("deepseek-v3-16b")
    assert (c.vocab_size, c.dim, c.inter_dim, c.moe_inter_dim) == (102400, 2048, 10944, 1408)
    assert (c.n_layers, c.n_dense_layers, c.n_heads) == (27, 1, 16)
    assert (c.n_routed_experts, c.n_shared_experts, c.n_activated_experts) == (64, 2, 6)
    assert (c.n_expert_groups, c.n_limited_groups, c.score_func, c.route_scale) == (1, 1, "softmax", 1.0)
    assert (c.q_lora_rank, c.kv_lora_rank, c.mscale, c.mtp_depth) == (0, 512, 0.707, 0)
    assert not c.has_score_correction_bias


def test_tiny_preset_exercises_every_feature():
    c = ds.get_model_config("tiny")
    assert 0 < c.n_dense_layers < c.n_layers
    assert c.n_routed_experts >= 8 and c.n_expert_groups >= 2 and c.n_limited_groups < c.n_expert_groups
    assert c.mtp_depth == 1 and c.q_lora_rank > 0 and c.n_shared_experts >= 1


def test_overrides_and_unknown_names():
    assert ds.get_model_config("tiny", n_layers=5).n_layers == 5
    with pytest.raises(ConfigError, match="unknown model preset 'huge'.*tiny"):
        ds.get_model_config("huge")
    with pytest.raises(ConfigError, match=r"no field\(s\) \['n_layer'\]"):
        ds.get_model_config("tiny", n_layer=5)


@pytest.mark.parametrize("overrides, message", [
    (dict(dim=0), r"ModelConfig.dim=0 is invalid: must be a positive integer; set dim"),
    (dict(n_heads=2.5), r"ModelConfig.n_heads=2.5 is invalid"),
    (dict(n_layers=True), r"ModelConfig.n_layers=True is invalid"),
    (dict(q_lora_rank=-1), r"ModelConfig.q_lora_rank=-1 is invalid: must be a non-negative"),
    (dict(n_dense_layers=4), r"ModelConfig.n_dense_layers=4 is invalid: exceeds n_layers=3"),
    (dict(n_activated_experts=9), r"n_activated_experts=9 is invalid: exceeds n_routed_experts=8"),
    (dict(n_expert_groups=3), r"n_expert_groups=3 is invalid: does not divide n_routed_experts=8"),
    (dict(n_limited_groups=5), r"n_limited_groups=5 is invalid: exceeds n_expert_groups=4"),
    (dict(n_limited_groups=1, n_activated_experts=3),
     r"n_activated_experts=3 is invalid: the 1 kept group\(s\) hold only 2 experts"),
    (dict(n_expert_groups=8, n_limited_groups=4), r"n_expert_groups=8 is invalid: biased group scores"),
    (dict(score_func="relu"), r"score_func='relu' is invalid: must be one of \('sigmoid', 'softmax'\)"),
    (dict(route_scale=0.0), r"route_scale=0.0 is invalid: must be positive"),
    (dict(qk_rope_head_dim=15), r"qk_rope_head_dim=15 is invalid: interleaved RoPE rotates pairs"),
    (dict(rope_theta=1.0), r"rope_theta=1.0 is invalid"),
    (dict(rope_factor=0.5), r"rope_factor=0.5 is invalid"),
    (dict(beta_fast=0.5), r"beta_fast=0.5 is invalid: YaRN needs beta_fast > beta_slow=1.0 > 0"),
    (dict(mscale=0.0), r"mscale=0.0 is invalid"),
    (dict(norm_eps=0.0), r"norm_eps=0.0 is invalid"),
    (dict(init_std=-1.0), r"init_std=-1.0 is invalid"),
    (dict(dtype="fp8"), r"dtype='fp8' is invalid: must be one of"),
    (dict(param_dtype="int8"), r"param_dtype='int8' is invalid"),
    (dict(remat_policy="some"), r"remat_policy='some' is invalid: must be one of"),
    (dict(mtp_depth=-1), r"mtp_depth=-1 is invalid"),
    (dict(max_seq_len=0), r"max_seq_len=0 is invalid"),
    (dict(norm_topk_prob=1), r"norm_topk_prob=1 is invalid: must be a bool; use True"),
    (dict(norm_topk_prob="false"), r"norm_topk_prob='false' is invalid: must be a bool"),
])
def test_bad_config_is_refused_with_its_message(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ds.get_model_config("tiny", **overrides)


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


def test_field_annotations_are_plain_scalar_types():
    """The run config builds its model section from these annotations ({int, float, str, bool})."""
    import dataclasses

    types = {f.name: f.type for f in dataclasses.fields(ds.ModelConfig)}
    assert set(types.values()) <= {"int", "float", "str", "bool"}, types
    assert types["norm_topk_prob"] == "bool" and ds.ModelConfig().norm_topk_prob is True
    assert ds.ModelConfig(norm_topk_prob=False).to_dict()["norm_topk_prob"] is False
