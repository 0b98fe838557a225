"""Loading a model for inference from any of the three places weights live.

- a training workdir (`<dir>/checkpoints/<step>/{state,meta}`): the newest step's parameters (only
  those are read), the model config saved with them, and the run's tokenizer;
- a converted Orbax folder (`<dir>/params/` + `<dir>/model_config.json`, written by
  `python -m dsv3_jax.convert hf-to-orbax`), with its tokenizer when present;
- a Hugging Face folder (`config.json` + safetensors), through `dsv3_jax.convert`.

A folder's tokenizer is its `tokenizer.json` (a release's), else its `tokenizer.model`
(data.tokenizer.find_tokenizer).
"""

from __future__ import annotations

import os

from dsv3_jax.config import ModelConfig
from dsv3_jax.data.tokenizer import find_tokenizer
from dsv3_jax.train.checkpoint import (MODEL_CONFIG_FILE, PARAMS_DIR, CheckpointNotFoundError,
                                       read_params)

__all__ = ["CheckpointNotFoundError", "load_for_inference", "load_weights"]


def load_for_inference(path: str, mesh=None) -> tuple[ModelConfig, dict, str | None]:
    """(ModelConfig, params, tokenizer path or None) from `path` (see the module docstring). With
    a `mesh`, each parameter is read straight into its sharding there (else onto the first local
    device)."""
    cfg, params, tokenizer, _ = load_weights(path, mesh)
    return cfg, params, tokenizer


def load_weights(path: str, mesh=None) -> tuple[ModelConfig, dict, str | None, dict]:
    """load_for_inference's (cfg, params, tokenizer path or None) and where they came from:
    {"path": the absolute path, "kind": "workdir" | "orbax" | "hf", "step": the workdir
    checkpoint's step, else None}."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, "config.json")):
        from dsv3_jax.convert import load_hf_checkpoint

        cfg, params = load_hf_checkpoint(path, mesh=mesh)
        return cfg, params, find_tokenizer(path), {"path": path, "kind": "hf", "step": None}
    try:
        cfg, params, meta = read_params(path, mesh)
    except CheckpointNotFoundError as e:
        converted = (os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE))
                     and os.path.isdir(os.path.join(path, PARAMS_DIR)))
        if converted or os.path.isdir(os.path.join(path, "checkpoints")):
            raise  # one of the layouts, damaged: read_params says what is wrong with it
        raise CheckpointNotFoundError(
            f"{path} is not a checkpoint: expected a training workdir (checkpoints/), a converted "
            f"Orbax folder ({PARAMS_DIR}/ + {MODEL_CONFIG_FILE}) or a Hugging Face folder "
            "(config.json + *.safetensors).") from e
    source = {"path": path, "kind": "workdir" if "step" in meta else "orbax",
              "step": meta.get("step")}
    tokenizer = _existing(meta.get("tokenizer_path")) or find_tokenizer(path)
    return cfg, params, tokenizer, source


def _existing(path: str | None) -> str | None:
    return path if path and os.path.isfile(path) else None
