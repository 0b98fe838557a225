"""The run config: every setting a training run reads, with its default.

`configs/*.py` start from `base_config()` and change what their run needs; the command line changes
the rest (`--config.train.steps=100`). `check_run_config` refuses keys that are not settings here
(a typo in a config file), naming the closest real one.

  config.model   preset + any ModelConfig field (None keeps the preset's value)
  config.data    corpus, tokenizer, sequence length, batch size (dsv3_jax/data/pipeline.py)
  config.train   steps, optimizer, schedule, loss weights, checkpointing, eval, logging
  config.mesh    device mesh sizes: data, fsdp, expert, tensor (-1 = the remaining devices)
"""

from __future__ import annotations

import dataclasses
import difflib
import math

import ml_collections
from ml_collections import config_dict

from dsv3_jax.config import ModelConfig, get_model_config
from dsv3_jax.data.corpus import check_corpus_settings
from dsv3_jax.data.pipeline import INT32_MAX, check_data_config
from dsv3_jax.train.losses import DEFAULT_CHUNK_TOKENS

_MODEL_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}
SCHEDULES = ("warmup_constant_cosine", "cosine")  # optimizer.learning_rate_schedule's


def base_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict(dict(preset=preset))
    for field in dataclasses.fields(ModelConfig):
        c.model[field.name] = config_dict.placeholder(_MODEL_FIELD_TYPES[field.type])

    c.data = ml_collections.ConfigDict(dict(
        # "pretrain": documents packed back to back, every token trained on; "sft": conversations
        # (JSONL {"messages": [...]} records; "builtin": the standard library's documented
        # functions), the loss on the answers only (dsv3_jax/data/sft.py).
        task="pretrain",
        # SFT: "drop" the reasoning (<think>...</think>) of answers as the chat format does, or
        # train on the last answer's too ("last"; R1-style reasoning data).
        sft_reasoning="drop",
        corpus="builtin",  # "builtin" (this Python's standard library sources), paths, globs
        format="auto",  # auto | text | jsonl | arrayrecord
        text_field="text",
        validation_fraction=0.05,
        tokenizer="",  # a sentencepiece .model; "" trains one into the workdir
        tokenizer_train_bytes=20_000_000,
        seq_len=256,
        batch_size=16,  # global, sequences per step
        num_threads=2,
        prefetch=4,
    ))

    c.train = ml_collections.ConfigDict(dict(
        steps=1000,
        lr=2.2e-4,
        warmup_steps=100,
        schedule="warmup_constant_cosine",  # or "cosine" (SCHEDULES)
        decay_start_fraction=0.67,  # warmup_constant_cosine: cosine over the last third
        final_lr_ratio=0.1,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        clip=1.0,
        bf16_moments=False,
        mtp_lambda=0.3,  # loss weight of the MTP cross-entropy (averaged over depths)
        balance_alpha=1e-4,  # sequence-wise balance loss weight (summed over MoE layers)
        # Tokens (of each batch shard) per chunk of the chunked cross-entropy: its float32 logits
        # [chunk, V] are the loss's largest buffers (512 x 129,280 x 4 B = 0.26 GB at V3).
        loss_chunk_tokens=DEFAULT_CHUNK_TOKENS,
        bias_gamma=0.001,  # aux-loss-free bias update speed (0 disables)
        # Microbatches per optimizer step (lax.scan, fp32 gradients summed): each holds
        # data.batch_size / grad_accum_steps sequences; the step, its bias update and its
        # tokens/s count the whole batch.
        grad_accum_steps=1,
        # Warn when an MoE layer's expert-parallel exchange drops more than this share of its
        # token-expert pairs (config.model.moe_capacity_factor).
        moe_dropped_warn_fraction=0.01,
        seed=0,
        # Weights to start a new run from (fresh optimizer, step 0, new data stream): a training
        # workdir, a converted Orbax folder or a Hugging Face folder (dsv3_jax/train/init_from.py).
        # "" trains from a random initialisation. A workdir with checkpoints resumes its own run.
        init_from="",
        checkpoint_every=200,
        keep_checkpoints=3,
        async_checkpoint=True,
        eval_every=200,
        eval_batches=8,
        log_every=10,
        log_expert_load=False,  # also log every router's per-expert load and bias vectors
        profile_start_step=-1,  # with profile_steps > 0: jax.profiler trace into workdir/profile
        profile_steps=0,
        peak_tflops_per_device=0.0,  # for MFU; 0 = known accelerators' bf16 dense peak, else none
        max_nonfinite_steps=0,  # consecutive NaN/Inf steps skipped before stopping
    ))

    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, expert=1, tensor=1))
    return c


def model_config(config: ml_collections.ConfigDict) -> ModelConfig:
    """The ModelConfig of a run: the preset with every non-None model field applied."""
    overrides = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
    return get_model_config(config.model.preset, **overrides)


def unknown_key_message(prefix: str, key: str, known: list[str]) -> str:
    """'config.train.stepz is not a setting; did you mean config.train.steps? ...'"""
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"; did you mean {prefix}.{close[0]}?" if close else "."
    return f"{prefix}.{key} is not a setting{hint} Known: {sorted(known)}."


def check_run_config(config: ml_collections.ConfigDict, reference=None) -> None:
    """The one check of a run config: refuses settings base_config does not know (typos), naming
    the closest real key, and values no run can use (the setting, the value and what it must be).
    Train and mesh rules are here; the data and model rules are their modules' own. `reference`:
    the config whose keys are the settings (default base_config(); a GRPO run's adds config.rl)."""
    if not isinstance(config, ml_collections.ConfigDict):
        raise ValueError(f"the run config is a {type(config).__name__}, not an ml_collections."
                         "ConfigDict; a config file's get_config() must return one (start from "
                         "dsv3_jax.train.run_config.base_config()).")
    reference = base_config() if reference is None else reference

    def walk(node, ref, prefix):
        for key in node.keys():
            name = f"{prefix}.{key}"
            if key not in ref:
                raise ValueError(unknown_key_message(prefix, key, list(ref.keys())))
            if isinstance(ref[key], ml_collections.ConfigDict):
                if not isinstance(node[key], ml_collections.ConfigDict):
                    raise ValueError(f"{name} must be a section with keys {sorted(ref[key].keys())}.")
                walk(node[key], ref[key], name)

    walk(config, reference, "config")
    for section in ("model", "data", "train", "mesh"):
        if section not in config:
            raise ValueError(f"config.{section} is missing; start the config from "
                             "dsv3_jax.train.run_config.base_config().")
    check_train_config(config.train)
    check_data_config(config.data)
    check_corpus_settings(config.data)
    for axis, value in config.mesh.items():
        if not _is_int(value) or (value < 1 and value != -1):
            raise ValueError(f"config.mesh.{axis}={value!r} must be a positive device count or -1 "
                             "(the devices the other axes leave).")
    if config.data.batch_size % config.train.grad_accum_steps:
        raise ValueError(f"config.train.grad_accum_steps={config.train.grad_accum_steps} does not "
                         f"divide config.data.batch_size={config.data.batch_size}; each "
                         "microbatch holds batch_size / grad_accum_steps sequences.")
    max_seq_len = model_config(config).max_seq_len  # refuses a bad preset or model field
    if config.data.seq_len > max_seq_len:
        raise ValueError(f"config.data.seq_len={config.data.seq_len} exceeds the model's "
                         f"max_seq_len={max_seq_len}; shorten it or set config.model.max_seq_len.")


def check_train_config(train_cfg) -> None:
    """Refuses config.train values no run can use (what check_run_config checks of that section)."""
    for key, rule in _TRAIN_RULES.items():
        if key in train_cfg:
            ok, what = rule(train_cfg[key])
            if not ok:
                raise ValueError(f"config.train.{key}={train_cfg[key]!r} is invalid: it must be "
                                 f"{what}.")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def int_at_least(minimum: int, why: str):
    return lambda v: (_is_int(v) and minimum <= v <= INT32_MAX,
                      f"an int in [{minimum}, {INT32_MAX}] ({why})")


def number_in(low: float, high: float | None = None, *, low_open=False, high_open=False, why=""):
    def rule(v):
        ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
              and (v > low if low_open else v >= low))
        if high is not None:
            ok = ok and (v < high if high_open else v <= high)
        lo = f"> {low}" if low_open else f">= {low}"
        hi = "" if high is None else (f" and < {high}" if high_open else f" and <= {high}")
        return ok, f"a finite number {lo}{hi}" + (f" ({why})" if why else "")
    return rule


def is_bool(v):
    return isinstance(v, bool), "True or False"


_TRAIN_RULES = {
    "steps": int_at_least(1, "optimizer steps of the run"),
    "lr": number_in(0, low_open=True, why="the peak learning rate"),
    "warmup_steps": int_at_least(0, "linear warmup from 0"),
    "schedule": lambda v: (v in SCHEDULES, f"one of {list(SCHEDULES)}"),
    "decay_start_fraction": number_in(0, 1, why="where the cosine decay starts, as a fraction of steps"),
    "final_lr_ratio": number_in(0, 1, why="the last learning rate over the peak"),
    "b1": number_in(0, 1, high_open=True, why="Adam's first-moment decay"),
    "b2": number_in(0, 1, high_open=True, why="Adam's second-moment decay"),
    "eps": number_in(0, low_open=True, why="Adam's epsilon"),
    "weight_decay": number_in(0, why="decoupled weight decay"),
    "clip": number_in(0, low_open=True, why="the gradient's global-norm clip"),
    "bf16_moments": is_bool,
    "mtp_lambda": number_in(0, why="the MTP loss weight; 0 disables it"),
    "balance_alpha": number_in(0, why="the balance loss weight; 0 disables it"),
    "bias_gamma": number_in(0, why="the router-bias update speed; 0 disables it"),
    "grad_accum_steps": int_at_least(1, "microbatches per optimizer step; it must divide "
                                         "config.data.batch_size"),
    "moe_dropped_warn_fraction": number_in(0, 1, why="the share of dropped token-expert pairs "
                                                   "that is warned about"),
    "loss_chunk_tokens": int_at_least(1, "tokens per chunk of the chunked cross-entropy; a few "
                                          "hundred MB of [chunk, vocab] float32 logits at V3 "
                                          "scale with 512"),
    "seed": int_at_least(0, "the initialisation and shuffle seed"),
    "init_from": lambda v: (isinstance(v, str), "a string: the path of a training workdir, a "
                                                "converted Orbax folder or a Hugging Face folder, "
                                                "or '' to start from a random initialisation"),
    "checkpoint_every": int_at_least(1, "steps between checkpoints"),
    "keep_checkpoints": int_at_least(1, "checkpoints kept; fewer would delete every checkpoint"),
    "async_checkpoint": is_bool,
    "eval_every": int_at_least(1, "steps between evaluations"),
    "eval_batches": int_at_least(0, "validation batches per evaluation; 0 disables evaluation"),
    "log_every": int_at_least(1, "steps between logged rows"),
    "log_expert_load": is_bool,
    "profile_start_step": int_at_least(-1, "the first traced step; -1: none"),
    "profile_steps": int_at_least(0, "steps traced; 0 disables the profiler"),
    "peak_tflops_per_device": number_in(0, why="for MFU; 0 uses the known accelerators' peak"),
    "max_nonfinite_steps": int_at_least(0, "consecutive NaN/Inf steps skipped before stopping"),
}
