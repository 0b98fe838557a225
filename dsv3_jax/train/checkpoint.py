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

import dataclasses
import json
import os
import time

from absl import logging
import jax
import orbax.checkpoint as ocp

from dsv3_jax.config import ModelConfig

# The converted-parameters layout (`python -m dsv3_jax.convert hf-to-orbax` writes it):
#   <dir>/params/            StandardCheckpointer().save of the plain parameter arrays
#   <dir>/model_config.json  json of ModelConfig.to_dict()
#   <dir>/tokenizer.json + tokenizer_config.json, or <dir>/tokenizer.model, when the source had one
PARAMS_DIR = "params"
MODEL_CONFIG_FILE = "model_config.json"

# Model fields that may change between a checkpoint and its restart (they change the numerics'
# precision or the memory/speed trade-off, never the parameter tree): remat, compute dtype, FP8,
# and the expert exchange's capacity (how many pairs it may drop).
_RESTART_MAY_CHANGE = ("remat_policy", "dtype", "fp8", "moe_capacity_factor")


class CheckpointMismatchError(ValueError):
    """The workdir holds checkpoints of a different model or tokenizer."""


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "data", "meta"))

    def save(self, step: int, state, data_state: dict, meta: dict) -> None:
        """Starts saving (asynchronously when enabled); `wait` blocks until it is on disk."""
        self._manager.save(step, force=True, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
            meta=ocp.args.JsonSave(meta)))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def restore_latest(self, abstract_state, meta: dict):
        """(step, state, data_state) of the newest readable checkpoint, or None when there is none.

        A checkpoint whose meta, state or data item does not read back (truncated, garbage, an
        empty step folder) is moved aside and the one before it tried. Raises
        CheckpointMismatchError when the newest readable checkpoint belongs to another config.
        """
        def read(step):
            saved = _meta_of(self._manager.restore(
                step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])
            _check_meta(saved, meta, self.directory)
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
            return restored["state"], restored["data"]

        found = _newest_readable(self._manager.all_steps(), read, self._set_aside)
        return None if found is None else (found[0], *found[1])

    def _set_aside(self, step: int, error: BaseException) -> None:
        """Moves a damaged `<step>/` to `<step>.unreadable-<time>` (never deletes it)."""
        aside = os.path.join(self.directory, f"{step}.unreadable-{int(time.time())}")
        os.rename(os.path.join(self.directory, str(step)), aside)
        self._manager.reload()
        logging.warning("checkpoint at step %d does not read back (%s); moved it to %s and trying "
                        "an older one", step, _brief(error), aside)

    def close(self) -> None:
        """Waits for saves in flight, then releases the manager; closing again does nothing."""
        if self._manager is not None:
            manager, self._manager = self._manager, None
            manager.close()


def _brief(error: BaseException) -> str:
    return f"{type(error).__name__}: {str(error)[:300]}"


def _newest_readable(steps, read, skip):
    """(step, read(step)) for the newest of `steps` that reads back, or None; `skip(step, error)`
    is told of each newer one that does not. A CheckpointMismatchError is raised, not skipped."""
    for step in sorted(steps, reverse=True):
        try:
            return step, read(step)
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure to read means a damaged checkpoint
            skip(step, e)
    return None


def _meta_of(saved) -> dict:
    """A checkpoint's meta item, checked to be ours (a dict with the model config)."""
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise ValueError("its meta item is not a dsv3_jax meta (no 'model' config)")
    return saved


def _check_meta(saved: dict, current: dict, directory: str) -> None:
    diffs = []
    # A field added after a checkpoint was written holds its default there.
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    for key in sorted(set(saved["model"]) | set(current["model"])):
        if key in _RESTART_MAY_CHANGE:
            continue
        a, b = saved["model"].get(key, defaults.get(key)), current["model"].get(key, defaults.get(key))
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


def _params_target(cfg: ModelConfig, mesh=None):
    """Abstract params of cfg (a restore target): on the first local device, or with a `mesh` in
    each parameter's NamedSharding there (its logical axes through LOGICAL_AXIS_RULES)."""
    from dsv3_jax.model import tree
    from dsv3_jax.parallel.mesh import abstract_with_shardings

    if mesh is not None:
        return abstract_with_shardings(tree.boxed_init(cfg), mesh)[0]
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                        tree.abstract_params(cfg))


def step_folders(checkpoints: str) -> list[int]:
    """The steps of the `<step>/` folders under a checkpoints directory (any order; moved-aside
    `<step>.unreadable-*` folders are not steps). OSError when it cannot be listed."""
    return [int(n) for n in os.listdir(checkpoints)
            if n.isdigit() and os.path.isdir(os.path.join(checkpoints, n))]


def _read_workdir_params(checkpoints: str, mesh=None) -> tuple[ModelConfig, dict, dict]:
    """The newest checkpoint under `checkpoints` whose meta and params read back (training's rule,
    except that a damaged checkpoint is only skipped, not moved: readers never change a run)."""
    try:
        steps = step_folders(checkpoints)
    except OSError as e:
        raise CheckpointNotFoundError(f"{checkpoints} cannot be read ({e.strerror or e}).") from e

    def read(step):
        step_dir = os.path.join(checkpoints, str(step))
        with open(os.path.join(step_dir, "meta", "metadata"), encoding="utf-8") as f:
            meta = _meta_of(json.load(f))
        cfg = ModelConfig(**meta["model"])
        target = _params_target(cfg, mesh)
        restore_args = jax.tree.map(lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding), target)
        restored = ocp.PyTreeCheckpointer().restore(
            os.path.join(step_dir, "state"),
            args=ocp.args.PyTreeRestore(item={"params": target},
                                        restore_args={"params": restore_args},
                                        partial_restore=True))
        return cfg, jax.block_until_ready(restored["params"]), meta

    def skip(step, error):
        logging.warning("skipping the checkpoint at step %d of %s: it does not read back (%s)",
                        step, checkpoints, _brief(error))
        skipped.append(step)

    skipped = []
    found = _newest_readable(steps, read, skip)
    if found is None:
        what = (f"none of its checkpoints (steps {skipped}) reads back" if skipped
                else "it holds no checkpoint")
        raise CheckpointNotFoundError(f"{checkpoints}: {what}; train first or point at another run.")
    step, (cfg, params, meta) = found
    if skipped:
        logging.warning("using the checkpoint at step %d (newer ones do not read back: %s)",
                        step, skipped)
    logging.info("restored the parameters of %s", os.path.join(checkpoints, str(step)))
    return cfg, params, dict(meta, step=step)


def read_params(path: str, mesh=None) -> tuple[ModelConfig, dict, dict]:
    """(ModelConfig, params, meta) from a converted-parameters folder or a training workdir.

    A workdir gives its newest checkpoint that reads back: only the `params` of its state are read
    (a partial restore: no optimizer moments). `meta` is the checkpoint's meta (`tokenizer_path`,
    ...) with the `step` used, or {} for a converted folder. With a `mesh`, each parameter is
    restored straight into its sharding there (else onto the first local device).
    """
    path = os.path.abspath(os.path.expanduser(path))
    config_file, params_dir = os.path.join(path, MODEL_CONFIG_FILE), os.path.join(path, PARAMS_DIR)
    if os.path.isfile(config_file) and os.path.isdir(params_dir):
        try:
            with open(config_file, encoding="utf-8") as f:
                fields = json.load(f)
            if not isinstance(fields, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            raise CheckpointNotFoundError(f"{config_file} is not a model config ({e}); rewrite it "
                                          "with python -m dsv3_jax.convert.") from e
        try:
            cfg = ModelConfig(**fields)
        except TypeError as e:
            raise CheckpointNotFoundError(f"{config_file} does not hold ModelConfig fields ({e}).") from e
        try:
            params = ocp.StandardCheckpointer().restore(params_dir, _params_target(cfg, mesh))
        except Exception as e:  # noqa: BLE001
            raise CheckpointNotFoundError(f"{params_dir} does not read back as the parameters of "
                                          f"{config_file} ({_brief(e)}).") from e
        return cfg, params, {}
    if os.path.isdir(os.path.join(path, "checkpoints")):
        return _read_workdir_params(os.path.join(path, "checkpoints"), mesh)
    raise CheckpointNotFoundError(
        f"{path} is neither a converted Orbax folder ({PARAMS_DIR}/ + {MODEL_CONFIG_FILE}) nor a "
        "training workdir (checkpoints/<step>/state).")
