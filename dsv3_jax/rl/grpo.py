"""Group Relative Policy Optimization (DeepSeekMath, section 4.1; DeepSeek-V3 report, 5.2.2): the
math, nothing else.

Letters (`dsv3_jax/NOTATION.md`): P prompts per step, G samples per prompt (the group), N = P * G
samples, T positions of a sample (prompt + completion, right-padded).

For prompt q, the policy's old weights sample a group of G completions o_1..o_G with rewards
r_1..r_G. Each completion's advantage is its reward standardised within its group:

    A_i = (r_i - mean_j r_j) / (std_j r_j + ADV_EPS)          (population std over the group)

and every token of o_i carries it. With the importance ratio rho_{i,t} = pi(o_it | q, o_i<t) /
pi_old(o_it | q, o_i<t) the objective maximised is

    J = norm_{i,t} [ min(rho A_i, clip(rho, 1 - clip_low, 1 + clip_high) A_i)
                     - beta * KL_{i,t} ]
    KL_{i,t} = pi_ref / pi - log(pi_ref / pi) - 1              (k3, unbiased, >= 0)

against a frozen reference policy pi_ref (the starting weights). `grpo_loss` returns -J.

norm_{i,t} is the normalisation over completion tokens (`normalisation`):
  "token"     sum over every completion token of the batch / their count: each token weighs the
              same, so long completions are not diluted (DAPO's token-level loss);
  "sequence"  per completion the mean over its tokens, then the mean over completions (the
              DeepSeekMath paper's 1/G sum_i 1/|o_i| sum_t).
Prompt and padding tokens never count (their mask is 0).

Properties the tests check: at the first update pi = pi_old = pi_ref, so rho = 1 and KL = 0; a
group whose rewards are all equal has A = 0 and contributes no policy gradient (only the KL term).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

ADV_EPS = 1e-4  # added to the group's std: a group of equal rewards gets A = 0, not 0 / 0
NORMALISATIONS = ("token", "sequence")


def group_advantages(rewards: np.ndarray, eps: float = ADV_EPS) -> np.ndarray:
    """rewards [P, G] -> advantages [P, G] float32: (r - group mean) / (group std + eps), the
    population std (ddof 0). A group of equal rewards gives zeros."""
    r = np.asarray(rewards, np.float64)
    if r.ndim != 2 or r.shape[1] < 2:
        raise ValueError(f"rewards of shape {r.shape}: give [prompts, samples per prompt] with "
                         "at least 2 samples per prompt (GRPO's baseline is the group's mean).")
    centred = r - r.mean(axis=1, keepdims=True)
    return (centred / (r.std(axis=1, keepdims=True) + eps)).astype(np.float32)


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    """The k3 estimator of KL(pi || pi_ref) per token: exp(d) - d - 1 with d = ref_logp - logp."""
    d = ref_logp - logp
    return jnp.exp(d) - d - 1.0


def grpo_loss(logp: jax.Array, old_logp: jax.Array, ref_logp: jax.Array | None,
              advantages: jax.Array, mask: jax.Array, *, clip_low: float, clip_high: float,
              kl_beta: float, normalisation: str = "token") -> tuple[jax.Array, dict]:
    """(-J, stats) for one batch of samples (see the module docstring).

    Args:
      logp: float32 [N, T] log pi of each target token under the weights being trained.
      old_logp: float32 [N, T] the same under the weights that sampled (no gradient flows).
      ref_logp: float32 [N, T] under the reference weights, or None with kl_beta 0.
      advantages: float32 [N], one per sample.
      mask: [N, T] bool or 0/1: the completion tokens (prompt and padding 0).
      clip_low, clip_high: the ratio is clipped to [1 - clip_low, 1 + clip_high].
      kl_beta: the KL coefficient beta.
      normalisation: "token" or "sequence".
    Returns:
      loss float32 [] and stats: pg_loss (the policy term of -J), kl, ratio (token means over the
      counted tokens), clip_fraction (share of counted tokens whose clipped term is the one taken:
      the gradient is zero there), tokens (counted).
    """
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation={normalisation!r} is not one of {NORMALISATIONS}.")
    m = mask.astype(jnp.float32)
    old_logp = jax.lax.stop_gradient(old_logp)
    adv = jax.lax.stop_gradient(advantages)[:, None]
    ratio = jnp.exp(logp - old_logp)
    unclipped = ratio * adv
    clipped = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    pg = -jnp.minimum(unclipped, clipped)
    if ref_logp is None:
        if kl_beta:
            raise ValueError("kl_beta > 0 needs ref_logp (the reference policy's log-probs).")
        kl = jnp.zeros_like(logp)
    else:
        kl = k3_kl(logp, jax.lax.stop_gradient(ref_logp))
    per_token = pg + kl_beta * kl
    count = jnp.sum(m)
    if normalisation == "token":
        reduce = lambda x: jnp.sum(x * m) / jnp.maximum(count, 1.0)
    else:
        lengths = jnp.sum(m, axis=1)
        has_tokens = (lengths > 0).astype(jnp.float32)

        def reduce(x):
            per_sample = jnp.sum(x * m, axis=1) / jnp.maximum(lengths, 1.0)
            return jnp.sum(per_sample * has_tokens) / jnp.maximum(jnp.sum(has_tokens), 1.0)
    token_mean = lambda x: jnp.sum(x * m) / jnp.maximum(count, 1.0)
    took_clip = ((adv > 0) & (ratio > 1.0 + clip_high)) | ((adv < 0) & (ratio < 1.0 - clip_low))
    stats = {"pg_loss": reduce(pg), "kl": token_mean(kl), "ratio": token_mean(ratio),
             "clip_fraction": token_mean(took_clip.astype(jnp.float32)), "tokens": count}
    return reduce(per_token), stats
