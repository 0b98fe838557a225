"""Starting a run from trained weights: `config.train.init_from`.

The source is any of the three places weights live (`dsv3_jax.infer.load`): a training workdir
(its newest checkpoint that reads back), a converted Orbax folder or a Hugging Face folder. Only
the parameters come over, router biases included: the run starts at step 0 with a fresh optimizer
and a new data stream. A workdir that already holds checkpoints resumes its own run instead; the
source is then not read.

The source's architecture must be the run's. What may differ is what a context extension changes
(CONTEXT_FIELDS: the sequence length and the RoPE/YaRN constants) and the settings that change
neither the parameter tree nor the function (IMPLEMENTATION_FIELDS: precision, remat, FP8, the
expert exchange's capacity, the init scale nobody uses here); anything else is refused with each
differing field named.

The run's token ids must mean what the source's meant, so the source's tokenizer comes with it:
with `config.data.tokenizer` empty it is copied into the new workdir (kept there for the run's
life, as a trained one would be; a Hugging Face tokenizer.json with its tokenizer_config.json). A
source without one needs `config.data.tokenizer`.
"""

from __future__ import annotations

import dataclasses
import os

from absl import logging
import jax

from dsv3_jax.config import ModelConfig
from dsv3_jax.data.tokenizer import copy_tokenizer, find_tokenizer, load_tokenizer
from dsv3_jax.train.checkpoint import step_folders

CONTEXT_FIELDS = ("max_seq_len", "original_seq_len", "rope_theta", "rope_factor", "beta_fast",
                  "beta_slow", "mscale")
IMPLEMENTATION_FIELDS = ("dtype", "param_dtype", "remat_policy", "fp8", "moe_capacity_factor",
                         "init_std")


class InitFromError(ValueError):
    """config.train.init_from names weights this run cannot start from."""


@dataclasses.dataclass
class InitSource:
    """Weights to start from: the source's config, its params (in the run's shardings and
    dtypes once `placed`), its tokenizer path (or None) and where they came from
    (`dsv3_jax.infer.load.load_weights`'s {"path", "kind", "step"})."""

    cfg: ModelConfig
    params: dict
    tokenizer: str | None
    origin: dict


def architecture_differences(source: ModelConfig, run: ModelConfig) -> list[str]:
    """'model.<field>: source <value>, this run <value>' for each field that may not change."""
    may_change = set(CONTEXT_FIELDS) | set(IMPLEMENTATION_FIELDS)
    return [f"model.{f.name}: source {getattr(source, f.name)!r}, this run "
            f"{getattr(run, f.name)!r}"
            for f in dataclasses.fields(ModelConfig)
            if f.name not in may_change and getattr(source, f.name) != getattr(run, f.name)]


def load(path: str, run_cfg: ModelConfig, mesh, abstract_params) -> InitSource:
    """The weights at `path`, checked against the run's model and placed like `abstract_params`
    (the run's ShapeDtypeStructs with shardings): each leaf read into its sharding on `mesh`, then
    cast to the run's parameter dtype. Raises InitFromError naming what does not fit."""
    from dsv3_jax.infer.load import CheckpointNotFoundError, load_weights

    if not isinstance(path, str) or not path.strip():
        raise InitFromError(f"config.train.init_from={path!r} must name a training workdir, a "
                            "converted Orbax folder or a Hugging Face folder.")
    try:
        cfg, params, tokenizer, origin = load_weights(path, mesh)
    except CheckpointNotFoundError as e:
        raise InitFromError(f"config.train.init_from={path!r}: {e}") from e
    differences = architecture_differences(cfg, run_cfg)
    if differences:
        raise InitFromError(
            f"config.train.init_from={path!r} holds another architecture: "
            f"{'; '.join(differences)}. Only {', '.join(CONTEXT_FIELDS)} (a context extension) "
            "and the precision/remat settings may change; set those config.model fields to the "
            "source's values, or train from scratch (config.train.init_from='').")
    got, want = (jax.tree_util.tree_structure(t) for t in (params, abstract_params))
    if got != want:  # the same fields give the same tree; this guards the loaders themselves
        raise InitFromError(f"config.train.init_from={path!r}: its parameter tree is not this "
                            f"model's ({got} vs {want}).")
    cast = jax.jit(lambda p: jax.tree.map(lambda x, a: x.astype(a.dtype), p, abstract_params),
                   out_shardings=jax.tree.map(lambda a: a.sharding, abstract_params))
    return InitSource(cfg, cast(params), tokenizer, origin)


def describe(source: InitSource) -> str:
    """'<path> (workdir, step 300)' for logs and the checkpoint meta."""
    step = source.origin["step"]
    return (f"{source.origin['path']} ({source.origin['kind']}"
            f"{'' if step is None else f', step {step}'})")


def adopt_tokenizer(source: InitSource, data_cfg, workdir: str) -> None:
    """Makes the run tokenize as the source did: with config.data.tokenizer empty and no
    tokenizer in the workdir yet, copies the source's there (data.tokenizer.copy_tokenizer:
    where prepare_data looks). Refuses a source without one unless config.data.tokenizer is set;
    warns when the run's tokenizer is another file than the source's."""
    mine = (os.path.expanduser(data_cfg.tokenizer) if data_cfg.tokenizer
            else find_tokenizer(workdir))
    if source.tokenizer is None:
        if not data_cfg.tokenizer:
            raise InitFromError(
                f"config.train.init_from={source.origin['path']!r} has no tokenizer (tokenizer.json "
                "or tokenizer.model), and a new one would give its token ids other meanings; set "
                "config.data.tokenizer to the tokenizer these weights were trained with.")
        return
    if mine is None:
        copy_tokenizer(source.tokenizer, workdir)
        logging.info("init_from: using the source's tokenizer %s", source.tokenizer)
    elif (os.path.exists(mine)
          and load_tokenizer(mine).sha256 != load_tokenizer(source.tokenizer).sha256):
        logging.warning("init_from: this run's tokenizer %s is not the source's %s; token ids may "
                        "mean other text than the weights learned.", mine, source.tokenizer)


def workdir_has_checkpoints(workdir: str) -> bool:
    """True when `<workdir>/checkpoints/` holds a step folder (the run resumes, not inits)."""
    directory = os.path.join(workdir, "checkpoints")
    return os.path.isdir(directory) and bool(step_folders(directory))
