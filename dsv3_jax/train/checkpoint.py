"""Orbax checkpoints: a training run's (state, data-iterator position and run identity together),
and reading parameters back from either of our two layouts.

Each checkpoint `<workdir>/checkpoints/<step>/` holds three items:
  state  the TrainState pytree (params with the router biases, optimizer state, step, RNG), restored
         straight into the run's shardings;
  data   the grain iterator state (JSON), so a restart continues on the exact next batch;
  meta   the model config and tokenizer size, so a checkpoint from another config is refused.
Orbax writes into a temporary directory and renames it when complete, so a failed or interrupted
save never replaces the last good checkpoint; restore takes the newest checkpoint that reads back,
moving any damaged newer one aside (`<step>.unreadable-<time>`) rather than deleting it.
"""

from __future__ import annotations

import os
import time

import json

from absl import logging
import jax
import orbax.checkpoint as ocp

from dsv3_jax.config import ModelConfig

# The converted-parameters layout (`python -m dsv3_jax.convert hf-to-orbax` writes it):
#   <dir>/params/            StandardCheckpointer().save of the plain parameter arrays
#   <dir>/model_config.json  json of ModelConfig.to_dict()
#   <dir>/tokenizer.model    when the source had one
PARAMS_DIR = "params"
MODEL_CONFIG_FILE = "model_config.json"
TOKENIZER_FILE = "tokenizer.model"

# Model fields that may change between a checkpoint and its restart (they change the numerics'
# precision or the memory/speed trade-off, never the parameter tree): remat, compute dtype, FP8.
_RESTART_MAY_CHANGE = ("remat_policy", "dtype", "fp8")


class CheckpointMismatchError(ValueError):
    """The workdir holds checkpoints of a different model or tokenizer."""


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        """Starts saving (asynchronously when enabled); `wait` blocks until it is on disk."""
        self._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore_latest(self, abstract_state, meta: dict):
        """(step, state, data_state) of the newest readable checkpoint, or None when there is none.

        Raises CheckpointMismatchError when the newest checkpoint belongs to another config.
        """
        steps = sorted(self._manager.all_steps(), reverse=True)
        for i, step in enumerate(steps):
            saved = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            if i == 0:
                _check_meta(saved, meta, self.directory)
            try:
                restored = self._manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            except Exception as e:  # a damaged checkpoint: set it aside, fall back to the one before
                aside = os.path.join(self.directory, f"{step}.unreadable-{int(time.time())}")
                os.rename(os.path.join(self.directory, str(step)), aside)
                self._manager.reload()
                logging.warning("checkpoint at step %d does not read back (%s); moved it to %s and "
                                "trying an older one", step, str(e)[:500], aside)
                continue
            return step, restored["state"], restored["data"]
        return None

    def close(self) -> None:
        self._manager.close()


def _check_meta(saved: dict, current: dict, directory: str) -> None:
    diffs = []
    for key in sorted(set(saved["model"]) | set(current["model"])):
        if key in _RESTART_MAY_CHANGE:
            continue
        a, b = saved["model"].get(key), current["model"].get(key)
        if a != b:
            diffs.append(f"model.{key}: checkpoint {a!r}, this run {b!r}")
    if saved.get("tokenizer_vocab_size") != current.get("tokenizer_vocab_size"):
        diffs.append(f"tokenizer vocab: checkpoint {saved.get('tokenizer_vocab_size')}, "
                     f"this run {current.get('tokenizer_vocab_size')}")
    if diffs:
        raise CheckpointMismatchError(
            f"the checkpoints in {directory} belong to another run config ({'; '.join(diffs)}). "
            "Use a new --workdir for this config, or run with the checkpoint's settings.")


class CheckpointNotFoundError(ValueError):
    """A path holds none of our checkpoint layouts."""


def _params_target(cfg: ModelConfig):
    """Abstract params of cfg on the first local device (a restore target)."""
    from dsv3_jax.model.stats import abstract_params

    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        abstract_params(cfg))


def newest_step_dir(checkpoints: str) -> str:
    """`<checkpoints>/<step>` of the newest finished checkpoint (state and meta written)."""
    steps = [int(n) for n in os.listdir(checkpoints)
             if n.isdigit() and os.path.isdir(os.path.join(checkpoints, n, "state"))
             and os.path.isfile(os.path.join(checkpoints, n, "meta", "metadata"))]
    if not steps:
        raise CheckpointNotFoundError(f"{checkpoints} holds no finished checkpoint (<step>/state "
                                      "and <step>/meta/metadata); train first or point at another run.")
    return os.path.join(checkpoints, str(max(steps)))


def read_params(path: str) -> tuple[ModelConfig, dict, dict]:
    """(ModelConfig, params, meta) from a converted-parameters folder or a training workdir.

    A workdir gives its newest checkpoint: only the `params` of its state are read (a partial
    restore: no optimizer moments). `meta` is the checkpoint's meta (`tokenizer_path`, ...), or {}.
    """
    path = os.path.abspath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, MODEL_CONFIG_FILE)) and os.path.isdir(os.path.join(path, PARAMS_DIR)):
        with open(os.path.join(path, MODEL_CONFIG_FILE), encoding="utf-8") as f:
            cfg = ModelConfig(**json.load(f))
        params = ocp.StandardCheckpointer().restore(os.path.join(path, PARAMS_DIR), _params_target(cfg))
        return cfg, params, {}
    if os.path.isdir(os.path.join(path, "checkpoints")):
        step_dir = newest_step_dir(os.path.join(path, "checkpoints"))
        with open(os.path.join(step_dir, "meta", "metadata"), encoding="utf-8") as f:
            meta = json.load(f)
        if "model" not in meta:
            raise CheckpointNotFoundError(f"{step_dir}/meta/metadata has no 'model' key; it is not "
                                          "a dsv3_jax training checkpoint.")
        cfg = ModelConfig(**meta["model"])
        target = _params_target(cfg)
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
        restored = ocp.PyTreeCheckpointer().restore(
            os.path.join(step_dir, "state"),
            args=ocp.args.PyTreeRestore(item={"params": target}, restore_args={"params": restore_args},
                                        partial_restore=True))
        logging.info("restored the parameters of %s", step_dir)
        return cfg, restored["params"], meta
    raise CheckpointNotFoundError(
        f"{path} is neither a converted Orbax folder ({PARAMS_DIR}/ + {MODEL_CONFIG_FILE}) nor a "
        "training workdir (checkpoints/<step>/state).")
