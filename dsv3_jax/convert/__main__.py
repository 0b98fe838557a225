"""python -m dsv3_jax.convert {hf-to-orbax, orbax-to-hf}: Hugging Face <-> Orbax checkpoints.

  python -m dsv3_jax.convert hf-to-orbax --hf_dir=DeepSeek-V3/ --out=ckpt/ [--dtype=bfloat16]
  python -m dsv3_jax.convert orbax-to-hf --orbax_dir=ckpt/ --out=hf/ [--fp8] [--dtype=bfloat16]
                                         [--max_shard_gb=5]

The Orbax layout that hf-to-orbax writes (and generation restores):
  <out>/params/            `orbax.checkpoint.StandardCheckpointer().save(path, params)`: the plain
                           (unboxed) parameter arrays of DeepSeekV3(cfg)
  <out>/model_config.json  `json.dump(cfg.to_dict())`; rebuild with `ModelConfig(**d)`
  <out>/tokenizer.model    copied when the source folder has one

orbax-to-hf reads that layout, or a training workdir: the newest `<workdir>/checkpoints/<step>/`,
restoring only the `params` of its `state` item, with the model config from `meta/metadata` (JSON,
key `model`); the workdir's `tokenizer.model` is copied when present. Both commands refuse an
existing non-empty --out and write nothing under it when they fail.
"""

from __future__ import annotations

import json
import math
import os

from absl import flags

from dsv3_jax import cli
from dsv3_jax.convert.layout import PARAM_DTYPES
from dsv3_jax.files import atomic_dir, writable_workdir
from dsv3_jax.data.tokenizer import copy_tokenizer, find_tokenizer
from dsv3_jax.train.checkpoint import MODEL_CONFIG_FILE, PARAMS_DIR

_COMMANDS = ("hf-to-orbax", "orbax-to-hf")


class ConversionError(ValueError):
    """A conversion's input or output path cannot be used as asked."""


def _check_out(out: str) -> str:
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise ConversionError(f"--out={out} already exists and is not an empty folder; choose a new "
                              "path (nothing is overwritten).")
    # Before the slow read: a parent that cannot be written would fail only at the end.
    writable_workdir(os.path.dirname(out), error=ConversionError, what="--out's parent folder")
    return out


def _copy_tokenizer(source_dir: str, out: str) -> None:
    """The source folder's tokenizer (tokenizer.json with its config, or tokenizer.model), if any."""
    if (tokenizer := find_tokenizer(source_dir)) is not None:
        copy_tokenizer(tokenizer, out)


def hf_to_orbax(hf_dir: str, out: str, *, dtype: str = "float32", progress: bool = True):
    """Reads a Hugging Face checkpoint folder and writes the Orbax layout above; returns the cfg."""
    import jax.numpy as jnp
    import orbax.checkpoint as ocp

    from dsv3_jax.convert import load_hf_checkpoint

    out = _check_out(out)
    cfg, params = load_hf_checkpoint(hf_dir, jnp.dtype(dtype), progress=progress)
    with atomic_dir(out) as partial:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(partial, PARAMS_DIR), params)
        checkpointer.wait_until_finished()
        with open(os.path.join(partial, MODEL_CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(cfg.to_dict(), f, indent=2)
        _copy_tokenizer(hf_dir, partial)
    return cfg


def orbax_to_hf(orbax_dir: str, out: str, *, fp8: bool = False, dtype: str | None = None,
                max_shard_bytes: int | None = None, progress: bool = True):
    """Writes the params of an Orbax folder or training workdir as a Hugging Face checkpoint."""
    from dsv3_jax.convert import DEFAULT_MAX_SHARD_BYTES, save_hf_checkpoint
    from dsv3_jax.train.checkpoint import CheckpointNotFoundError, read_params

    out = _check_out(out)
    try:
        cfg, params, _ = read_params(orbax_dir)
    except CheckpointNotFoundError as e:
        raise ConversionError(f"--orbax_dir: {e}") from e
    save_hf_checkpoint(out, cfg, params, fp8=fp8, dtype=dtype, progress=progress,
                       max_shard_bytes=max_shard_bytes or DEFAULT_MAX_SHARD_BYTES)  # atomic
    _copy_tokenizer(os.path.expanduser(orbax_dir), out)
    return cfg


def _define_flags():
    """The CLI's flags, defined only when run as a program (importing this module defines none)."""
    flags.DEFINE_string("hf_dir", None, "hf-to-orbax: the Hugging Face checkpoint folder.")
    flags.DEFINE_string("orbax_dir", None, "orbax-to-hf: a converted Orbax folder or a training "
                        "workdir.")
    flags.DEFINE_string("out", None, "The folder to write (must not exist, or be empty).")
    flags.DEFINE_enum("dtype", None, PARAM_DTYPES, "hf-to-orbax: parameter dtype (default "
                      "float32); orbax-to-hf: the written tensors' dtype (default: their own).")
    flags.DEFINE_bool("fp8", False, "orbax-to-hf: write block-scaled FP8 linear weights.")
    flags.DEFINE_float("max_shard_gb", 5.0, "orbax-to-hf: safetensors shard size, GB.")


def main(argv):
    if len(argv) != 2 or argv[1] not in _COMMANDS:
        raise cli.UsageError(f"give one command, {' or '.join(_COMMANDS)}; got {argv[1:]} "
                             "(e.g. python -m dsv3_jax.convert hf-to-orbax --hf_dir=... --out=...).")
    command, f = argv[1], flags.FLAGS
    if not (f.out or "").strip():
        raise cli.UsageError(f"{command} needs --out=<a new folder to write>.")
    if command == "hf-to-orbax":
        if not (f.hf_dir or "").strip():
            raise cli.UsageError("hf-to-orbax needs --hf_dir=<a Hugging Face checkpoint folder>.")
        if f.fp8:
            raise cli.UsageError("--fp8 is an orbax-to-hf option; hf-to-orbax keeps the "
                                 "checkpoint's weights in --dtype.")
        cfg = hf_to_orbax(f.hf_dir, f.out, dtype=f.dtype or "float32")
    else:
        if not (f.orbax_dir or "").strip():
            raise cli.UsageError("orbax-to-hf needs --orbax_dir=<an Orbax folder or a training "
                                 "workdir>.")
        if not math.isfinite(f.max_shard_gb) or f.max_shard_gb <= 0:
            raise cli.UsageError(f"--max_shard_gb={f.max_shard_gb} must be a positive number.")
        cfg = orbax_to_hf(f.orbax_dir, f.out, fp8=f.fp8, dtype=f.dtype,
                          max_shard_bytes=max(int(f.max_shard_gb * 2**30), 1))
    print(f"{command}: wrote {os.path.abspath(f.out)} ({cfg.n_layers} layers, dim {cfg.dim}, "
          f"{cfg.n_routed_experts} experts, MTP depth {cfg.mtp_depth})")


if __name__ == "__main__":
    _define_flags()
    cli.run(main)
