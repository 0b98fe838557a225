"""Every Mosaic GPU kernel of dsv3_jax/ops/pallas at the DeepSeek-V3 and small-config dims, as
targets for `mosaic_ptxas_check.py` (shipped outside the repository: Pallas -> PTX -> ptxas on a
machine with no GPU; registers, spills, shared memory per kernel):

  python mosaic_ptxas_check.py --fn experiments.kernel_targets:make              # all of them
  python mosaic_ptxas_check.py --fn experiments.kernel_targets:make_v3           # V3 dims only
  KERNEL_TARGETS='mla_bwd*,mla_decode*' python mosaic_ptxas_check.py \
      --fn experiments.kernel_targets:make

(The tool's positional target names select its own built-in targets only; with --fn, select here:
`make_v3` / `make_small`, or KERNEL_TARGETS, comma-separated fnmatch patterns of target names.)

`targets(preset)` returns `Target`s: the name, the kernel entry point it calls (`kernel`, one of
the public functions of the *_sm90.py modules), a function of ShapeDtypeStructs `args`. One target
may give several Mosaic kernels (the attention backward: forward, dq, dk-dv). The dims come from
the model presets (`dsv3_jax.get_model_config`): "deepseek-v3-671b" (suffix `_v3`) and "small"
(`_small`). Letters: dsv3_jax/NOTATION.md.

  fp8_gemm_{tag}         fprop of a dense-MLP w1 x [U, D] . w1 [F, D]^T (bf16 out, 128x128 b scales)
  fp8_gemm_dgrad_{tag}   Dgrad dy [U, F] . w1 [D, F]^T -> dx [U, D] (bf16 out, 128x128 b scales)
  fp8_gemm_wgrad_{tag}   Wgrad x^T [D, U] . dy^T [F, U]^T -> dw [D, F] (f32 out, per-row b scales)
  gmm_w1_{tag}           the routed experts' w1 / w3: x [M, D] @ w [E_loc, D, F]
  gmm_w1_dx_{tag}        its dx: dy [M, F] @ w[e]^T (transpose_rhs)
  gmm_w2_{tag}, gmm_w2_dx_{tag}   the same for w2 [E_loc, F, D]
  tgmm_w1_{tag}, tgmm_w2_{tag}    dw in bf16 (the weights' dtype); tgmm_*_f32_{tag} in f32
  mla_fwd_{tag}, mla_fwd_noseg_{tag}    flash attention forward, with / without segment ids
  mla_bwd_{tag}, mla_bwd_noseg_{tag}    forward + backward: #0 forward, #1 dq, #2 dk-dv
  mla_decode_b64_s4k_{tag}, mla_decode_b8_s32k_{tag}    latent decode, one token per sequence

Token counts are not in the presets: U = 4096 tokens per device; grouped matmuls take M = 4096
rows (token-expert pairs) over E_loc = 8 experts for V3 (256 experts over an expert axis of 32)
and all 64 for the small config (one device); attention T = 4096, B = 1. Registers and spills
depend mostly on the tiles, but also on loop trip counts LLVM sees (the FP8 GEMM's TMA warpgroup
once spilled at I = 1024 and not at 7168), so the targets use each config's real dims.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import os
from typing import Callable

import jax
import jax.numpy as jnp

import dsv3_jax as ds

PRESETS = {"v3": "deepseek-v3-671b", "small": "small"}  # target-name suffix -> model preset
TOKENS = 4096  # U: tokens per device in a step (fp8 GEMMs), and T of the attention targets
GMM_ROWS = 4096  # M: token-expert pairs on one device
LOCAL_EXPERTS = {"v3": 8, "small": 64}  # E_loc: V3's 256 over an expert axis of 32; small: all
DECODE_SHAPES = ((64, 4096), (8, 32768))  # (B, S): one new token per sequence
ENV_FILTER = "KERNEL_TARGETS"  # comma-separated fnmatch patterns of target names (make's filter)


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    kernel: Callable  # the *_sm90 entry point the target calls
    fn: Callable  # fn(*args) runs the kernel(s); differentiated targets include the backward
    args: tuple  # jax.ShapeDtypeStruct per argument of fn
    dims: dict  # the preset's dims used, for reports


def _s(shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(tuple(shape), dtype)


def _fp8_targets(tag, cfg):
    from dsv3_jax.ops.pallas import fp8_gemm_sm90 as k

    e4m3, f32, u, d, f = jnp.float8_e4m3fn, jnp.float32, TOKENS, cfg.dim, cfg.inter_dim
    cdiv = lambda a: -(-a // 128)

    def gemm(m, i, j, out_dtype, per_row_b):  # A [M, I], B [J, I] -> [M, J]
        args = (_s((m, i), e4m3), _s((m, cdiv(i)), f32), _s((j, i), e4m3),
                _s((j if per_row_b else cdiv(j), cdiv(i)), f32))
        return functools.partial(k.fp8_gemm, out_dtype=out_dtype), args

    dims = dict(U=u, D=d, F=f)
    return [Target(f"fp8_gemm_{tag}", k.fp8_gemm, *gemm(u, d, f, jnp.bfloat16, False), dims),
            Target(f"fp8_gemm_dgrad_{tag}", k.fp8_gemm, *gemm(u, f, d, jnp.bfloat16, False), dims),
            Target(f"fp8_gemm_wgrad_{tag}", k.fp8_gemm, *gemm(d, u, f, jnp.float32, True), dims)]


def _gmm_targets(tag, cfg):
    from dsv3_jax.ops.pallas import grouped_matmul_sm90 as k

    m, g, d, f = GMM_ROWS, LOCAL_EXPERTS[tag], cfg.dim, cfg.moe_inter_dim
    starts = _s((g + 1,), jnp.int32)
    out = []
    for w, (i, j) in {"w1": (d, f), "w2": (f, d)}.items():  # w [E_loc, I, J]
        dims = dict(M=m, E_loc=g, I=i, J=j)
        out += [Target(f"gmm_{w}_{tag}", k.gmm, k.gmm, (_s((m, i)), _s((g, i, j)), starts), dims),
                Target(f"gmm_{w}_dx_{tag}", k.gmm, functools.partial(k.gmm, transpose_rhs=True),
                       (_s((m, j)), _s((g, i, j)), starts), dims)]
        for suffix, dtype in (("", jnp.bfloat16), ("_f32", jnp.float32)):
            out.append(Target(f"tgmm_{w}{suffix}_{tag}", k.tgmm,
                              functools.partial(k.tgmm, out_dtype=dtype),
                              (_s((m, i)), _s((m, j)), starts), dims))
    return out


def _mla_targets(tag, cfg):
    from dsv3_jax.ops.pallas import mla_attention_sm90 as k

    t, h, a, o = TOKENS, cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    scale = float(cfg.softmax_scale)
    args = (_s((1, t, h, a)), _s((1, t, h, a)), _s((1, t, h, o)), _s((1, t), jnp.int32))

    def forward(segments):
        return lambda q, kk, v, seg: k.mla_attention(q, kk, v, scale=scale,
                                                     segment_ids=seg if segments else None)

    def backward(segments):
        def f(q, kk, v, seg):
            out, vjp = jax.vjp(lambda q, kk, v: forward(segments)(q, kk, v, seg), q, kk, v)
            return vjp(out)
        return f

    dims = dict(B=1, T=t, H=h, A=a, O=o)
    return [Target(f"mla_{kind}{'' if seg else '_noseg'}_{tag}", k.mla_attention, make(seg), args,
                   dims)
            for kind, make in (("fwd", forward), ("bwd", backward)) for seg in (True, False)]


def _decode_targets(tag, cfg):
    from dsv3_jax.ops.pallas import mla_decode_sm90 as k

    h, c, r, scale = cfg.n_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim, float(cfg.softmax_scale)
    fn = lambda q_lat, q_pe, cache, pos: k.mla_decode(q_lat, q_pe, cache, pos, scale=scale)
    return [Target(f"mla_decode_b{b}_s{s // 1024}k_{tag}", k.mla_decode, fn,
                   (_s((b, 1, h, c)), _s((b, 1, h, r)), _s((b, s, c + r)), _s((b, 1), jnp.int32)),
                   dict(B=b, S=s, H=h, C=c, R=r))
            for b, s in DECODE_SHAPES]


def targets(tag: str) -> list[Target]:
    """Every kernel target at the dims of PRESETS[tag] ("v3" or "small")."""
    if tag not in PRESETS:
        raise ValueError(f"kernel_targets: unknown dim set {tag!r}; use one of {sorted(PRESETS)}.")
    cfg = ds.get_model_config(PRESETS[tag])
    return [t for group in (_fp8_targets, _gmm_targets, _mla_targets, _decode_targets)
            for t in group(tag, cfg)]


def _selected(tags) -> list[tuple]:
    """[(name, fn, args)] of `tags`' targets, filtered by $KERNEL_TARGETS when it is set."""
    patterns = [p for p in os.environ.get(ENV_FILTER, "").split(",") if p.strip()]
    out = [(t.name, t.fn, t.args) for tag in tags for t in targets(tag)
           if not patterns or any(fnmatch.fnmatch(t.name, p.strip()) for p in patterns)]
    if not out:
        raise ValueError(f"{ENV_FILTER}={os.environ.get(ENV_FILTER)!r} matches no target; names "
                         f"are e.g. {[t.name for t in targets('v3')][:4]} ...")
    return out


def make() -> list[tuple]:
    """[(name, fn, args)] of every target at both dim sets: mosaic_ptxas_check.py's --fn form."""
    return _selected(PRESETS)


def make_v3() -> list[tuple]:
    return _selected(["v3"])


def make_small() -> list[tuple]:
    return _selected(["small"])


if __name__ == "__main__":
    for tag in PRESETS:
        for t in targets(tag):
            print(f"{t.name:28s} {t.kernel.__module__.rsplit('.', 1)[-1]}.{t.kernel.__name__} "
                  f"{t.dims}")
