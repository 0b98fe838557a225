"""ModelConfig: the architecture of one DeepSeek-V3-family model, with the reference code's names.

Field names follow DeepSeek's `inference/model.py` (`ModelArgs`); the presets reproduce the official
`config_671B.json` and `config_16B.json` (SPEC.md section 1). The config is a frozen dataclass that
validates itself on construction: every refusal names the field, the value and the fix.

Derived quantities (`qk_head_dim`, `use_yarn`, `softmax_scale`, ...) are properties, so a config never
holds two numbers that could disagree.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

_DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
SCORE_FUNCS = ("sigmoid", "softmax")


class ConfigError(ValueError):
    """A ModelConfig field holds a value the model cannot be built with."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a DeepSeek-V3-family model (SPEC.md section 1).

    Shapes use: D = dim, H = n_heads, C = kv_lora_rank, R = qk_rope_head_dim,
    E = n_routed_experts, K = n_activated_experts.
    """

    # Sizes.
    vocab_size: int = 8192
    dim: int = 128
    inter_dim: int = 384  # hidden width of the dense MLPs (the first n_dense_layers)
    moe_inter_dim: int = 64  # hidden width of each routed / shared expert
    n_layers: int = 3
    n_dense_layers: int = 1
    n_heads: int = 4
    # Mixture of experts.
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2
    n_expert_groups: int = 4
    n_limited_groups: int = 2
    score_func: str = "sigmoid"
    # Expert-parallel exchange: each device sends at most ceil(moe_capacity_factor x its pairs /
    # expert-axis size) token-expert pairs to each peer; pairs past that are dropped (counted as
    # moe_dropped_fraction). 0: dropless (buffers sized for any routing, expert-axis x larger).
    # Default 2: the tiny model on 8 devices, its biases settled, drops 0.7% of its pairs at 2
    # and 6.3% at 1.25 (256 tokens per device: far noisier loads than V3's 4096); at V3 scale 2
    # costs 12 GiB per device, dropless 330 (experiments/RESULTS.md, "MoE exchange capacity").
    moe_capacity_factor: float = 2.0
    route_scale: float = 2.5
    # Sigmoid routers: divide the K chosen gate values by their sum before route_scale (V3: True;
    # transformers' DeepseekV3 `norm_topk_prob`). Softmax routers never renormalise, whatever this
    # says (DeepSeek-V2 / the 16B preset, as DeepSeek's reference code).
    norm_topk_prob: bool = True
    # Multi-head latent attention.
    q_lora_rank: int = 96  # 0: no query compression (q = wq(x))
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # RoPE and YaRN (SPEC.md section 2).
    max_seq_len: int = 512
    original_seq_len: int = 4096
    rope_theta: float = 10000.0
    rope_factor: float = 40.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    # Multi-token prediction.
    mtp_depth: int = 1
    # Numerics and implementation.
    norm_eps: float = 1e-6
    dtype: str = "bfloat16"  # compute dtype of activations and matmul inputs
    param_dtype: str = "float32"  # master weights
    init_std: float = 0.006
    scan_layers: bool = True  # nn.scan over each stack: compile time independent of depth
    remat_policy: str = "none"  # one of REMAT_POLICIES
    fp8: bool = False  # FP8 block-scaled GEMMs in the Linear layers (SPEC.md section 3, ops/fp8.py)

    def __post_init__(self):
        def refuse(field, why, fix):
            raise ConfigError(
                f"ModelConfig.{field}={getattr(self, field)!r} is invalid: {why}; {fix}.")

        counts = ("n_dense_layers", "n_shared_experts", "q_lora_rank", "mtp_depth")  # 0 allowed
        for field in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
                      "n_routed_experts", "n_activated_experts", "n_expert_groups",
                      "n_limited_groups", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                      "v_head_dim", "max_seq_len", "original_seq_len") + counts:
            value, low = getattr(self, field), (0 if field in counts else 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                kind = "non-negative" if field in counts else "positive"
                refuse(field, f"must be a {kind} integer", f"set {field} to an integer >= {low}")
        if self.n_dense_layers > self.n_layers:
            refuse("n_dense_layers", f"exceeds n_layers={self.n_layers}",
                   f"set n_dense_layers <= {self.n_layers}")
        if self.n_activated_experts > self.n_routed_experts:
            refuse("n_activated_experts", f"exceeds n_routed_experts={self.n_routed_experts}",
                   f"set n_activated_experts <= {self.n_routed_experts}")
        if self.n_routed_experts % self.n_expert_groups:
            refuse("n_expert_groups", f"does not divide n_routed_experts={self.n_routed_experts}",
                   "use a divisor of n_routed_experts (1 disables group-limited routing)")
        if self.n_limited_groups > self.n_expert_groups:
            refuse("n_limited_groups", f"exceeds n_expert_groups={self.n_expert_groups}",
                   f"set n_limited_groups between 1 and {self.n_expert_groups}")
        per_group = self.n_routed_experts // self.n_expert_groups
        if self.n_activated_experts > self.n_limited_groups * per_group:
            refuse("n_activated_experts", f"the {self.n_limited_groups} kept group(s) hold only "
                   f"{self.n_limited_groups * per_group} experts",
                   "raise n_limited_groups or lower n_activated_experts")
        if self.n_expert_groups > 1 and self.score_func == "sigmoid" and per_group < 2:
            refuse("n_expert_groups",
                   "biased group scores sum the top-2 experts of each group, but groups hold 1 expert",
                   "use at most n_routed_experts // 2 groups")
        if self.score_func not in SCORE_FUNCS:
            refuse("score_func", f"must be one of {SCORE_FUNCS}", 'use "sigmoid" (V3) or "softmax" (V2)')
        if (not isinstance(self.moe_capacity_factor, (int, float))
                or isinstance(self.moe_capacity_factor, bool)
                or not (self.moe_capacity_factor == 0 or 1 <= self.moe_capacity_factor < 1e6)):
            refuse("moe_capacity_factor", "must be 0 (dropless) or a number >= 1 (each peer's "
                   "exchange buffer, in multiples of an even split of the pairs)",
                   "use 0 or e.g. 1.25")
        if not self.route_scale > 0:
            refuse("route_scale", "must be positive", "use 1.0 unless a preset says otherwise")
        if self.qk_rope_head_dim % 2:
            refuse("qk_rope_head_dim", "interleaved RoPE rotates pairs of dimensions",
                   "use an even number")
        if not self.rope_theta > 1:
            refuse("rope_theta", "must be greater than 1", "use 10000.0")
        if not self.rope_factor >= 1:
            refuse("rope_factor", "YaRN stretches wavelengths by a factor >= 1", "use 40.0 or 1.0")
        if not self.beta_fast > self.beta_slow > 0:
            refuse("beta_fast", f"YaRN needs beta_fast > beta_slow={self.beta_slow} > 0",
                   "use beta_fast=32, beta_slow=1")
        for field, fix in (("mscale", "use 1.0 (V3) or 0.707 (V2-Lite)"), ("norm_eps", "use 1e-6"),
                           ("init_std", "use 0.006")):
            if not getattr(self, field) > 0:
                refuse(field, "must be positive", fix)
        for field in ("dtype", "param_dtype"):
            if getattr(self, field) not in _DTYPES:
                refuse(field, f"must be one of {_DTYPES}", 'use "bfloat16" or "float32"')
        if self.remat_policy not in REMAT_POLICIES:
            refuse("remat_policy", f"must be one of {REMAT_POLICIES}", 'use "none" or "full"')
        if not isinstance(self.norm_topk_prob, bool):
            refuse("norm_topk_prob", "must be a bool",
                   "use True (renormalise the chosen sigmoid gate values, V3) or False")
        if not isinstance(self.fp8, bool):
            refuse("fp8", "must be a bool", "use True (FP8 linear layers) or False (compute dtype)")

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def n_moe_layers(self) -> int:
        return self.n_layers - self.n_dense_layers

    @property
    def use_yarn(self) -> bool:
        """YaRN applies only when the context exceeds the pre-training length (reference code)."""
        return self.max_seq_len > self.original_seq_len

    @property
    def yarn_attention_factor(self) -> float:
        """YaRN's sqrt(t) = 0.1 mscale ln(rope_factor) + 1 (SPEC.md section 2); softmax_scale
        applies it squared when YaRN is on."""
        return 0.1 * self.mscale * math.log(self.rope_factor) + 1.0

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times mscale^2 under YaRN (SPEC.md section 2)."""
        scale = self.qk_head_dim ** -0.5
        if self.use_yarn:
            m = self.yarn_attention_factor
            scale *= m * m
        return scale

    @property
    def has_score_correction_bias(self) -> bool:
        """Sigmoid routers are the aux-loss-free ones and carry `e_score_correction_bias`."""
        return self.score_func == "sigmoid"

    def replace(self, **changes: Any) -> "ModelConfig":
        """A copy with some fields changed (validated again)."""
        names = [f.name for f in dataclasses.fields(self)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise ConfigError(f"ModelConfig has no field(s) {unknown}; known fields: {names}.")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_PRESETS: dict[str, dict[str, Any]] = {
    # DeepSeek-V3 / R1 (official config_671B.json; HF max_position_embeddings 163840).
    "deepseek-v3-671b": dict(
        vocab_size=129280, dim=7168, inter_dim=18432, moe_inter_dim=2048, n_layers=61,
        n_dense_layers=3, n_heads=128, n_routed_experts=256, n_shared_experts=1,
        n_activated_experts=8, n_expert_groups=8, n_limited_groups=4, score_func="sigmoid",
        route_scale=2.5, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840, original_seq_len=4096,
        rope_theta=10000.0, rope_factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=1.0,
        mtp_depth=1),
    # Official config_16B.json (V2-Lite-like: softmax routing, no q compression, no MTP).
    "deepseek-v3-16b": dict(
        vocab_size=102400, dim=2048, inter_dim=10944, moe_inter_dim=1408, n_layers=27,
        n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=2,
        n_activated_experts=6, n_expert_groups=1, n_limited_groups=1, score_func="softmax",
        route_scale=1.0, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_seq_len=163840, original_seq_len=4096,
        rope_theta=10000.0, rope_factor=40.0, beta_fast=32.0, beta_slow=1.0, mscale=0.707,
        mtp_depth=0),
    # About 1B total / 0.26B active: fills one GPU for benchmarks; DeepSeek-V3's head dims and
    # latent width, so its kernels see the production shapes.
    "small": dict(
        vocab_size=32768, dim=1024, inter_dim=4096, moe_inter_dim=512, n_layers=10,
        n_dense_layers=1, n_heads=16, n_routed_experts=64, n_shared_experts=1,
        n_activated_experts=6, n_expert_groups=8, n_limited_groups=4, score_func="sigmoid",
        route_scale=2.5, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128, max_seq_len=4096, mtp_depth=1),
    # CPU tests and the default training run: every feature at toy size.
    "tiny": dict(),
}

PRESET_NAMES = tuple(_PRESETS)


def get_model_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name` ("tiny", "small", "deepseek-v3-16b", "deepseek-v3-671b"), with overrides."""
    if name not in _PRESETS:
        raise ConfigError(f"unknown model preset {name!r}; choose one of {list(_PRESETS)}.")
    return ModelConfig(**_PRESETS[name]).replace(**overrides)
