"""Loading a model for inference from any of the three places weights live.

- a training workdir (`<dir>/checkpoints/<step>/{state,meta}`): the newest step's parameters, the
  model config saved with them, and the run's tokenizer;
- a converted Orbax folder (`<dir>/params/` + `<dir>/model_config.json`, written by
  `python -m dsv3_jax.convert hf-to-orbax`), with `<dir>/tokenizer.model` when present;
- a Hugging Face folder (`config.json` + safetensors), through `dsv3_jax.convert.hf`.
"""

from __future__ import annotations

import json
import os

import orbax.checkpoint as ocp

from dsv3_jax.config import ModelConfig


class CheckpointNotFoundError(ValueError):
    """The path holds no checkpoint this loader knows."""


def _newest_step(checkpoints: str) -> int:
    steps = [int(n) for n in os.listdir(checkpoints) if n.isdigit()
             and os.path.isdir(os.path.join(checkpoints, n, "state"))]
    if not steps:
        raise CheckpointNotFoundError(f"{checkpoints} holds no finished checkpoint (no "
                                      "<step>/state); train first or point at another run.")
    return max(steps)


def load_for_inference(path: str) -> tuple[ModelConfig, dict, str | None]:
    """(ModelConfig, params, tokenizer path or None) from `path` (see the module docstring)."""
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(os.path.join(path, "checkpoints")):
        step_dir = os.path.join(path, "checkpoints", str(_newest_step(os.path.join(path, "checkpoints"))))
        with open(os.path.join(step_dir, "meta", "metadata")) as f:
            meta = json.load(f)
        state = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
        tokenizer = meta.get("tokenizer_path") or os.path.join(path, "tokenizer.model")
        return ModelConfig(**meta["model"]), state["params"], _existing(tokenizer)
    if os.path.isfile(os.path.join(path, "model_config.json")):
        with open(os.path.join(path, "model_config.json")) as f:
            cfg = ModelConfig(**json.load(f))
        params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"))
        return cfg, params, _existing(os.path.join(path, "tokenizer.model"))
    if os.path.isfile(os.path.join(path, "config.json")):
        from dsv3_jax.convert.hf import load_hf_checkpoint

        cfg, params = load_hf_checkpoint(path)
        return cfg, params, _existing(os.path.join(path, "tokenizer.model"))
    raise CheckpointNotFoundError(
        f"{path} is not a checkpoint: expected a training workdir (checkpoints/), a converted "
        "Orbax folder (params/ + model_config.json) or a Hugging Face folder (config.json + "
        "*.safetensors).")


def _existing(path: str) -> str | None:
    return path if path and os.path.isfile(path) else None
