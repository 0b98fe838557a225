"""train_and_evaluate(config, workdir): the one training loop.

Reads like the recipe: `Run(config, workdir, resources)` makes the run's pieces (mesh, data, model
and optimizer, restore-or-init, compiled steps), then train_and_evaluate steps with the
aux-loss-free bias update, logging, evaluation and checkpoints. Nothing is lost on failure: a
NaN/Inf step leaves the state untouched, SIGTERM/SIGINT save before exiting, and a restart resumes
from the newest good checkpoint on the exact next batch (the killed-and-resumed run equals the
uninterrupted one bit for bit; tests check it).
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import threading
import time

from absl import logging
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from dsv3_jax.data import pipeline
from dsv3_jax.files import writable_workdir
from dsv3_jax.model import rope, tree
from dsv3_jax.model.stats import model_stats
from dsv3_jax.model.transformer import DeepSeekV3
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.parallel.mesh import LOGICAL_AXIS_RULES
from dsv3_jax.train import init_from, losses, metrics as metrics_lib, optimizer as optim
from dsv3_jax.train.checkpoint import Checkpointer
from dsv3_jax.train.run_config import check_run_config, model_config


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], optimizer steps taken
    params: dict  # fp32 master weights, router biases included
    opt_state: optax.OptState
    rng: jax.Array  # uint32 [2], raw key data; folded with the step by any stochastic feature


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss or gradient; the last good state was kept and saved."""


def loss_fn(params, batch: dict, *, model, train_cfg, chunk_tokens: int | None = None,
            normalizers: dict | None = None):
    """(training loss, (its terms, expert loads, MTP expert loads, dropped fractions)) of one
    batch; the dropped fractions are [n_moe_layers + mtp_depth] (main layers, then MTP), or
    None without MoE layers.

    The cross-entropies are chunked (losses.chunked_token_stats): no [B, T, V] logits, forward or
    backward. `chunk_tokens` is the chunk over the whole batch; default
    config.train.loss_chunk_tokens (right for an unsharded batch; a run multiplies it by the ways
    the batch is split, `_chunk_tokens`). `normalizers`: losses.training_loss's (the step's, when
    `batch` is one of its microbatches)."""
    out = model.apply({"params": params}, batch["tokens"], batch["positions"],
                      batch["segment_ids"], with_logits=False, method=DeepSeekV3.forward)
    loss, terms = losses.training_loss(out, batch["tokens"], batch["segment_ids"],
                                       mtp_lambda=train_cfg.mtp_lambda,
                                       balance_alpha=train_cfg.balance_alpha,
                                       chunk_tokens=chunk_tokens or _chunk_tokens(train_cfg),
                                       normalizers=normalizers, loss_mask=batch.get("loss_mask"))
    dropped = [x for x in (out.dropped_fraction, out.mtp_dropped_fraction) if x is not None]
    return loss, (terms, out.expert_load, out.mtp_expert_load,
                  jnp.concatenate(dropped) if dropped else None)


def _chunk_tokens(train_cfg, batch_ways: int = 1) -> int:
    """Loss-chunk tokens over the whole batch: config.train.loss_chunk_tokens per batch shard."""
    return train_cfg.get("loss_chunk_tokens", losses.DEFAULT_CHUNK_TOKENS) * batch_ways


def state_builder(cfg, train_cfg, seq_len: int):
    """(model, optimizer, init_boxed): init_boxed() builds the TrainState with logically
    partitioned (boxed) leaves; `jax.eval_shape` of it gives shapes and partition specs."""
    model = DeepSeekV3(cfg)
    tx = optim.make_optimizer(train_cfg, tree.abstract_params(cfg))
    dummy = jnp.zeros((1, seq_len), jnp.int32)

    def init_boxed():
        params = model.init(jax.random.key(train_cfg.seed), dummy)["params"]
        return TrainState(step=jnp.zeros([], jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(jax.random.key(train_cfg.seed + 1)))

    return model, tx, init_boxed


def _microbatches(batch: dict, n: int) -> dict:
    """[B, T] arrays -> [n, B / n, T]: microbatch a holds rows a, a + n, a + 2n, ..., so with the
    batch split over devices in blocks of a multiple of n rows, every device keeps its own rows."""
    def split(x):
        x = x.reshape((x.shape[0] // n, n) + x.shape[1:]).swapaxes(0, 1)
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            return x
        return jax.lax.with_sharding_constraint(
            x, jax.sharding.PartitionSpec(None, mesh_lib.mesh_axes("activation_batch")))
    return {k: split(v) for k, v in batch.items()}


def _loss_and_grads(params, batch: dict, *, model, train_cfg, chunk_tokens):
    """((loss, aux), fp32 grads) of the step's batch, over config.train.grad_accum_steps
    microbatches (a lax.scan that adds their gradients, expert loads and terms; each microbatch's
    loss is divided by the step's counts, so the sums are the whole batch's)."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, model=model, train_cfg=train_cfg,
                                                   chunk_tokens=chunk_tokens), has_aux=True)
    accum = train_cfg.get("grad_accum_steps", 1)
    if accum == 1:
        return grad_fn(params, batch)
    normalizers = losses.loss_normalizers(batch["segment_ids"], model.cfg.mtp_depth,
                                          batch.get("loss_mask"))
    micro = _microbatches(batch, accum)
    first = jax.tree.map(lambda x: x[0], micro)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype),
                         jax.eval_shape(functools.partial(grad_fn, normalizers=normalizers),
                                        params, first))

    def body(total, mb):
        return jax.tree.map(jnp.add, total, grad_fn(params, mb, normalizers=normalizers)), None

    (loss, (terms, load, mtp_load, dropped)), grads = jax.lax.scan(body, zeros, micro)[0]
    if dropped is not None:
        dropped = dropped / accum  # each microbatch's fraction of its own pairs: the mean
    return (loss, (terms, load, mtp_load, dropped)), grads


def _train_step(state: TrainState, batch: dict, *, model, tx, train_cfg,
                chunk_tokens: int | None = None):
    """One optimizer step (over config.train.grad_accum_steps microbatches), then the router-bias
    update from the whole step's expert load; a non-finite step changes nothing but the step
    counter (its batch is skipped). `chunk_tokens`: as in loss_fn."""
    (loss, (terms, load, mtp_load, dropped)), grads = _loss_and_grads(
        state.params, batch, model=model, train_cfg=train_cfg, chunk_tokens=chunk_tokens)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = optim.guarded_step(tx, grads, state.params, state.opt_state, finite,
                                           load, mtp_load, train_cfg.bias_gamma)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    loads = [x for x in (load, mtp_load) if x is not None]
    step_metrics = dict(loss=loss, grad_norm=grad_norm, finite=finite,
                        lr=optim.learning_rate_schedule(train_cfg)(state.step), **terms,
                        expert_load=jnp.concatenate(loads) if loads else None,
                        moe_dropped_fraction=dropped)
    return new_state, step_metrics


def _eval_step(params, batch, *, model, chunk_tokens: int):
    """Prediction stats of one batch, chunked as the training loss (no [B, T, V] logits)."""
    out = model.apply({"params": params}, batch["tokens"], batch["positions"],
                      batch["segment_ids"], with_logits=False, method=DeepSeekV3.forward)
    return losses.prediction_stats(out, batch["tokens"], batch["segment_ids"],
                                   chunk_tokens=chunk_tokens, loss_mask=batch.get("loss_mask"))


def _router_biases(params) -> np.ndarray | None:
    """Every router's e_score_correction_bias [n_routers, E], main layers then MTP modules (the
    order of ModelOutput's expert loads)."""
    paths = tree.router_bias_paths(params)
    # A scanned stack's bias is [L, E], an unrolled layer's [E].
    return np.concatenate([np.atleast_2d(tree.get(params, p)) for p in paths]) if paths else None


def _barrier(name: str) -> None:
    """All processes wait here (through the coordination service: no device collective, so no
    time limit on how far apart they arrive); a no-op for one process."""
    if jax.process_count() > 1:
        ocp.multihost.get_barrier_sync_fn()(key=f"dsv3_jax: {name}", timeout_ms=3_600_000)


@contextlib.contextmanager
def stop_signal():
    """Turns SIGTERM/SIGINT into a flag the loop checks after each step (save, then exit): yields
    a list that gets the received signal's name."""
    received, previous = [], {}

    def handle(signum, frame):
        received.append(signal.Signals(signum).name)

    if jax.process_index() == 0 and threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handle)
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_and_evaluate(config, workdir: str) -> dict:
    """Trains `config` in `workdir`, resuming from its newest checkpoint. Returns the last logged
    training metrics and the last evaluation (dicts of floats).

    On every exit, an error's included, the checkpointer (its saves in flight finished), the
    metrics files and the progress bar are closed."""
    with contextlib.ExitStack() as resources:
        run = Run(config, workdir, resources)
        tc = config.train

        # ------------------------------------------------------------ train
        last_train, last_eval = {}, {}
        if run.start_step == 0 and run.eval_set:
            last_eval = run.evaluate(0)
        profiler, throughput = _Profiler(tc, run.workdir), _Throughput(run.tokens_per_step)
        resources.callback(profiler.close)
        nonfinite, step = 0, run.start_step
        with (stop_signal() as stop, jax.set_mesh(run.mesh),
              nn.logical_axis_rules(LOGICAL_AXIS_RULES)):
            while step < tc.steps:
                step += 1
                profiler.before(step)
                run.state, step_metrics = run.train_step(run.state, run.next_batch())
                throughput.steps += 1
                profiler.after(step, run.state)
                nonfinite = count_nonfinite(run, step, step_metrics, nonfinite)  # the NaN guard

                if step % tc.log_every == 0 or step == tc.steps:
                    last_train = run.log(step, step_metrics, throughput.tokens_per_sec())
                    throughput.restart()

                do_eval = run.eval_set and (step % tc.eval_every == 0 or step == tc.steps)
                do_save = step % tc.checkpoint_every == 0 or step == tc.steps
                if do_eval or do_save:
                    with throughput.paused(run.state):  # throughput counts training steps only
                        if do_eval:
                            last_eval = run.evaluate(step)
                        if do_save:
                            run.save(step)
                if stop:
                    logging.warning("%s received: saving step %d and stopping", stop[0], step)
                    run.save(step)
                    break

        run.ckpt.wait()  # raises if the last save failed; the exit stack closes the rest
        return {"train": last_train, "eval": last_eval, "step": step}


class TrainSteps:
    """The jitted steps of `config` on `mesh`, lowered on abstract inputs (nothing allocated):
    what a run compiles, and what `dsv3_jax.plan --compile` measures.

      train_step: (state, batch) -> (state, step metrics), the state donated
      eval_step:  (params, batch) -> prediction stats
      init:       () -> the initial state, laid out on the mesh
    """

    def __init__(self, config, mesh):
        cfg, tc, dc = model_config(config), config.train, config.data
        self.mesh, self.train_cfg = mesh, tc
        self.model, self.tx, self.init_boxed = state_builder(cfg, tc, dc.seq_len)
        self.abstract_state, self.state_shardings = mesh_lib.abstract_with_shardings(
            self.init_boxed, mesh)
        sharding = mesh_lib.batch_sharding(mesh)
        # int32 [B, T] arrays split over the batch axes: 'tokens', 'segment_ids', 'positions'
        # and, in supervised fine-tuning, 'loss_mask' (pipeline.batch_keys).
        self.abstract_batch = {k: jax.ShapeDtypeStruct((dc.batch_size, dc.seq_len), jnp.int32,
                                                       sharding=sharding)
                               for k in pipeline.batch_keys(dc)}
        # The loss chunk holds config.train.loss_chunk_tokens tokens of each batch shard.
        self.chunk_tokens = _chunk_tokens(tc, mesh_lib.batch_ways(mesh.shape))

    @contextlib.contextmanager
    def _context(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            yield

    def lower_train_step(self):
        with self._context():
            step = jax.jit(functools.partial(_train_step, model=self.model, tx=self.tx,
                                             train_cfg=self.train_cfg,
                                             chunk_tokens=self.chunk_tokens),
                           out_shardings=(self.state_shardings, None), donate_argnums=0)
            return step.lower(self.abstract_state, self.abstract_batch)

    def lower_eval_step(self):
        with self._context():
            step = jax.jit(functools.partial(_eval_step, model=self.model,
                                             chunk_tokens=self.chunk_tokens))
            return step.lower(self.abstract_state.params, self.abstract_batch)

    def lower_init(self):
        with self._context():
            return jax.jit(lambda: nn.unbox(self.init_boxed()),
                           out_shardings=self.state_shardings).lower()

    def lower_init_from(self):
        """(params) -> the initial state around them: step 0, a fresh optimizer, the seed's RNG;
        the params are donated."""
        seed = self.train_cfg.seed

        def init(params):
            return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                              opt_state=self.tx.init(params),
                              rng=jax.random.key_data(jax.random.key(seed + 1)))

        with self._context():
            return jax.jit(init, out_shardings=self.state_shardings, donate_argnums=0).lower(
                self.abstract_state.params)


class Run:
    """The run of `config` in `workdir`: the mesh, the data, the compiled steps, the checkpointer,
    the metrics writer, and the state (restored from the workdir's newest checkpoint if it has
    one) with the step it stands at. What must be closed is put on `resources`. Processes meet
    after preparing data and after compiling."""

    def __init__(self, config, workdir: str, resources: contextlib.ExitStack):
        # ------------------------------------------------------------ config, workdir, mesh
        check_run_config(config)
        cfg, tc, dc = model_config(config), config.train, config.data
        if not isinstance(workdir, (str, os.PathLike)) or not str(workdir).strip():
            raise ValueError(f"workdir={workdir!r} is empty; give the directory the run writes to "
                             "(and resumes from).")
        self.config, self.workdir = config, writable_workdir(workdir)
        self.mesh = mesh = mesh_lib.make_mesh(config.mesh)
        mesh_lib.check_mesh_fits(dict(mesh.shape), cfg, dc.batch_size, tc.grad_accum_steps)
        self.batch_sharding = mesh_lib.batch_sharding(mesh)
        is_main = jax.process_index() == 0

        steps = TrainSteps(config, mesh)
        abstract_state = steps.abstract_state
        rope_summary = rope.yarn_summary(cfg)
        logging.info("rope: %s", rope_summary)

        # ------------------------------------------------------------ weights to start from
        # (config.train.init_from) when the workdir holds no run yet: read before the data, whose
        # tokenizer must be the source's.
        pipeline.check_corpus(dc)  # a wrong corpus is refused before any slow work
        init, resumes = None, init_from.workdir_has_checkpoints(self.workdir)
        if tc.init_from and not resumes:
            init = self._load_init(cfg, abstract_state)
            if is_main:
                init_from.adopt_tokenizer(init, dc, self.workdir)
        elif tc.init_from:
            logging.info("the workdir holds checkpoints: resuming its run (config.train.init_from "
                         "is only read by a new run)")

        # ------------------------------------------------------------ data
        # Process 0 tokenizes first; the others then find its token stores and reuse them.
        if not is_main:
            _barrier("data prepared")
        data = pipeline.prepare_data(dc, self.workdir, model_vocab_size=cfg.vocab_size)
        if is_main:
            _barrier("data prepared")
        self.train_iter = pipeline.train_iterator(  # this process's rows of each batch
            data, dc, seed=tc.seed, process_index=jax.process_index(),
            process_count=jax.process_count())
        # Validation batches, each int32 [B, T] 'tokens', 'segment_ids', 'positions'.
        self.eval_set = pipeline.eval_batches(data, dc, tc.eval_batches) if tc.eval_batches else []

        # ------------------------------------------------------------ model, optimizer, state
        # Saved with each checkpoint: the model config, the tokenizer, the RoPE/YaRN constants
        # and the weights the run started from.
        self.meta = {"model": cfg.to_dict(), "tokenizer_vocab_size": data.tokenizer.vocab_size,
                     "tokenizer_path": os.path.abspath(data.tokenizer.path),
                     "rope": rope_summary}

        # ------------------------------------------------------------ restore or initialise
        self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                 keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
        resources.callback(close_quietly, self.ckpt)
        restored = self.ckpt.restore_latest(abstract_state, self.meta)
        if restored is None and tc.init_from and init is None:  # its checkpoints were unreadable
            init = self._load_init(cfg, abstract_state)
        if init is not None:
            self.meta["init_from"] = init_from.describe(init)

        # ------------------------------------------------------------ compiled steps
        # Compiled ahead of time, then a barrier: processes enter their first collectives together
        # (a process still compiling would make the others' collective setup time out).
        self.train_step = steps.lower_train_step().compile()
        self.eval_step = steps.lower_eval_step().compile() if self.eval_set else None
        init_state = None
        if restored is None:
            init_state = (steps.lower_init() if init is None else steps.lower_init_from()).compile()
        _barrier("compiled")
        if restored is None and init is not None:
            self.state, self.start_step = init_state(init.params), 0
            init.params = None  # donated to the state
            logging.info("initialised the parameters from %s (fresh optimizer, step 0)",
                         self.meta["init_from"])
        elif restored is None:
            self.state, self.start_step = init_state(), 0
            logging.info("initialised %s from seed %d", config.model.preset, tc.seed)
        else:
            self.start_step, self.state, data_state = restored
            self.train_iter.set_state(data_state)
            logging.info("resumed from the checkpoint at step %d", self.start_step)
        self.saved_step = self.start_step  # the newest step saved (or restored)
        self.writer = metrics_lib.MetricsWriter(self.workdir, total_steps=tc.steps,
                                                start_step=self.start_step, enabled=is_main)
        resources.callback(close_quietly, self.writer)
        self.tokens_per_step = dc.batch_size * dc.seq_len
        self.flops_per_token = model_stats(cfg, dc.seq_len).train_flops_per_token  # training's
        self.peak = metrics_lib.peak_flops_per_device(  # a device's FLOP/s, for MFU; None: unknown
            jax.devices()[0].device_kind, tc.peak_tflops_per_device)

    def _load_init(self, cfg, abstract_state) -> init_from.InitSource:
        source = init_from.load(self.config.train.init_from, cfg, self.mesh,
                                abstract_state.params)
        logging.info("init_from: %s", init_from.describe(source))
        return source

    def next_batch(self) -> dict:
        """This process's rows of the next batch -> global int32 [B, T] arrays on the mesh."""
        return {k: jax.make_array_from_process_local_data(
                    self.batch_sharding, v, (self.config.data.batch_size,) + v.shape[1:])
                for k, v in next(self.train_iter).items()}

    def save(self, step: int) -> None:
        """Checkpoints the state and the data iterator at `step`, unless that step is saved."""
        if step != self.saved_step:
            self.ckpt.save(step, self.state, self.train_iter.get_state(), self.meta)
            self.saved_step = step

    def evaluate(self, step: int) -> dict:
        """Loss, perplexity and accuracies over eval_set, written as `step`'s evaluation row."""
        totals = None
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            for full in self.eval_set:  # every process holds it whole; each device its slice
                batch = {k: jax.make_array_from_callback(v.shape, self.batch_sharding,
                                                         lambda idx, v=v: v[idx])
                         for k, v in full.items()}
                stats = jax.device_get(self.eval_step(self.state.params, batch))
                totals = stats if totals is None else jax.tree.map(np.add, totals, stats)
        main = totals["main"]
        row = {"eval_loss": float(main["nll_sum"] / max(main["count"], 1))}
        row["eval_perplexity"] = float(np.exp(min(row["eval_loss"], 80.0)))
        row["eval_accuracy"] = float(main["correct"] / max(main["count"], 1))
        if totals["mtp"]:
            row["eval_mtp_accuracy"] = float(np.mean([m["correct"] / max(m["count"], 1)
                                                      for m in totals["mtp"]]))
        self.writer.write(step, row)
        logging.info("step %d eval: %s", step, row)
        return row

    def log(self, step: int, step_metrics: dict, tokens_per_sec: float) -> dict:
        """Writes `step`'s training row (with expert-load statistics) and moves the progress bar;
        returns its scalars."""
        m = jax.device_get(step_metrics)
        train = {k: float(m[k]) for k in ("loss", "ce", "mtp_ce", "balance_loss", "accuracy",
                                          "grad_norm", "lr")}
        train["tokens_per_sec"] = tokens_per_sec
        train["mfu"] = (tokens_per_sec * self.flops_per_token / (self.peak * jax.device_count())
                        if self.peak else None)
        row = dict(train, tokens_seen=step * self.tokens_per_step)
        if m["moe_dropped_fraction"] is not None:
            row["moe_dropped_fraction"] = m["moe_dropped_fraction"]  # per MoE layer, then MTP
            self._warn_dropped(step, m["moe_dropped_fraction"])
        if m["expert_load"] is not None:
            biases = _router_biases(self.state.params)
            row.update(metrics_lib.expert_load_stats(
                m["expert_load"], None if biases is None else np.linalg.norm(biases, axis=-1)))
            if self.config.train.log_expert_load:
                row["expert_load"] = m["expert_load"]
                row["router_bias"] = biases
        self.writer.write(step, row)
        self.writer.progress(step, train["loss"], tokens_per_sec)
        return train

    def _warn_dropped(self, step: int, dropped: np.ndarray) -> None:
        """A warning when an MoE layer's exchange dropped more than
        config.train.moe_dropped_warn_fraction of its token-expert pairs (at logged steps)."""
        limit = self.config.train.moe_dropped_warn_fraction
        worst = int(np.argmax(dropped))
        if dropped[worst] > limit:
            logging.warning(
                "step %d: MoE router %d's exchange dropped %.2f%% of its token-expert pairs "
                "(config.train.moe_dropped_warn_fraction=%g): raise "
                "config.model.moe_capacity_factor (now %g; 0 is dropless), or give the bias "
                "balancing time to even the load.", step, worst, 100 * dropped[worst], limit,
                model_config(self.config).moe_capacity_factor)


def close_quietly(resource) -> None:
    """Closes `resource` (at the run's end); a failure to close is logged, not raised over the
    run's own error."""
    try:
        resource.close()
    except Exception as e:  # noqa: BLE001
        logging.warning("closing %s failed: %s", type(resource).__name__, e)


def count_nonfinite(run: Run, step: int, step_metrics: dict, count: int) -> int:
    """The NaN guard: consecutive non-finite steps up to `step` (0 after a finite one). A NaN/Inf
    step left the state as it was; more than config.train.max_nonfinite_steps in a row save that
    state and raise NonFiniteLossError."""
    if bool(step_metrics["finite"]):
        return 0
    loss = float(step_metrics["loss"])
    logging.warning("step %d: non-finite loss %s; its update was skipped", step, loss)
    if count + 1 > run.config.train.max_nonfinite_steps:
        run.save(step)
        run.ckpt.wait()  # a failed save is the error to report, not a warning on close
        raise NonFiniteLossError(
            f"step {step}: loss {loss}, grad norm {float(step_metrics['grad_norm'])}. The state "
            f"before this step was kept and saved at step {step} in {run.ckpt.directory}. Lower "
            "config.train.lr (or raise warmup_steps), check the data, or allow skipping with "
            "config.train.max_nonfinite_steps.")
    return count + 1


class _Throughput:
    """Tokens per second of the training steps since `restart`, evaluation and saving left out."""

    def __init__(self, tokens_per_step: int):
        self.tokens_per_step = tokens_per_step
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def tokens_per_sec(self) -> float:
        return self.tokens_per_step * self.steps / (time.perf_counter() - self.start)

    @contextlib.contextmanager
    def paused(self, state):
        jax.block_until_ready(state)  # the clock stops once the steps dispatched so far are done
        paused = time.perf_counter()
        yield
        self.start += time.perf_counter() - paused


class _Profiler:
    """A jax.profiler trace of steps [profile_start_step, profile_start_step + profile_steps)
    into <workdir>/profile; none with profile_steps 0 or profile_start_step -1. A run resumed
    inside the window traces nothing (the trace starts only at its first step)."""

    def __init__(self, train_cfg, workdir: str):
        first = train_cfg.profile_start_step
        self.steps = range(first, first + train_cfg.profile_steps) if first >= 0 else range(0)
        self.directory = os.path.join(workdir, "profile")
        self.tracing = False

    def before(self, step: int) -> None:
        if self.steps and step == self.steps[0]:
            jax.profiler.start_trace(self.directory)
            self.tracing = True

    def after(self, step: int, state) -> None:
        if self.tracing and step == self.steps[-1]:
            jax.block_until_ready(state)
            self.close()

    def close(self) -> None:
        """Stops a trace still running (the run ended or failed inside the window)."""
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False
