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

import ml_collections
from ml_collections import config_dict

from dsv3_jax.config import ModelConfig, get_model_config

_MODEL_FIELD_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _model_section(preset: str) -> ml_collections.ConfigDict:
    section = ml_collections.ConfigDict()
    section.preset = preset
    for field in dataclasses.fields(ModelConfig):
        section[field.name] = config_dict.placeholder(_MODEL_FIELD_TYPES[field.type])
    return section


def base_config(preset: str = "tiny") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.model = _model_section(preset)

    c.data = ml_collections.ConfigDict(dict(
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
        schedule="warmup_constant_cosine",  # or "cosine"
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
        bias_gamma=0.001,  # aux-loss-free bias update speed (0 disables)
        seed=0,
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


def check_run_config(config: ml_collections.ConfigDict) -> None:
    """Refuses settings that base_config does not know (typos), naming the closest real key."""
    reference = base_config()

    def walk(node, ref, prefix):
        for key in node.keys():
            name = f"{prefix}.{key}"
            if key not in ref:
                close = difflib.get_close_matches(key, list(ref.keys()), n=1)
                hint = f"; did you mean {prefix}.{close[0]}?" if close else ""
                raise ValueError(f"{name} is not a setting{hint} Known: {sorted(ref.keys())}.")
            if isinstance(ref[key], ml_collections.ConfigDict):
                if not isinstance(node[key], ml_collections.ConfigDict):
                    raise ValueError(f"{name} must be a section with keys {sorted(ref[key].keys())}.")
                walk(node[key], ref[key], name)

    walk(config, reference, "config")
