"""An independent float64 numpy DeepSeek-V3, written from SPEC.md, to check the JAX model against.

It shares nothing with `dsv3_jax` but the parameter tree's layout (names and the [in, out] kernel
convention) and the ModelConfig numbers. Rope is done with complex numbers, the router and experts
token by token, attention head by head: a different route to the same equations.
"""

from __future__ import annotations

import math

import numpy as np


def np_params(params):
    """A params tree (possibly boxed) as nested dicts of float64 numpy arrays."""
    import flax.linen as nn
    import jax

    return jax.tree.map(lambda a: np.asarray(a, np.float64), nn.unbox(params))


def layer_params(params, index, n_dense):
    """Parameters of layer `index` (dense layers first), scanned or unrolled layout."""
    stack, i = ("dense_layers", index) if index < n_dense else ("moe_layers", index - n_dense)
    tree = params[stack]
    if "layers" in tree:  # scanned: leading [L] axis
        import jax

        return jax.tree.map(lambda a: a[i], tree["layers"])
    return tree[f"layers_{i}"]


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def silu(x):
    return x / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def rope_frequencies(cfg):
    """SPEC.md section 2, literally."""
    d = cfg.qk_rope_head_dim
    f = np.array([cfg.rope_theta ** (-2.0 * i / d) for i in range(d // 2)])
    if cfg.max_seq_len > cfg.original_seq_len:
        def corr_dim(r):
            return d * math.log(cfg.original_seq_len / (2 * math.pi * r)) / (2 * math.log(cfg.rope_theta))

        low = max(math.floor(corr_dim(cfg.beta_fast)), 0)
        high = min(math.ceil(corr_dim(cfg.beta_slow)), d - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(d // 2) - low) / (high - low), 0, 1)
        f = f / cfg.rope_factor * ramp + f * (1 - ramp)
    return f


def softmax_scale(cfg):
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.max_seq_len > cfg.original_seq_len:
        mscale = 0.1 * cfg.mscale * math.log(cfg.rope_factor) + 1.0
        scale *= mscale ** 2
    return scale


def rope(x, positions, freqs):
    """x [T, ..., R] rotated as complex pairs (x[2i] + j x[2i+1]) * exp(j pos f_i)."""
    z = x[..., 0::2] + 1j * x[..., 1::2]
    angle = np.asarray(positions, np.float64).reshape((-1,) + (1,) * (x.ndim - 2) + (1,)) * freqs
    z = z * np.exp(1j * angle)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


def mla(cfg, p, x, positions, segment_ids=None):
    """Naive MLA for one sequence. x [T, D] -> [T, D]."""
    t, h = x.shape[0], cfg.n_heads
    nope, r, v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    if cfg.q_lora_rank:
        q = rms_norm(x @ p["wq_a"]["kernel"], p["q_norm"]["weight"], cfg.norm_eps) @ p["wq_b"]["kernel"]
    else:
        q = x @ p["wq"]["kernel"]
    q = q.reshape(t, h, nope + r)
    freqs = rope_frequencies(cfg)
    q_nope, q_pe = q[..., :nope], rope(q[..., nope:], positions, freqs)
    kv = x @ p["wkv_a"]["kernel"]
    c, k_pe = kv[:, :cfg.kv_lora_rank], rope(kv[:, cfg.kv_lora_rank:], positions, freqs)
    kvb = (rms_norm(c, p["kv_norm"]["weight"], cfg.norm_eps) @ p["wkv_b"]["kernel"]).reshape(t, h, nope + v_dim)
    k_nope, v = kvb[..., :nope], kvb[..., nope:]
    seg = np.zeros(t) if segment_ids is None else np.asarray(segment_ids)
    out = np.zeros((t, h, v_dim))
    for head in range(h):
        for i in range(t):
            keys = [j for j in range(i + 1) if seg[j] == seg[i]]
            s = np.array([(q_nope[i, head] @ k_nope[j, head] + q_pe[i, head] @ k_pe[j])
                          for j in keys]) * softmax_scale(cfg)
            out[i, head] = softmax(s) @ v[keys, head]
    return out.reshape(t, h * v_dim) @ p["wo"]["kernel"]


def swiglu(x, w1, w2, w3):
    return (silu(x @ w1) * (x @ w3)) @ w2


def route(cfg, p_gate, x_t):
    """SPEC.md "Gate" for one token: (indices, weights)."""
    logits = x_t @ p_gate["kernel"]
    s = 1 / (1 + np.exp(-logits)) if cfg.score_func == "sigmoid" else softmax(logits)
    biased = cfg.score_func == "sigmoid"
    sel = s + p_gate["e_score_correction_bias"] if biased else s.copy()
    g = cfg.n_expert_groups
    if g > 1:
        groups = sel.reshape(g, -1)
        gscore = np.sort(groups, axis=1)[:, -2:].sum(1) if biased else groups.max(1)
        keep = np.argsort(-gscore, kind="stable")[:cfg.n_limited_groups]
        masked = np.full_like(groups, -np.inf)
        masked[keep] = groups[keep]
        sel = masked.reshape(-1)
    idx = np.argsort(-sel, kind="stable")[:cfg.n_activated_experts]
    w = s[idx]
    if cfg.score_func == "sigmoid" and cfg.norm_topk_prob:  # softmax: never renormalised
        w = w / w.sum()
    return idx, w * cfg.route_scale


def moe(cfg, p, x):
    """DeepSeekMoE token by token. x [T, D] -> [T, D]."""
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        idx, w = route(cfg, p["gate"], x[t])
        for e, we in zip(idx, w):
            out[t] += we * swiglu(x[t], p["w1"][e], p["w2"][e], p["w3"][e])
        if cfg.n_shared_experts:
            sh = p["shared_experts"]
            out[t] += swiglu(x[t], sh["w1"]["kernel"], sh["w2"]["kernel"], sh["w3"]["kernel"])
    return out


def block(cfg, p, x, positions, segment_ids, is_moe):
    x = x + mla(cfg, p["attn"], rms_norm(x, p["attn_norm"]["weight"], cfg.norm_eps), positions, segment_ids)
    hn = rms_norm(x, p["ffn_norm"]["weight"], cfg.norm_eps)
    if is_moe:
        return x + moe(cfg, p["ffn"], hn)
    f = p["ffn"]
    return x + swiglu(hn, f["w1"]["kernel"], f["w2"]["kernel"], f["w3"]["kernel"])


def forward(cfg, params, tokens, positions=None, segment_ids=None):
    """One sequence. tokens [T] -> (logits [T, V], mtp_logits [depth, T, V])."""
    params = np_params(params)
    t = len(tokens)
    positions = np.arange(t) if positions is None else np.asarray(positions)
    emb = params["embed"]["embedding"]
    h = emb[np.asarray(tokens)]
    for i in range(cfg.n_layers):
        h = block(cfg, layer_params(params, i, cfg.n_dense_layers), h, positions, segment_ids,
                  is_moe=i >= cfg.n_dense_layers)
    head = params["head"]["kernel"]
    logits = rms_norm(h, params["norm"]["weight"], cfg.norm_eps) @ head
    mtp_logits = []
    for k in range(1, cfg.mtp_depth + 1):
        p = params[f"mtp_{k - 1}"]
        nxt = np.concatenate([np.asarray(tokens)[k:], np.zeros(k, dtype=int)])
        merged = np.concatenate([rms_norm(emb[nxt], p["enorm"]["weight"], cfg.norm_eps),
                                 rms_norm(h, p["hnorm"]["weight"], cfg.norm_eps)], axis=-1)
        h = block(cfg, p["block"], merged @ p["eh_proj"]["kernel"], positions, segment_ids, True)
        mtp_logits.append(rms_norm(h, p["norm"]["weight"], cfg.norm_eps) @ head)
    return logits, np.array(mtp_logits)
