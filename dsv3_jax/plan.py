"""python -m dsv3_jax.plan --config=configs/deepseek_v3_671b.py --devices=256 --mesh=expert=64,fsdp=-1

Per-device memory of one training step on a mesh, from abstract evaluation only (no array is
allocated, no device of that count is needed). The components, in bytes per device:

- params, optimizer: every leaf of the TrainState's shape, split as the logical-axis rules place
  it on the mesh (`dsv3_jax/parallel/mesh.py`), summed per device;
- gradients: float32, sharded like the params; with gradient accumulation the step holds the
  float32 accumulator and one microbatch's gradients (2x);
- activations: what the backward pass keeps from the forward pass (jax's saved residuals, with the
  config's remat policy) for one microbatch of one device, traced on a per-device model whose
  heads, FFN, expert hidden and vocabulary dims are divided by the tensor axis. Residuals that do
  not grow with the batch (the compute-dtype copies of weights a policy may save) are counted
  sharded like the params; weights the backward reads are counted with the params;
- ep_buffers: the expert-parallel exchange of one MoE layer (`parallel/expert_parallel.py`),
  forward and backward: [P, C, D] rows with C = `exchange_capacity` (P the `expert` axis; the
  capacity factor bounds C, 0 is dropless) and the experts' hidden [P x C, F / tensor];
- loss: the chunked cross-entropy's workspace (`train/losses.py`): [chunk, V / tensor] float32
  logits and their cotangent, and the head's gathered kernel, its bf16 copy and its gradient;
- transient: the largest workspace that is neither state nor saved for the backward: one layer's
  weights all-gathered over the FSDP axes in the compute dtype with their gradient, plus (the
  reference attention, CPU) the float32 scores and probabilities [b, H / tensor, T, T]; or the
  update's new params and optimizer state, held whole until the non-finite guard selects them
  (XLA's buffers show this one is the larger unless params are tiny);
- total: the sum (a bound: not every component peaks at once).

`--compile` (configs small enough for CPU) also compiles the real train step on simulated CPU
devices and prints XLA's own per-device figure (arguments + outputs + temporaries - aliased).
"""

from __future__ import annotations

import dataclasses
import json
import math

from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags

from dsv3_jax import cli
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.parallel.expert_parallel import exchange_capacity
from dsv3_jax.train.run_config import check_run_config, model_config

_CONFIG = config_flags.DEFINE_config_file("config", None, "Run config file (configs/*.py).",
                                          lock_config=True)
_DEVICES = flags.DEFINE_list("devices", ["256", "2048"], "Device counts to plan for.")
_MESH = flags.DEFINE_string("mesh", "", "Mesh sizes, e.g. 'expert=64,fsdp=-1' (others 1); "
                            "empty: the config's mesh.")
_BATCH = flags.DEFINE_integer("per_device_batch", 1, "Sequences per device of the batch axes "
                              "(data x fsdp x expert) in one microbatch; the global batch is "
                              "this x the batch ways x the microbatches. 0: the config's.")
_ACCUM = flags.DEFINE_integer("grad_accum_steps", 0, "Microbatches per optimizer step; 0: the "
                              "config's train.grad_accum_steps (1 if it has none).")
_CAPACITY = flags.DEFINE_float("capacity_factor", -1.0, "Expert-exchange capacity factor: 0 "
                               "(dropless) or >= 1; -1: the config's model.moe_capacity_factor.")
_ATTENTION = flags.DEFINE_enum("attention", "kernel", ["kernel", "reference"],
                               "Attention path: 'kernel' (fused, GPU/TPU: small workspace) or "
                               "'reference' (CPU: float32 [b, H, T, T] scores).")
_JSON = flags.DEFINE_bool("json", False, "Print the plans as JSON instead of a table.")
_COMPILE = flags.DEFINE_bool("compile", False, "Also compile the real train step on simulated "
                             "CPU devices and print XLA's per-device bytes (small configs).")
flags.mark_flags_as_required(["config"])

COMPONENTS = ("params", "optimizer", "gradients", "activations", "ep_buffers", "loss",
              "transient")


@dataclasses.dataclass
class Plan:
    devices: int
    mesh: dict
    global_batch: int
    per_device_batch: int  # sequences per device in one microbatch
    grad_accum_steps: int
    capacity_factor: float
    bytes: dict  # COMPONENTS -> bytes per device, and "total"

    @property
    def total_bytes(self) -> int:
        return self.bytes["total"]

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _local_bytes(leaf, spec, sizes: dict, keep=None) -> int:
    """Bytes of one device's shard of `leaf` under PartitionSpec `spec` on a mesh of `sizes`;
    with `keep(entry, axis)`, only the axes it accepts split the leaf (the others are gathered)."""
    shape = list(leaf.shape)
    for dim, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        for axis in (axes if isinstance(axes, tuple) else (axes,)):
            if axis is not None and (keep is None or keep(axes, axis)):
                shape[dim] = math.ceil(shape[dim] / sizes[axis])
    return math.prod(shape) * jnp.dtype(leaf.dtype).itemsize


def _gathered(entry, axis) -> bool:
    """The axes an FSDP all-gather leaves split: `tensor`, and `expert` on the experts' own dim
    (`expert` beside `fsdp` on a model dim is FSDP, and is gathered)."""
    return axis == "tensor" or entry == "expert"


def _nbytes(a) -> int:
    return math.prod(a.shape) * jnp.dtype(a.dtype).itemsize


def _residuals(local_model, tc, local_params, batch_size: int, seq_len: int) -> list:
    """(aval, why) of what the backward keeps, for a [batch_size, seq_len] batch."""
    from jax._src.ad_checkpoint import saved_residuals  # no public equivalent in jax 0.11

    from dsv3_jax.train.loop import loss_fn

    batch = {k: jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
             for k in ("tokens", "segment_ids", "positions")}
    f = lambda p, b: loss_fn(nn.unbox(p), b, model=local_model, train_cfg=tc)[0]
    return [(a, why) for a, why in saved_residuals(f, local_params, batch)
            if not why.startswith("from the argument")]


def _batch_free(small: list, large: list) -> int:
    """Bytes of the residuals of `small` (one batch size) that reappear unchanged in `large`
    (twice the batch): the ones that do not grow with the batch (weight copies)."""
    pool = {}
    for a, _ in large:
        key = (tuple(a.shape), str(a.dtype))
        pool[key] = pool.get(key, 0) + 1
    same = 0
    for a, _ in small:
        key = (tuple(a.shape), str(a.dtype))
        if pool.get(key, 0):
            pool[key] -= 1
            same += _nbytes(a)
    return same


def plan(config: ml_collections.ConfigDict, devices: int, mesh_cfg, per_device_batch: int,
         grad_accum_steps: int = 0, capacity_factor: float = -1.0,
         attention: str = "kernel") -> Plan:
    """The per-device memory of one train step of `config` on `devices` devices shaped by
    `mesh_cfg`; per_device_batch 0, grad_accum_steps 0 and capacity_factor -1 take the config's.
    """
    from dsv3_jax.train.loop import state_builder

    check_run_config(config)
    tc, seq_len = config.train, config.data.seq_len
    accum = grad_accum_steps or config.train.get("grad_accum_steps", 1) or 1
    cfg = model_config(config)
    if capacity_factor >= 0:
        cfg = cfg.replace(moe_capacity_factor=capacity_factor)
    sizes = mesh_lib.mesh_shape(mesh_cfg, devices)
    batch_ways = mesh_lib.batch_ways(sizes)
    local_batch = per_device_batch or max(config.data.batch_size // (batch_ways * accum), 1)
    global_batch = local_batch * batch_ways * accum
    mesh_lib.check_mesh_fits(sizes, cfg, local_batch * batch_ways)

    _, _, init_boxed = state_builder(cfg, tc, seq_len)
    state, specs = mesh_lib.abstract_with_shardings(init_boxed)
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)

    def per_device(tree, tree_specs, keep=None, dtype=None) -> int:
        leaves = jax.tree.leaves(tree)
        leaf_specs = jax.tree.leaves(tree_specs, is_leaf=is_spec)
        cast = (lambda x: jax.ShapeDtypeStruct(x.shape, dtype)) if dtype else (lambda x: x)
        return sum(_local_bytes(cast(x), s, sizes, keep) for x, s in zip(leaves, leaf_specs))

    dt = jnp.dtype(cfg.dtype).itemsize  # the compute dtype
    t = sizes["tensor"]
    params = per_device(state.params, specs.params)
    # float32 gradients, sharded like the params; accumulating: the sum and one microbatch's.
    gradients = per_device(state.params, specs.params, dtype=jnp.float32) * (2 if accum > 1 else 1)

    # ---- activations: saved residuals of the per-device model, one microbatch.
    local_cfg = cfg.replace(n_heads=cfg.n_heads // t, inter_dim=cfg.inter_dim // t,
                            moe_inter_dim=cfg.moe_inter_dim // t, vocab_size=cfg.vocab_size // t)
    local_model, _, local_init = state_builder(local_cfg, tc, seq_len)
    local_params = jax.eval_shape(local_init).params
    residuals = _residuals(local_model, tc, local_params, local_batch, seq_len)
    saved = sum(_nbytes(a) for a, _ in residuals)
    # Residuals that do not grow with the batch are copies of weights (the compute-dtype casts a
    # policy such as "none" saves per layer): the sharded program keeps them split like the
    # params, so they count at the params' per-device share, not at the per-device model's size.
    weight_copies = _batch_free(residuals, _residuals(local_model, tc, local_params,
                                                      2 * local_batch, seq_len))
    local_params_bytes = sum(_nbytes(x) for x in jax.tree.leaves(nn.unbox(local_params)))
    activations = saved - weight_copies + weight_copies * params // local_params_bytes

    # ---- ep_buffers: one MoE layer's expert-parallel exchange (_expert_parallel_body).
    tokens = local_batch * seq_len  # U, tokens per device in one microbatch
    pairs = tokens * cfg.n_activated_experts  # M
    peers = sizes["expert"]  # P
    cap = exchange_capacity(pairs, peers, cfg.moe_capacity_factor)  # C
    rows, d, f_loc = peers * cap, cfg.dim, cfg.moe_inter_dim // t
    ep_forward = (rows * d * dt  # send_x [P, C, D]
                  + rows * d * dt  # recv_x [P x C, D], after the all_to_all
                  + rows * d * dt  # recv_x sorted by local expert
                  + 3 * rows * f_loc * dt  # w1 out, w3 out, their SwiGLU product [P x C, F_loc]
                  + rows * d * dt  # expert outputs ys [P x C, D] (then unsorted in place)
                  + rows * d * dt  # the returned rows, `back` [P, C, D]
                  + 2 * pairs * d * dt)  # `returned` and `pair_out` [M, D], token order
    ep_buffers = 2 * ep_forward if cfg.n_layers > cfg.n_dense_layers else 0  # + cotangents

    # ---- loss: the chunked cross-entropy's workspace (losses.chunked_token_stats).
    chunk = min(tc.get("loss_chunk_tokens", 512), tokens)  # rows of this device per chunk
    v_loc = cfg.vocab_size // t
    loss = (2 * chunk * v_loc * 4  # the backward scan's float32 logits and d logits [chunk, V_loc]
            + d * v_loc * (4 + 2)  # the head kernel gathered over the FSDP axes, and its bf16 cast
            + 2 * d * v_loc * 4)  # its float32 gradient: the scan's sum and this chunk's

    # ---- transient: the largest layer's gathered weights (and their gradient), + attention.
    layer = 0
    for name, sub in state.params.items():
        if name in ("embed", "head"):
            continue
        stacked = "layers" in sub
        gathered = per_device(sub, specs.params[name], keep=_gathered, dtype=cfg.dtype)
        n_stack = jax.tree.leaves(sub)[0].shape[0] if stacked else 1
        layer = max(layer, gathered // n_stack)
    in_layer = 2 * layer  # the forward's gathered weights, then the backward's weight gradient
    if attention == "reference":
        # Scores and probabilities [b, H_loc, T, T] float32; the backward's probabilities, their
        # cotangent and the scores' cotangent.
        in_layer += 4 * local_batch * (cfg.n_heads // t) * seq_len * seq_len * 4
    optimizer = per_device(state.opt_state, specs.opt_state)
    # The update: the new params and optimizer state are whole temporaries until the non-finite
    # guard (jnp.where(finite, new, old), loop._train_step) selects them into the donated
    # buffers; XLA's buffer assignment holds one new copy of each beside the old.
    update = params + optimizer
    transient = max(in_layer, update)

    parts = dict(params=params, optimizer=optimizer,
                 gradients=gradients, activations=activations, ep_buffers=ep_buffers, loss=loss,
                 transient=transient)
    parts["total"] = sum(parts.values())
    return Plan(devices=devices, mesh=sizes, global_batch=global_batch,
                per_device_batch=local_batch, grad_accum_steps=accum,
                capacity_factor=float(cfg.moe_capacity_factor), bytes=parts)


def parse_mesh(text: str, default) -> ml_collections.ConfigDict:
    """'expert=64,fsdp=-1' -> a mesh config (unnamed axes 1); '' -> `default`."""
    if not text:
        return default
    try:
        return ml_collections.ConfigDict(mesh_lib.parse_mesh_sizes(text))
    except ValueError as e:
        raise cli.UsageError(str(e)) from None


def compiled_bytes(config: ml_collections.ConfigDict, p: Plan) -> int:
    """XLA's per-device bytes of the real train step of `config` laid out as plan `p` (its mesh,
    batch and microbatches), compiled for p.devices CPU devices: arguments + outputs +
    temporaries - the donated state aliased into the outputs."""
    from dsv3_jax.train.loop import TrainSteps

    config = ml_collections.ConfigDict(config.to_dict())  # an unlocked copy
    config.data.batch_size = p.global_batch
    config.model.moe_capacity_factor = p.capacity_factor
    config.train.grad_accum_steps = p.grad_accum_steps
    config.mesh = ml_collections.ConfigDict(p.mesh)
    cpus = jax.devices("cpu")
    if len(cpus) < p.devices:
        raise cli.UsageError(
            f"--compile needs {p.devices} CPU devices and jax has {len(cpus)}; set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={p.devices} before running.")
    mesh = mesh_lib.make_mesh(config.mesh, cpus[:p.devices])
    # LLVM's optimisation level changes the code, not the buffers XLA assigns: level 0 compiles
    # about twice as fast.
    compiled = TrainSteps(config, mesh).lower_train_step().compile(
        compiler_options={"xla_backend_optimization_level": 0})
    m = compiled.memory_analysis()
    return (m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
            - m.alias_size_in_bytes)


def table(plans: list[Plan], cfg_name: str, seq_len: int, remat: str, attention: str,
          xla: list | None = None) -> str:
    unit, scale = ("GiB", 2**30) if max(p.total_bytes for p in plans) >= 2**30 else ("MiB", 2**20)
    gb = lambda b: f"{b / scale:,.2f}"
    heads = ["devices", "mesh (data, fsdp, expert, tensor)", "global batch", "per-device batch",
             "microbatches", "capacity", *COMPONENTS, "total"]
    if xla:
        heads += ["XLA", "plan / XLA"]
    rows = [f"Per-device memory, {cfg_name}, sequence {seq_len}, remat {remat!r}, attention "
            f"{attention!r} ({unit}):", "", "| " + " | ".join(heads) + " |",
            "|" + "---|" * len(heads)]
    for i, p in enumerate(plans):
        m = p.mesh
        cells = [str(p.devices), f"{m['data']}, {m['fsdp']}, {m['expert']}, {m['tensor']}",
                 f"{p.global_batch:,}", str(p.per_device_batch), str(p.grad_accum_steps),
                 f"{p.capacity_factor:g}" if p.capacity_factor else "0 (dropless)",
                 *(gb(p.bytes[k]) for k in (*COMPONENTS, "total"))]
        if xla:
            cells += [gb(xla[i]), f"{p.total_bytes / xla[i]:.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _request_cpu_devices(n: int) -> None:
    """Asks for `n` CPU devices, which works only before jax's backends start (they start on the
    first device query); compiled_bytes refuses later if there are too few."""
    try:
        if jax.config.jax_num_cpu_devices < n:
            jax.config.update("jax_num_cpu_devices", n)
    except RuntimeError:  # the backends have started: XLA_FLAGS decides
        pass


def main(argv):
    if len(argv) > 1:
        raise cli.UsageError(f"unexpected arguments {argv[1:]}.")
    config = _CONFIG.value
    devices = cli.positive_ints("--devices", _DEVICES.value)
    if _BATCH.value < 0:
        raise cli.UsageError(f"--per_device_batch={_BATCH.value} must be >= 1 (or 0: the "
                             "config's batch size split over the batch axes).")
    if _ACCUM.value < 0:
        raise cli.UsageError(f"--grad_accum_steps={_ACCUM.value} must be >= 1 (or 0: the "
                             "config's train.grad_accum_steps).")
    capacity = _CAPACITY.value
    if not (capacity in (-1, 0) or 1 <= capacity < 1e6):
        raise cli.UsageError(f"--capacity_factor={capacity:g} must be 0 (dropless), a number "
                             ">= 1, or -1 (the config's model.moe_capacity_factor).")
    if _COMPILE.value:
        _request_cpu_devices(max(devices))
    mesh_cfg = parse_mesh(_MESH.value, config.mesh)
    plans = [plan(config, n, mesh_cfg, _BATCH.value, _ACCUM.value, capacity, _ATTENTION.value)
             for n in devices]
    xla = [compiled_bytes(config, p) for p in plans] if _COMPILE.value else None
    if _JSON.value:
        out = [p.to_json() for p in plans]
        for i, o in enumerate(out):
            o["attention"] = _ATTENTION.value
            if xla:
                o["xla_bytes"] = xla[i]
        print(json.dumps(out, indent=1))
        return
    print(table(plans, config.model.preset, config.data.seq_len,
                model_config(config).remat_policy, _ATTENTION.value, xla))


if __name__ == "__main__":
    cli.run(main)
