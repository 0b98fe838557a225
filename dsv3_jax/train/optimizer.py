"""Optimizer, learning-rate schedules, and the aux-loss-free router-bias rule (SPEC.md sections 2, 4).

- AdamW (beta 0.9 / 0.95, weight decay 0.1 on matrices only, global-norm clipping at 1.0) on the fp32
  master weights; its two moments can be kept in bf16 (`bf16_moments`).
- The router's `e_score_correction_bias` is not trained by the optimizer: its updates are zero and it
  gets no weight decay. After each step `update_router_bias` moves it by
  b_i += gamma * sign(mean(load) - load_i), with load the step's global per-expert token counts.
- Schedules: "warmup_constant_cosine" (the report's: linear warm-up, constant, cosine decay to
  final_lr_ratio x lr over the last part of training) and "cosine" (warm-up, then cosine).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from dsv3_jax.model import tree
from dsv3_jax.train.run_config import check_train_config


def learning_rate_schedule(train_cfg) -> optax.Schedule:
    """lr(step) for the run's `train` config (refused as check_run_config refuses it)."""
    check_train_config(train_cfg)
    steps, warmup, peak = train_cfg.steps, train_cfg.warmup_steps, train_cfg.lr
    final = peak * train_cfg.final_lr_ratio
    warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
    decay_start = (warmup if train_cfg.schedule == "cosine"
                   else max(warmup, int(round(steps * train_cfg.decay_start_fraction))))
    decay = optax.cosine_decay_schedule(peak, max(steps - decay_start, 1),
                                        alpha=final / peak if peak else 0.0)
    return optax.join_schedules([warm, optax.constant_schedule(peak), decay], [warmup, decay_start])


def scale_by_adam(b1: float, b2: float, eps: float, moment_dtype=jnp.float32) -> optax.GradientTransformation:
    """Adam's update direction with both moments stored in `moment_dtype` (arithmetic in fp32).

    mu = b1 mu + (1 - b1) g;  nu = b2 nu + (1 - b2) g^2;  u = mu_hat / (sqrt(nu_hat) + eps).
    With float32 moments this is optax.scale_by_adam (tests check it).
    """

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, moment_dtype)
        return optax.ScaleByAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params),
                                      jax.tree.map(zeros, params))

    def update(grads, state, params=None):
        del params
        count = state.count + 1
        f32 = lambda x: x.astype(jnp.float32)
        mu = jax.tree.map(lambda m, g: b1 * f32(m) + (1 - b1) * f32(g), state.mu, grads)
        nu = jax.tree.map(lambda v, g: b2 * f32(v) + (1 - b2) * jnp.square(f32(g)), state.nu, grads)
        c1, c2 = 1 - b1 ** f32(count), 1 - b2 ** f32(count)
        updates = jax.tree.map(lambda m, v: (m / c1) / (jnp.sqrt(v / c2) + eps), mu, nu)
        cast = lambda t: jax.tree.map(lambda x: x.astype(moment_dtype), t)
        return updates, optax.ScaleByAdamState(count, cast(mu), cast(nu))

    return optax.GradientTransformation(init, update)


def _path_names(path) -> list[str]:
    return [getattr(k, "key", getattr(k, "name", str(k))) for k in path]


def trainable_labels(params):
    """'frozen' for router biases (balance rule only), 'adamw' for everything else."""
    return jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if tree.ROUTER_BIAS in _path_names(path) else "adamw", params)


def decay_mask(params):
    """Weight decay on matrices (and stacked matrices), not on norm weights or biases."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: x.ndim >= 2 and _path_names(path)[-1] not in ("weight", tree.ROUTER_BIAS), params)


def make_optimizer(train_cfg, params) -> optax.GradientTransformation:
    """AdamW with clipping and the run's schedule; router biases frozen (see module docstring)."""
    moment_dtype = jnp.bfloat16 if train_cfg.bf16_moments else jnp.float32
    adamw = optax.chain(
        optax.clip_by_global_norm(train_cfg.clip),
        scale_by_adam(train_cfg.b1, train_cfg.b2, train_cfg.eps, moment_dtype),
        optax.add_decayed_weights(train_cfg.weight_decay, mask=decay_mask(params)),
        optax.scale_by_learning_rate(learning_rate_schedule(train_cfg)),
    )
    return optax.multi_transform({"adamw": adamw, "frozen": optax.set_to_zero()},
                                 trainable_labels(params))


def bias_update(bias: jax.Array, load: jax.Array, gamma: float) -> jax.Array:
    """b += gamma * sign(mean(load) - load) along the expert axis (last); any leading layer axes."""
    load = load.astype(jnp.float32)
    return bias + gamma * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


def update_router_bias(params, expert_load, mtp_expert_load, gamma: float):
    """Applies `bias_update` to every router of the model.

    Args:
      params: DeepSeekV3 params (scanned or unrolled layout).
      expert_load: [n_moe_layers, E] global token counts of the main model's MoE layers.
      mtp_expert_load: [mtp_depth, E], or None to leave the MTP routers alone.
    """
    if gamma == 0:
        return params
    main_row, mtp_row = 0, 0
    for path in tree.router_bias_paths(params):
        bias = tree.get(params, path)
        rows = bias.shape[0] if bias.ndim == 2 else 1  # a scanned stack holds [L, E]
        if tree.is_mtp(path[0]):
            if mtp_expert_load is None:
                continue
            load, mtp_row = mtp_expert_load[mtp_row:mtp_row + rows], mtp_row + rows
        else:
            load, main_row = expert_load[main_row:main_row + rows], main_row + rows
        params = tree.replace(params, path, bias_update(bias, load.reshape(bias.shape), gamma))
    return params


def guarded_step(tx: optax.GradientTransformation, grads, params, opt_state, finite: jax.Array,
                 expert_load=None, mtp_expert_load=None, bias_gamma: float = 0.0):
    """(params, opt_state) after one step of `tx` on `grads` and the router-bias update from
    `expert_load` (`update_router_bias`), or the inputs unchanged where `finite` (a bool []) is
    False: a non-finite step is skipped. A `lax.cond`, so a finite step pays for no select over
    the parameters and optimizer state (a `jnp.where` over both costs a full pass over them)."""
    def step(operands):
        p, s = operands
        updates, s = tx.update(grads, s, p)
        p = optax.apply_updates(p, updates)
        if expert_load is not None:
            p = update_router_bias(p, expert_load, mtp_expert_load, bias_gamma)
        return p, s

    return jax.lax.cond(finite, step, lambda operands: operands, (params, opt_state))
