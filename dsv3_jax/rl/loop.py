"""train_grpo(config, workdir): the GRPO loop (grpo.py has the math).

Each step, as the recipe reads:
  1. prompts: the next config.rl.prompts_per_step prompts of the task's training split, rendered
     with the DeepSeek-V3 chat format and a generation prompt (prompts whose tokens + max_new_tokens
     exceed the model's context are skipped and counted, never cut);
  2. samples: G = samples_per_prompt completions of each, from the latent-cache generator
     (`generate_tokens`: temperature / top-k / top-p, MTP speculation optional); each finished
     completion goes to the reward pool while the others are still decoding;
  3. rewards: the weighted sum of config.rl.rewards per sample (a reward that raises, returns
     NaN or times out scores 0 for that sample and is counted in the metrics); advantages are
     the rewards standardised within each group;
  4. updates: `epochs` passes over the samples in `minibatches` optimizer steps each, on the
     clipped GRPO objective with the k3 KL to the reference (the starting weights, frozen); the
     sampling weights' log-probs are taken once before the first update. After each update the
     router biases move by the aux-loss-free balance rule, as in pre-training;
  5. metrics (rewards, group std, KL, ratio, clip fraction, lengths, tokens/s of sampling and of
     training, expert load) to metrics.jsonl and TensorBoard; greedy held-out evaluation every
     config.train.eval_every steps; Orbax checkpoints every config.train.checkpoint_every.

Exact resume: a checkpoint holds the state (weights, optimizer, the reference weights) and the
prompt stream's position; the sampler's seed is a function of config.train.seed and the step. A
run killed and resumed from its checkpoint therefore equals the uninterrupted one bit for bit.
SIGTERM/SIGINT save and stop; a NaN/Inf update leaves the state as it was.

The MTP modules are not trained here (their weights pass through unchanged). One process only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import time

from absl import logging
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from dsv3_jax.chat.template import render_chat
from dsv3_jax.data import conversations as conv
from dsv3_jax.data.special_tokens import EOS
from dsv3_jax.data.tokenizer import find_tokenizer, load_tokenizer
from dsv3_jax.files import writable_workdir
from dsv3_jax.infer.generate import bucket_length, generate_tokens
from dsv3_jax.model import rope
from dsv3_jax.model.transformer import DeepSeekV3
from dsv3_jax.parallel import mesh as mesh_lib
from dsv3_jax.parallel.mesh import LOGICAL_AXIS_RULES
from dsv3_jax.rl import grpo, rewards as rewards_lib, tasks as tasks_lib
from dsv3_jax.rl.config import check_grpo_config, sampling_of
from dsv3_jax.train import init_from, losses, metrics as metrics_lib, optimizer as optim
from dsv3_jax.train.checkpoint import Checkpointer
from dsv3_jax.train.loop import (_router_biases, close_quietly, count_nonfinite, state_builder,
                                 stop_signal)
from dsv3_jax.train.run_config import model_config

MAX_SKIPPED_IN_A_ROW = 1000  # prompts too long in a row before the stream gives up


@flax.struct.dataclass
class RLState:
    step: jax.Array  # int32 [], GRPO steps taken (one batch of prompts each)
    params: dict  # the policy's fp32 weights, router biases included
    opt_state: optax.OptState
    ref_params: dict  # the reference policy: the starting weights, frozen


class PromptError(ValueError):
    """The task's prompts cannot be used with this model (all too long, none held out)."""


class PromptStream:
    """The encoded prompts of one split of a task, from `position` on, skipping (and counting)
    those that do not fit: len(ids) + max_new_tokens > the model's context."""

    def __init__(self, task, tokenizer, split: str, *, limit: int, position: int = 0):
        self.task, self.tokenizer, self.split, self.limit = task, tokenizer, split, limit
        self.position, self.skipped = position, 0

    def encode(self, example) -> tuple[str, list[int]]:
        text = render_chat(list(example.messages), add_generation_prompt=True)
        return text, self.tokenizer.encode(text)

    def take(self, n: int) -> list[tuple[object, str, list[int]]]:
        """The next n (example, prompt text, ids) that fit; the position moves past them."""
        out, in_a_row = [], 0
        while len(out) < n:
            example = self.task.example(self.position, self.split)
            self.position += 1
            text, ids = self.encode(example)
            if len(ids) <= self.limit:
                out.append((example, text, ids))
                in_a_row = 0
                continue
            self.skipped += 1
            in_a_row += 1
            if self.skipped == 1:
                logging.warning("%s prompt %d has %d tokens, more than the %d that leave room for "
                                "config.rl.max_new_tokens; skipping it (and counting such prompts "
                                "in prompts_skipped)", self.split, self.position - 1, len(ids),
                                self.limit)
            if in_a_row >= MAX_SKIPPED_IN_A_ROW:
                raise PromptError(
                    f"{in_a_row} {self.split} prompts in a row are too long for the model's "
                    f"context (the longest prompt that fits has {self.limit} tokens with "
                    "config.rl.max_new_tokens); shorten the prompts, lower max_new_tokens or raise "
                    "config.model.max_seq_len.")
        return out


def _seed_of(seed: int, step: int) -> int:
    """The sampler's seed at `step`: a function of the run's seed and the step only."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1, np.uint32)[0])


def _log_probs(model, params, tokens, segment_ids, *, chunk: int, temperature: float):
    """(log pi(tokens[:, t + 1] | tokens[:, :t + 1]) float32 [N, T] (the last column 0-target
    garbage, masked by callers), the model output). pi is the model's distribution at the
    sampling temperature: the head's input is scaled by 1 / temperature (the head is linear)."""
    out = model.apply({"params": params}, tokens, None, segment_ids, with_mtp=False,
                      with_logits=False, method=DeepSeekV3.forward)
    n, t, d = out.head_input.shape
    h = out.head_input if temperature == 1.0 else out.head_input / temperature
    targets = jnp.pad(tokens[:, 1:], ((0, 0), (0, 1)))
    logp = losses.chunked_target_log_probs(h.reshape(n * t, d), out.head_kernel,
                                           targets.reshape(-1), chunk=chunk)
    return logp.reshape(n, t), out


def _score(params, tokens, segment_ids, *, model, chunk, temperature):
    return _log_probs(model, params, tokens, segment_ids, chunk=chunk, temperature=temperature)[0]


def _update(state: RLState, batch: dict, *, model, tx, train_cfg, rl):
    """One optimizer step on the GRPO loss of `batch` (tokens, segment_ids, mask, old_logp,
    ref_logp, advantages), then the router-bias update from its expert load; a non-finite step
    changes nothing."""
    def loss_fn(params):
        logp, out = _log_probs(model, params, batch["tokens"], batch["segment_ids"],
                               chunk=rl.score_chunk_tokens, temperature=float(rl.temperature))
        loss, stats = grpo.grpo_loss(
            logp, batch["old_logp"], batch["ref_logp"] if rl.kl_beta else None,
            batch["advantages"], batch["mask"], clip_low=rl.clip_low, clip_high=rl.clip_high,
            kl_beta=rl.kl_beta, normalisation=rl.normalisation)
        return loss, (stats, out.expert_load, out.dropped_fraction)

    (loss, (stats, load, dropped)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state = optim.guarded_step(tx, grads, state.params, state.opt_state, finite,
                                           load, None, train_cfg.bias_gamma)
    new_state = state.replace(params=params, opt_state=opt_state)
    return new_state, dict(loss=loss, grad_norm=grad_norm, finite=finite, **stats,
                           lr=optim.learning_rate_schedule(train_cfg)(state.step),
                           expert_load=load, moe_dropped_fraction=dropped)


class GRPORun:
    """The run of `config` in `workdir`: the mesh, the task and its prompt streams, the reward
    pool, the compiled steps, the checkpointer, the metrics writer and the state (restored from
    the workdir's newest checkpoint, else built from config.train.init_from). What must be closed
    is put on `resources`."""

    def __init__(self, config, workdir: str, resources: contextlib.ExitStack):
        # ------------------------------------------------------------ config, workdir, mesh
        check_grpo_config(config)
        if jax.process_count() > 1:
            raise ValueError("GRPO runs in one process; start it without --coordinator_address "
                             "(a mesh over this host's devices is used).")
        cfg, tc, dc, rl = model_config(config), config.train, config.data, config.rl
        if not isinstance(workdir, (str, os.PathLike)) or not str(workdir).strip():
            raise ValueError(f"workdir={workdir!r} is empty; give the directory the run writes to "
                             "(and resumes from).")
        self.config, self.cfg, self.workdir = config, cfg, writable_workdir(workdir)
        self.mesh = mesh_lib.make_mesh(config.mesh)
        mesh_lib.check_mesh_fits(dict(self.mesh.shape), cfg, rl.prompts_per_step *
                                 rl.samples_per_prompt // rl.minibatches, 1)

        # ------------------------------------------------------------ task, rewards
        self.task = tasks_lib.make_task(rl.task, levels=rl.levels, seed=tc.seed,
                                        eval_fraction=rl.eval_fraction)
        self.rewards = rewards_lib.parse_rewards(rl.rewards)
        self.pool = rewards_lib.RewardPool(self.rewards, workers=rl.reward_workers,
                                           timeout_s=rl.reward_timeout_s, kind=rl.reward_pool)
        resources.callback(close_quietly, self.pool)

        # ------------------------------------------------------------ state shapes, weights
        self.model, self.tx, init_boxed = state_builder(cfg, tc, dc.seq_len)

        def rl_init_boxed():
            s = init_boxed()
            return RLState(step=s.step, params=s.params, opt_state=s.opt_state,
                           ref_params=s.params)

        abstract, self.shardings = mesh_lib.abstract_with_shardings(rl_init_boxed, self.mesh)
        init, resumes = None, init_from.workdir_has_checkpoints(self.workdir)
        if not resumes:
            init = init_from.load(tc.init_from, cfg, self.mesh, abstract.params)
            logging.info("init_from: %s", init_from.describe(init))
            init_from.adopt_tokenizer(init, dc, self.workdir)
        path = os.path.expanduser(dc.tokenizer) if dc.tokenizer else find_tokenizer(self.workdir)
        if path is None:
            raise ValueError(f"{self.workdir} holds no tokenizer; set config.data.tokenizer to the "
                             "one the weights were trained with.")
        self.tokenizer = load_tokenizer(path)
        if self.tokenizer.vocab_size > cfg.vocab_size:
            raise ValueError(f"the tokenizer {path} has {self.tokenizer.vocab_size} ids, more than "
                             f"the model's vocab_size={cfg.vocab_size}; use the weights' own "
                             "tokenizer.")
        markers = conv.check_chat_tokenizer(self.tokenizer)  # the chat format's markers
        self.stop = sorted({markers[EOS], self.tokenizer.eos_id})
        self.sampling = dataclasses.replace(sampling_of(rl), vocab_limit=self.tokenizer.vocab_size)
        self.greedy = dataclasses.replace(self.sampling, temperature=0.0, top_k=0, top_p=1.0)
        limit = cfg.max_seq_len - rl.max_new_tokens
        self.train_prompts = PromptStream(self.task, self.tokenizer, "train", limit=limit)
        self.eval_set = []
        if rl.eval_prompts:
            self.eval_set = PromptStream(self.task, self.tokenizer, "eval", limit=limit).take(
                min(rl.eval_prompts, _eval_size(self.task)))

        # ------------------------------------------------------------ restore or initialise
        self.meta = {"model": cfg.to_dict(), "tokenizer_vocab_size": self.tokenizer.vocab_size,
                     "tokenizer_path": os.path.abspath(path), "rope": rope.yarn_summary(cfg),
                     "rl": {k: rl[k] for k in ("task", "levels", "rewards")}}
        self.ckpt = Checkpointer(os.path.join(self.workdir, "checkpoints"),
                                 keep=tc.keep_checkpoints, async_save=tc.async_checkpoint)
        resources.callback(close_quietly, self.ckpt)
        restored = self.ckpt.restore_latest(abstract, self.meta)
        if restored is None:
            if init is None:  # the checkpoints did not read back: start over from init_from
                init = init_from.load(tc.init_from, cfg, self.mesh, abstract.params)
            self.meta["init_from"] = init_from.describe(init)
            self.state, self.start_step = self._initial_state(init.params), 0
            init.params = None
        else:
            self.start_step, self.state, data_state = restored
            self.meta["init_from"] = data_state.get("init_from")
            self.train_prompts.position = int(data_state["train_position"])
            self.train_prompts.skipped = int(data_state.get("prompts_skipped", 0))
            logging.info("resumed from the checkpoint at step %d", self.start_step)
        self.saved_step = self.start_step

        # ------------------------------------------------------------ compiled steps
        score = functools.partial(_score, model=self.model, chunk=rl.score_chunk_tokens,
                                  temperature=float(rl.temperature))
        self.score = jax.jit(score)
        self.update = jax.jit(functools.partial(_update, model=self.model, tx=self.tx,
                                                train_cfg=tc, rl=rl),
                              out_shardings=(self.shardings, None), donate_argnums=0)
        self.writer = metrics_lib.MetricsWriter(self.workdir, total_steps=tc.steps,
                                                start_step=self.start_step)
        resources.callback(close_quietly, self.writer)

    def _initial_state(self, params) -> RLState:
        def init(params):
            return RLState(step=jnp.zeros([], jnp.int32), params=params,
                           opt_state=self.tx.init(params),
                           ref_params=jax.tree.map(jnp.copy, params))

        with self.context():
            return jax.jit(init, out_shardings=self.shardings)(params)

    @contextlib.contextmanager
    def context(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
            yield

    # ---------------------------------------------------------------- sampling and rewards
    def sample(self, prompts, seed: int, sampling, group: int) -> dict:
        """`group` completions of each of `prompts` ([(example, text, ids)]), scored: a dict of
        prompt_ids (N lists: each row's prompt), completions (N lists of ids), scores [N, R],
        total [N], truncated [N] (no stop token), failures, new_tokens and seconds. Rows are
        prompt-major: row i * group + j is prompt i's sample j."""
        rl = self.config.rl
        rows = [ids for _, _, ids in prompts for _ in range(group)]
        got = [[] for _ in rows]
        sent = np.zeros(len(rows), bool)

        def submit(row: int) -> None:
            example, text, _ = prompts[row // group]
            self.pool.submit(row, text, self.tokenizer.decode(got[row], keep_special=True),
                             dict(example.fields))
            sent[row] = True

        def on_tokens(row: int, tokens: list[int]) -> None:
            got[row] += tokens
            if got[row][-1] in self.stop or len(got[row]) >= rl.max_new_tokens:
                submit(row)  # finished: scored while the other rows decode

        t0 = time.perf_counter()
        with self.context():
            result = generate_tokens(self.cfg, self.state.params, rows,
                                     max_new_tokens=rl.max_new_tokens, sampling=sampling,
                                     speculative=rl.speculative, seed=seed, stop_tokens=self.stop,
                                     on_tokens=on_tokens)
        completions = [tokens[len(r):] for tokens, r in zip(result.tokens, rows)]
        for row in np.flatnonzero(~sent):  # (every row streams its end; this is a safety net)
            got[row] = completions[row]
            submit(row)
        scores, failures = self.pool.collect(len(rows))
        return {"prompt_ids": rows, "completions": completions,
                "scores": scores, "total": scores @ self.pool.weights, "failures": failures,
                "truncated": np.array([not c or c[-1] not in self.stop for c in completions]),
                "new_tokens": sum(len(c) for c in completions),
                "seconds": time.perf_counter() - t0, "stats": result.stats}

    # ---------------------------------------------------------------- one step
    def batch_of(self, samples: dict, advantages: np.ndarray) -> dict:
        """The training arrays of the samples: tokens, segment_ids and mask int32 [N, T] (T a
        power of two: few compiles), advantages float32 [N]. mask[i, t] is 1 when the token at
        t + 1 is a completion token (what the logits at t predict)."""
        completions = samples["completions"]
        total = max(len(p) + len(c) for p, c in zip(samples["prompt_ids"], completions))
        t = bucket_length(total, self.cfg.max_seq_len)
        n = len(completions)
        tokens = np.zeros((n, t), np.int32)
        segment_ids = np.zeros((n, t), np.int32)
        mask = np.zeros((n, t), np.int32)
        for i, (p, c) in enumerate(zip(samples["prompt_ids"], completions)):
            row = list(p) + list(c)
            tokens[i, :len(row)] = row
            segment_ids[i, :len(row)] = 1
            mask[i, len(p) - 1:len(row) - 1] = 1
        return {"tokens": tokens, "segment_ids": segment_ids, "mask": mask,
                "advantages": np.asarray(advantages, np.float32)}

    def step(self, step: int) -> dict:
        """One GRPO step (the module docstring's 1-4); returns its metrics row."""
        rl = self.config.rl
        prompts = self.train_prompts.take(rl.prompts_per_step)
        samples = self.sample(prompts, _seed_of(self.config.train.seed, step), self.sampling,
                              rl.samples_per_prompt)
        rewards = samples["total"].reshape(rl.prompts_per_step, rl.samples_per_prompt)
        advantages = grpo.group_advantages(rewards).reshape(-1)
        batch = self.batch_of(samples, advantages)

        t0 = time.perf_counter()
        with self.context():
            arrays = {k: jnp.asarray(v) for k, v in batch.items()}
            arrays["old_logp"] = self.score(self.state.params, arrays["tokens"],
                                            arrays["segment_ids"])
            arrays["ref_logp"] = (self.score(self.state.ref_params, arrays["tokens"],
                                             arrays["segment_ids"])
                                  if rl.kl_beta else jnp.zeros_like(arrays["old_logp"]))
            rows = len(batch["advantages"])
            size = rows // rl.minibatches
            order = np.random.default_rng(_seed_of(self.config.train.seed + 1, step))
            updates = []
            for _ in range(rl.epochs):
                perm = order.permutation(rows) if rl.minibatches > 1 else np.arange(rows)
                for k in range(rl.minibatches):
                    idx = jnp.asarray(perm[k * size:(k + 1) * size])
                    mb = {key: value[idx] for key, value in arrays.items()}
                    self.state, m = self.update(self.state, mb)
                    updates.append(m)
            self.state = self.state.replace(step=self.state.step + 1)
            updates = jax.device_get(updates)
        train_seconds = time.perf_counter() - t0
        return self._row(samples, rewards, updates, batch, train_seconds)

    def _row(self, samples, rewards, updates, batch, train_seconds) -> dict:
        """The step's metrics: rewards, lengths, the updates' GRPO statistics (the first
        update's KL and ratio, the mean clip fraction), throughput, expert load."""
        first, last = updates[0], updates[-1]
        lengths = np.array([len(c) for c in samples["completions"]])
        row = {
            "reward_mean": float(rewards.mean()), "reward_max": float(rewards.max()),
            "reward_group_std": float(rewards.std(axis=1).mean()),
            "zero_std_groups": float(np.mean(rewards.std(axis=1) == 0)),
            "response_length": float(lengths.mean()), "response_length_max": int(lengths.max()),
            "truncated_fraction": float(samples["truncated"].mean()),
            "loss": float(np.mean([u["loss"] for u in updates])),
            "pg_loss": float(np.mean([u["pg_loss"] for u in updates])),
            "kl": float(last["kl"]), "kl_first_update": float(first["kl"]),
            "ratio": float(last["ratio"]), "ratio_first_update": float(first["ratio"]),
            "clip_fraction": float(np.mean([u["clip_fraction"] for u in updates])),
            "grad_norm": float(np.mean([u["grad_norm"] for u in updates])),
            "lr": float(last["lr"]), "updates_skipped": int(sum(not u["finite"] for u in updates)),
            "sample_tokens_per_sec": samples["new_tokens"] / max(samples["seconds"], 1e-9),
            "train_tokens_per_sec": (float(batch["segment_ids"].sum()) * len(updates)
                                     / self.config.rl.minibatches / max(train_seconds, 1e-9)),
            "prompts_seen": self.train_prompts.position,
            "prompts_skipped": self.train_prompts.skipped,
        }
        for j, name in enumerate(self.pool.names):
            row[f"reward/{name}"] = float(samples["scores"][:, j].mean())
        for name, reasons in samples["failures"].items():
            for reason, count in reasons.items():
                row[f"reward_failures/{name}/{reason}"] = int(count)
        if last["moe_dropped_fraction"] is not None:
            row["moe_dropped_fraction"] = last["moe_dropped_fraction"]
        if last["expert_load"] is not None:
            biases = _router_biases(self.state.params)
            row.update(metrics_lib.expert_load_stats(
                last["expert_load"], None if biases is None else np.linalg.norm(biases, axis=-1)))
        return row

    # ---------------------------------------------------------------- eval, save
    def evaluate(self, step: int) -> dict:
        """Greedy completions of the held-out prompts (eval_reward: the mean weighted reward,
        eval_<name>: each reward's mean) and, with config.rl.eval_samples, that many sampled
        completions of each at the training sampling settings (eval_sampled_reward,
        eval_sampled_<name>: pass@1 at temperature). The samples' seed is step 0's, which no
        training step draws, at every evaluation: they differ only by the weights. Written as
        `step`'s evaluation row."""
        def means(prefix: str, samples: dict) -> dict:
            out = {f"{prefix}_reward": float(samples["total"].mean())}
            for j, name in enumerate(self.pool.names):
                out[f"{prefix}_{name}"] = float(samples["scores"][:, j].mean())
            return out

        samples = self.sample(self.eval_set, 0, self.greedy, 1)
        row = means("eval", samples)
        row["eval_response_length"] = float(np.mean([len(c) for c in samples["completions"]]))
        if self.config.rl.eval_samples:
            row.update(means("eval_sampled", self.sample(
                self.eval_set, _seed_of(self.config.train.seed, 0), self.sampling,
                self.config.rl.eval_samples)))
        self.writer.write(step, row)
        logging.info("step %d eval: %s", step, row)
        return row

    def save(self, step: int) -> None:
        if step != self.saved_step:
            self.ckpt.save(step, self.state, {
                "train_position": self.train_prompts.position,
                "prompts_skipped": self.train_prompts.skipped,
                "init_from": self.meta.get("init_from")}, self.meta)
            self.saved_step = step


def _eval_size(task) -> int:
    """How many held-out prompts the task has (a generated task: unbounded)."""
    size = getattr(task, "size", None)
    return size("eval") if callable(size) else 1 << 30


def train_grpo(config, workdir: str) -> dict:
    """GRPO on `config` in `workdir`, resuming from its newest checkpoint. Returns the last
    step's metrics, the last evaluation and the step reached."""
    with contextlib.ExitStack() as resources:
        run = GRPORun(config, workdir, resources)
        tc = config.train
        last_train, last_eval = {}, {}
        if run.start_step == 0 and run.eval_set:
            last_eval = run.evaluate(0)
        nonfinite, step = 0, run.start_step
        with stop_signal() as stop:
            while step < tc.steps:
                step += 1
                row = run.step(step)
                finite = row["updates_skipped"] == 0
                nonfinite = count_nonfinite(run, step, {"finite": finite, "loss": row["loss"],
                                                        "grad_norm": row["grad_norm"]}, nonfinite)
                if step % tc.log_every == 0 or step == tc.steps:
                    run.writer.write(step, row)
                    run.writer.progress(step, None, row["sample_tokens_per_sec"],
                                        reward=row["reward_mean"], kl=row["kl"])
                last_train = row
                if run.eval_set and (step % tc.eval_every == 0 or step == tc.steps):
                    last_eval = run.evaluate(step)
                if step % tc.checkpoint_every == 0 or step == tc.steps:
                    run.save(step)
                if stop:
                    logging.warning("%s received: saving step %d and stopping", stop[0], step)
                    run.save(step)
                    break
        run.ckpt.wait()
        return {"train": last_train, "eval": last_eval, "step": step}
