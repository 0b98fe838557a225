"""python -m dsv3_jax.eval <command> [flags]: evaluations of a checkpoint.

  needle   needle in a haystack, the DeepSeek-V3 report's Figure 8 (dsv3_jax/eval/needle.py):
             python -m dsv3_jax.eval needle --checkpoint=runs/tiny --lengths=128,256,384
                 [--depths=0,0.25,0.5,0.75,1] [--trials=4] [--corpus=builtin] [--seed=0]
                 [--batch_size=8] [--output_dir=needle] [--tokenizer=<a .model>]
                 [--max_seq_len=<positions, to evaluate past the checkpoint's context>]
           prints a table per score (rows: depth, columns: length) and writes
           <output_dir>/needle.json and needle.png; progress goes to stderr.

The command comes first. Only the chosen command's flags are defined (its --help lists them), so
commands may define flags of the same name. A missing or unknown command is a one-line usage
error naming the known ones; everything else follows `dsv3_jax.cli.run`'s contract.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from typing import Callable

from absl import flags

from dsv3_jax import cli

_HELP = ("-h", "-help", "--help", "--helpshort", "--helpfull")


@dataclasses.dataclass(frozen=True)
class Command:
    summary: str  # one line for the usage message
    define_flags: Callable[[], None]
    main: Callable[[list[str]], None]  # absl's main: argv[0], the command, nothing else


# ------------------------------------------------------------------------------ needle

def _needle_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "Training workdir, Orbax folder or HF folder.")
    flags.DEFINE_list("lengths", None, "Context lengths in tokens (prompt with the needle and "
                      "the question), e.g. 256,512,1024.")
    flags.DEFINE_list("depths", ["0", "0.25", "0.5", "0.75", "1"], "Needle depths, fractions "
                      "in [0, 1]: 0 = the start of the context, 1 = right before the question.")
    flags.DEFINE_integer("trials", 4, "Haystacks (and needles) per length and depth.")
    flags.DEFINE_string("corpus", "builtin", "Where the haystack text comes from: 'builtin' "
                        "(this Python's standard library) or paths / globs, as data.corpus; its "
                        "validation split is read.")
    flags.DEFINE_string("output_dir", "needle", "Folder for needle.json and needle.png.")
    flags.DEFINE_integer("seed", 0, "Draws the needles and where each haystack starts.")
    flags.DEFINE_integer("batch_size", 8, "Cases per generation / scoring call.")
    flags.DEFINE_string("tokenizer", "", "A tokenizer (a .model, a tokenizer.json or its "
                        "folder), when the checkpoint has none (or to override it).")
    flags.DEFINE_integer("max_seq_len", 0, "Evaluate past the checkpoint's context: its "
                         "ModelConfig.max_seq_len for this evaluation (0 keeps it). YaRN "
                         "switches on above original_seq_len, as in a run of that length; the "
                         "command says when it does.")


def _depths(values) -> list[float]:
    depths = []
    for value in values or []:
        try:
            depths.append(float(value))
        except ValueError:
            raise cli.UsageError(f"--depths: {value.strip()!r} is not a number; give fractions "
                                 "in [0, 1], e.g. --depths=0,0.25,0.5,0.75,1.") from None
    return depths


def _needle_main(argv) -> None:
    from dsv3_jax.data.corpus import open_corpus
    from dsv3_jax.eval.needle import NeedleError, check_settings, run_needle
    from dsv3_jax.eval.needle_report import format_tables, write_results
    from dsv3_jax.files import writable_workdir
    from dsv3_jax.infer.load import load_for_inference
    from dsv3_jax.train.run_config import base_config

    f = flags.FLAGS
    if len(argv) > 2:
        raise cli.UsageError(f"needle takes flags only; unexpected arguments {argv[2:]}.")
    if not (f.checkpoint or "").strip():
        raise cli.UsageError("needle needs --checkpoint=<a training workdir, an Orbax folder or "
                             "a Hugging Face folder>.")
    if not f.lengths:
        raise cli.UsageError("needle needs --lengths=<context lengths in tokens>, e.g. "
                             "--lengths=256,512,1024.")
    try:  # what can be checked before a checkpoint is read is checked first
        settings = dict(lengths=cli.positive_ints("--lengths", f.lengths),
                        depths=_depths(f.depths), trials=f.trials, batch_size=f.batch_size,
                        seed=f.seed)
        check_settings(**settings)
    except NeedleError as e:
        raise cli.UsageError(f"--{e}") from e
    output_dir = writable_workdir(f.output_dir, what="--output_dir")
    data_cfg = base_config().data
    data_cfg.corpus = f.corpus
    corpus = open_corpus(data_cfg)

    if f.max_seq_len < 0:
        raise cli.UsageError(f"--max_seq_len={f.max_seq_len} must be a positive number of "
                             "positions, or 0 to keep the checkpoint's.")
    cfg, params, tokenizer_path = load_for_inference(f.checkpoint)
    if f.max_seq_len:
        was_yarn = cfg.use_yarn
        cfg = cfg.replace(max_seq_len=f.max_seq_len)
        if cfg.use_yarn != was_yarn:
            print(f"--max_seq_len={f.max_seq_len}: YaRN is now {'on' if cfg.use_yarn else 'off'} "
                  f"(original_seq_len={cfg.original_seq_len}), so the model's rope differs from "
                  "the checkpoint's.", file=sys.stderr)
    tokenizer = cli.checkpoint_tokenizer(f.checkpoint, tokenizer_path, f.tokenizer,
                                         cfg.vocab_size)
    try:
        result = run_needle(cfg, params, tokenizer, corpus=corpus,
                            checkpoint=os.path.abspath(f.checkpoint), **settings)
    except NeedleError as e:
        if e.setting:
            raise cli.UsageError(f"--{e}") from e
        raise
    json_path, png_path = write_results(result, output_dir)
    print(format_tables(result))
    print(f"\nwrote {json_path}" + (f" and {png_path}" if png_path else ""))
    if png_path is None:
        print(f"{os.path.basename(json_path)} written, needle.png skipped: matplotlib is not "
              "installed (pip install matplotlib).", file=sys.stderr)


# ------------------------------------------------------------------------------ dispatch

COMMANDS = {
    "needle": Command("needle in a haystack over context lengths x depths (heatmap + JSON)",
                      _needle_flags, _needle_main),
}


def usage() -> str:
    return ("usage: python -m dsv3_jax.eval <command> [flags], a command from: "
            + "; ".join(f"{name} ({c.summary})" for name, c in COMMANDS.items())
            + ". `python -m dsv3_jax.eval <command> --help` lists its flags.")


def run(argv: list[str]) -> None:
    """Picks the command named by argv[1], defines its flags and runs it under cli.run."""
    name = argv[1] if len(argv) > 1 else None
    if name in _HELP:
        print(usage())
        return
    if name not in COMMANDS:
        got = "no command" if name is None else f"{name!r}"
        cli.fail(f"give a command first, one of {', '.join(COMMANDS)}; got {got} (e.g. python -m "
                 "dsv3_jax.eval needle --checkpoint=runs/tiny --lengths=256,512).", cli.EXIT_USAGE)
    command = COMMANDS[name]
    command.define_flags()
    cli.run(command.main)


if __name__ == "__main__":
    run(sys.argv)
