"""python -m dsv3_jax.eval <command> [flags]: evaluations of a checkpoint.

  needle   needle in a haystack, the DeepSeek-V3 report's Figure 8 (dsv3_jax/eval/needle.py):
             python -m dsv3_jax.eval needle --checkpoint=runs/tiny --lengths=128,256,384
                 [--depths=0,0.25,0.5,0.75,1] [--trials=4] [--corpus=builtin] [--seed=0]
                 [--batch_size=8] [--output_dir=needle] [--tokenizer=<a .model>]
                 [--max_seq_len=<positions, to evaluate past the checkpoint's context>]
           prints a table per score (rows: depth, columns: length) and writes
           <output_dir>/needle.json and needle.png; progress goes to stderr.

  perplexity   per-token loss, perplexity and bits per byte on a corpus split
               (dsv3_jax/eval/perplexity.py):
             python -m dsv3_jax.eval perplexity --checkpoint=runs/tiny [--corpus=builtin]
                 [--split=validation] [--max_documents=0] [--batch_size=8] [--max_length=0]
                 [--dtype=auto] [--output_dir=perplexity] [--tokenizer=<a .model>]
           prints a one-row table and writes <output_dir>/perplexity.json.

  lm-eval  lm-evaluation-harness with the `dsv3_jax` model (dsv3_jax/eval/lm_eval_model.py);
           every flag after the command is lm-eval's own (`lm-eval run`), with --model dsv3_jax
           and --output_path lm_eval_results unless given:
             python -m dsv3_jax.eval lm-eval --model_args=checkpoint=runs/tiny,dtype=float32
                 --tasks=<tasks> [--include_path=<a folder of task YAMLs>] [--limit=N] ...
           prints lm-eval's table and writes its results JSON under the output path.

The command comes first. Only the chosen command's flags are defined (its --help lists them), so
commands may define flags of the same name. A missing or unknown command is a one-line usage
error naming the known ones; everything else follows `dsv3_jax.cli.run`'s contract.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import sys
import time
from typing import Callable

from absl import flags

from dsv3_jax import cli

_HELP = ("-h", "-help", "--help", "--helpshort", "--helpfull")


@dataclasses.dataclass(frozen=True)
class Command:
    summary: str  # one line for the usage message
    define_flags: Callable[[], None] | None  # None: main parses its own arguments
    main: Callable[[list[str]], None]  # absl's main: argv[0], the command, nothing else; with
    #                                    define_flags None, the arguments after the command


# ------------------------------------------------------------------------------ shared

def _check_command_line(command: str, argv) -> None:
    """What every checkpoint command refuses first: arguments that are not flags, no
    --checkpoint."""
    if len(argv) > 2:
        raise cli.UsageError(f"{command} takes flags only; unexpected arguments {argv[2:]}.")
    if not (flags.FLAGS.checkpoint or "").strip():
        raise cli.UsageError(f"{command} needs --checkpoint=<a training workdir, an Orbax folder "
                             "or a Hugging Face folder>.")


def _corpus(name: str):
    from dsv3_jax.data.corpus import open_corpus
    from dsv3_jax.train.run_config import base_config

    data_cfg = base_config().data
    data_cfg.corpus = name
    return open_corpus(data_cfg)


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
    from dsv3_jax.eval.needle import NeedleError, check_settings, run_needle
    from dsv3_jax.eval.needle_report import format_tables, write_results
    from dsv3_jax.files import writable_workdir
    from dsv3_jax.infer.load import load_for_inference

    f = flags.FLAGS
    _check_command_line("needle", argv)
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
    corpus = _corpus(f.corpus)

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


# ------------------------------------------------------------------------------ perplexity

DTYPES = ("auto", "float32", "bfloat16")


def _perplexity_flags() -> None:
    flags.DEFINE_string("checkpoint", None, "Training workdir, Orbax folder or HF folder.")
    flags.DEFINE_string("corpus", "builtin", "The documents: 'builtin' (this Python's standard "
                        "library) or paths / globs, as data.corpus.")
    flags.DEFINE_string("split", "validation", "Which split of the corpus: validation or train.")
    flags.DEFINE_integer("max_documents", 0, "Score the split's first N documents (0 = all).")
    flags.DEFINE_integer("batch_size", 8, "Windows per model call.")
    flags.DEFINE_integer("max_length", 0, "The window in tokens (0 = the checkpoint's "
                         "max_seq_len); longer documents are scored in rolling windows.")
    flags.DEFINE_string("dtype", "auto", "Compute dtype: auto (the checkpoint's), float32 or "
                        "bfloat16.")
    flags.DEFINE_string("output_dir", "perplexity", "Folder for perplexity.json.")
    flags.DEFINE_string("tokenizer", "", "A tokenizer (a .model, a tokenizer.json or its "
                        "folder), when the checkpoint has none (or to override it).")


def _perplexity_main(argv) -> None:
    import dataclasses

    from dsv3_jax.data.corpus import SPLITS
    from dsv3_jax.eval.perplexity import format_table, read_documents, run_perplexity
    from dsv3_jax.eval.perplexity import write_results as write_perplexity
    from dsv3_jax.files import writable_workdir
    from dsv3_jax.infer.load import load_for_inference

    f = flags.FLAGS
    _check_command_line("perplexity", argv)
    if f.split not in SPLITS:
        raise cli.UsageError(f"--split={f.split!r} is not one of {', '.join(SPLITS)}.")
    if f.dtype not in DTYPES:
        raise cli.UsageError(f"--dtype={f.dtype!r} is not one of {', '.join(DTYPES)}.")
    for name in ("max_documents", "max_length"):
        if f[name].value < 0:
            raise cli.UsageError(f"--{name}={f[name].value} must be >= 0 (0 = "
                                 f"{'all' if name == 'max_documents' else 'the checkpoint'}'s).")
    if f.batch_size < 1:
        raise cli.UsageError(f"--batch_size={f.batch_size} must be a positive number of windows.")
    output_dir = writable_workdir(f.output_dir, what="--output_dir")
    corpus = _corpus(f.corpus)

    cfg, params, tokenizer_path = load_for_inference(f.checkpoint)
    if f.dtype != "auto":
        cfg = dataclasses.replace(cfg, dtype=f.dtype)
    if f.max_length > cfg.max_seq_len:
        raise cli.UsageError(f"--max_length={f.max_length} is longer than the checkpoint's "
                             f"context (max_seq_len={cfg.max_seq_len}); give at most that, or 0.")
    if f.max_length == 1:
        raise cli.UsageError("--max_length=1 leaves no context; give at least 2, or 0.")
    tokenizer = cli.checkpoint_tokenizer(f.checkpoint, tokenizer_path, f.tokenizer,
                                         cfg.vocab_size)
    texts = read_documents(corpus, f.split, f.max_documents)
    result = run_perplexity(cfg, params, tokenizer, texts, batch_size=f.batch_size,
                            max_length=f.max_length or None)
    result.update(checkpoint=os.path.abspath(f.checkpoint), corpus=corpus.describe(),
                  split=f.split, dtype=cfg.dtype, tokenizer=tokenizer.path)
    path = write_perplexity(result, output_dir)
    print(format_table(result))
    print(f"\nwrote {path}")


# ------------------------------------------------------------------------------ lm-eval

LM_EVAL_OUTPUT = "lm_eval_results"


def _given(args: list[str], *names: str) -> bool:
    return any(a in names or a.split("=", 1)[0] in names for a in args)


def lm_eval_argv(args: list[str]) -> list[str]:
    """lm-eval's `run` command line for our arguments: --model dsv3_jax, --output_path
    LM_EVAL_OUTPUT and --batch_size DEFAULT_BATCH_SIZE (lm-eval's own default is 1) unless
    given."""
    from dsv3_jax.eval.lm_eval_model import DEFAULT_BATCH_SIZE

    argv = ["lm-eval", "run"]
    if not _given(args, "--model", "-M"):
        argv += ["--model", "dsv3_jax"]
    if not _given(args, "--output_path", "-o"):
        argv += ["--output_path", LM_EVAL_OUTPUT]
    if not _given(args, "--batch_size", "-b"):
        argv += ["--batch_size", str(DEFAULT_BATCH_SIZE)]
    return argv + list(args)


def _output_path(argv: list[str]) -> str:
    for i, a in enumerate(argv):
        if a in ("--output_path", "-o") and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--output_path="):
            return a.split("=", 1)[1]
    return LM_EVAL_OUTPUT


def _model_args(args: list[str]) -> list[str] | None:
    """The text of --model_args / -a (lm-eval takes one or more words after it), or None."""
    for i, a in enumerate(args):
        if a.startswith("--model_args="):
            return [a.split("=", 1)[1]]
        if a in ("--model_args", "-a"):
            words = []
            for word in args[i + 1:]:
                if word.startswith("-"):
                    break
                words.append(word)
            return words
    return None


def check_model_args(args: list[str]) -> None:
    """What can be checked of --model_args for the dsv3_jax model before lm-eval starts (it first
    indexes every task it knows, which takes a while): the arg names and the checkpoint."""
    from dsv3_jax.eval.lm_eval_model import MODEL_ARGS, MODEL_NAME

    model = next((args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--model", "-M")),
                 next((a.split("=", 1)[1] for a in args if a.startswith("--model=")),
                      MODEL_NAME))
    if model != MODEL_NAME:
        return
    words = _model_args(args)
    pairs = [part.split("=", 1) for word in (words or []) for part in word.split(",") if part]
    names = [pair[0].strip() for pair in pairs]
    unknown = sorted(set(names) - set(MODEL_ARGS))
    if unknown:
        raise cli.UsageError(f"--model_args: unknown model arg{'s' if len(unknown) > 1 else ''} "
                             f"{', '.join(unknown)} for model {MODEL_NAME}; it takes "
                             f"{', '.join(MODEL_ARGS)}.")
    if "checkpoint" not in names:
        raise cli.UsageError(f"lm-eval with model {MODEL_NAME} needs --model_args=checkpoint=<a "
                             "training workdir, an Orbax folder or a Hugging Face folder>[,dtype="
                             "bfloat16,...].")


def run_lm_eval(args: list[str]) -> None:
    """Runs lm-eval's command line; our errors (a bad model arg, a checkpoint or tokenizer that
    cannot be used) end as one line, as in every entry point."""
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:
        cli.fail("lm-eval is not installed; pip install 'lm-eval>=0.4.13,<0.5' (or pip install -e "
                 "'.[eval]'), then run again.", cli.EXIT_ERROR)
    importlib.import_module("dsv3_jax.eval")  # registers the dsv3_jax model with lm_eval
    from lm_eval.__main__ import cli_evaluate

    debug = "--verbose" in args or os.environ.get("DSV3_DEBUG", "") not in ("", "0")
    args = [a for a in args if a != "--verbose"]
    if not any(a in _HELP for a in args):
        try:
            check_model_args(args)
        except cli.UsageError as e:
            cli.fail(str(e), cli.EXIT_USAGE)
    sys.argv = lm_eval_argv(args)
    output = _output_path(sys.argv)
    started = time.time()
    try:
        cli_evaluate()
    except (KeyboardInterrupt, Exception) as e:
        if debug:
            raise
        if isinstance(e, KeyboardInterrupt):
            cli.fail("interrupted.", cli.EXIT_INTERRUPTED)
        cli.fail(cli.describe(e), cli.EXIT_ERROR)
    written = [p for p in glob.glob(os.path.join(output, "**", "results_*.json"), recursive=True)
               if os.path.getmtime(p) >= started - 1]
    if os.path.isfile(output):
        written.append(output)
    for path in sorted(written):
        print(f"wrote {path}")


# ------------------------------------------------------------------------------ dispatch

COMMANDS = {
    "needle": Command("needle in a haystack over context lengths x depths (heatmap + JSON)",
                      _needle_flags, _needle_main),
    "perplexity": Command("perplexity and bits per byte on a corpus split (table + JSON)",
                          _perplexity_flags, _perplexity_main),
    "lm-eval": Command("lm-evaluation-harness tasks with the dsv3_jax model (lm-eval's flags)",
                       None, run_lm_eval),
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
    if command.define_flags is None:
        command.main(argv[2:])
        return
    command.define_flags()
    cli.run(command.main)


if __name__ == "__main__":
    run(sys.argv)
