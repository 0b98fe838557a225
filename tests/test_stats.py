"""model_stats against the paper's counts and a formula written from the SPEC's dimensions."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
import pytest

import dsv3_jax as ds
from dsv3_jax.model.stats import presets_table
from dsv3_jax.model.tree import abstract_params

from conftest import TINY32


def _formula_params(c):
    """(main total, active, MTP) from the config alone (SPEC.md section 2 shapes)."""
    h, d = c.n_heads, c.dim
    q = (d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * c.qk_head_dim
         if c.q_lora_rank else d * h * c.qk_head_dim)
    attn = (q + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
            + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim) + h * c.v_head_dim * d)
    expert = 3 * d * c.moe_inter_dim
    router = d * c.n_routed_experts + (c.n_routed_experts if c.has_score_correction_bias else 0)
    moe_all = router + (c.n_routed_experts + c.n_shared_experts) * expert
    moe_active = router + (c.n_activated_experts + c.n_shared_experts) * expert
    dense = 3 * d * c.inter_dim
    norms = 2 * d
    total = (2 * c.vocab_size * d + d + c.n_layers * (attn + norms)
             + c.n_dense_layers * dense + c.n_moe_layers * moe_all)
    active = (2 * c.vocab_size * d + d + c.n_layers * (attn + norms)
              + c.n_dense_layers * dense + c.n_moe_layers * moe_active)
    mtp = c.mtp_depth * (attn + norms + moe_all + 2 * d * d + 3 * d)
    return total, active, mtp


def test_671b_counts():
    cfg = ds.get_model_config("deepseek-v3-671b")
    st = ds.model_stats(cfg, seq_len=4096)
    total, active, mtp = _formula_params(cfg)
    assert (st.total_params, st.active_params, st.mtp_params) == (total, active, mtp)
    assert 670.5e9 < st.total_params < 671.5e9  # paper: 671B
    assert 37.0e9 < st.active_params < 38.0e9  # paper: 37B
    assert 11.5e9 < st.mtp_params < 11.7e9  # about 11.6B
    assert st.kv_cache_bytes_per_token == 61 * 576 * 2 == 70272
    # 6 x active matmul params + attention, from the config alone (main model only here).
    matmul = active - 129280 * 7168 - 61 * (2 * 7168 + 1536 + 512) - 7168 - 58 * 256
    attn = 3 * 2 * 61 * 128 * (192 + 128) * (4096 + 1) / 2
    main = 3 * 2 * matmul + attn
    mtp_matmul = mtp - (2 * 7168 + 1536 + 512) - 3 * 7168 - 256 - 256 * 3 * 7168 * 2048 * (1 - 8 / 256)
    extra = 3 * (2 * mtp_matmul + 2 * 7168 * 129280 + 2 * 128 * 320 * 4097 / 2)
    assert st.train_flops_per_token == pytest.approx(main + extra, rel=1e-9)
    assert 240e9 < main < 260e9  # DeepSeek quotes ~250 GFLOPs per token for V3 training


@pytest.mark.parametrize("name", ["deepseek-v3-16b", "small", "tiny"])
def test_other_presets_match_the_formula(name):
    cfg = ds.get_model_config(name)
    st = ds.model_stats(cfg)
    assert (st.total_params, st.active_params, st.mtp_params) == _formula_params(cfg)


def test_small_preset_size():
    st = ds.model_stats(ds.get_model_config("small"))
    assert 0.9e9 < st.total_params < 1.2e9 and 0.2e9 < st.active_params < 0.3e9


def test_counts_equal_the_initialised_tree():
    shapes = abstract_params(TINY32)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    st = ds.model_stats(TINY32)
    assert st.total_params + st.mtp_params == n


def test_bad_seq_len():
    with pytest.raises(ValueError, match="seq_len=0"):
        ds.model_stats(TINY32, seq_len=0)


def test_readme_table_is_what_the_code_computes():
    readme = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    assert presets_table() in readme, "README presets table is stale: paste `python -m dsv3_jax.model.stats`"
